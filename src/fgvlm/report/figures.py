"""The paper's figures with Altair: each function takes frames and returns a chart;
``save_chart`` writes it as SVG (vl-convert) and self-contained HTML, atomically.

Figure 2: fine-grained vs general accuracy of the hub VLMs (``models_table``).
Figure 3: each VLM against the CLIP model behind its vision tower (``models_table``).
Figures 4-7: paired bars per factor (``effects.factor_effects`` pairs): LLM, vision encoder,
pretraining data, updating.
Figure 8: the progression of Table 1 (``tables.summary_table`` over a chain).
Confusions: per-class accuracy and the most confused class pairs of one model
(``evaluate.analysis.per_class_report``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import altair as alt
import polars as pl

from fgvlm.io import atomic_path
from fgvlm.report.effects import level_order
from fgvlm.report.tables import AVERAGES, FACTOR_HEADERS, FACTORS, format_number

AVERAGE_NAMES = {"classification": "Fine-grained", "vlm": "General VQA"}
DELTA_NAMES = {"classification": "fine-grained", "vlm": "general"}  # as the captions say
FIGURE_FACTORS = {
    "figure4": "llm",
    "figure5": "vision_encoder",
    "figure6": "pt_data",
    "figure7": "updating",
}
FACTOR_NAMES = {
    "llm": "base LLM",
    "vision_encoder": "vision encoder",
    "pt_data": "pretraining data",
    "updating": "weights updated in pretraining",
    "ft_data": "finetuning data",
    "arch": "architecture",
}
ACCURACY_AXIS = alt.Axis(title="Accuracy (%)")
MAX_CLASSES = 40  # per-class bars shown in the confusion view (the weakest classes)


def _signed(value: float) -> str:
    return format_number(value, signed=True)


def figure2_fine_vs_general(
    models: pl.DataFrame,
    *,
    title: str = "Fine-grained classification vs general VQA across VLMs",
) -> alt.LayerChart:
    """Scatter of the hub VLMs of ``models_table``: general (x) vs fine-grained (y), labelled."""
    data = models.filter(
        (pl.col("kind") == "vlm")
        & pl.col("fine_grained").is_not_null()
        & pl.col("general").is_not_null()
    ).select("label", "fine_grained", "general")
    if data.height == 0:
        raise ValueError("figure 2: no VLM has both a fine-grained and a general average")
    base = alt.Chart(data).encode(
        x=alt.X("general:Q", title="General VQA accuracy (%)", scale=alt.Scale(zero=False)),
        y=alt.Y(
            "fine_grained:Q",
            title="Fine-grained classification accuracy (%)",
            scale=alt.Scale(zero=False),
        ),
        tooltip=["label:N", "general:Q", "fine_grained:Q"],
    )
    points = base.mark_circle(size=70)
    labels = base.mark_text(align="left", dx=6, dy=-6, fontSize=10).encode(text="label:N")
    return alt.layer(points, labels, title=title).properties(width=420, height=320)


def figure3_vlm_vs_encoder(
    models: pl.DataFrame,
    *,
    clip_metric: str = "fine_grained",
    title: str = "VLMs against their CLIP vision encoders (fine-grained classification)",
) -> alt.Chart:
    """Grouped bars: each VLM with a ``clip`` next to that CLIP model's fine-grained average
    (``clip_metric``: "fine_grained" = 5-way, or "n_way")."""
    by_model = {r["model"]: r for r in models.iter_rows(named=True)}
    records = []
    for row in models.filter((pl.col("kind") == "vlm") & pl.col("clip").is_not_null()).iter_rows(
        named=True
    ):
        clip = by_model.get(row["clip"])
        if clip is None:
            raise ValueError(f"figure 3: {row['model']!r} names CLIP {row['clip']!r}, not a model")
        group = f"{row['label']} · {clip['label']}"
        records.append(
            {
                "vlm": group,
                "system": "VLM",
                "model": row["label"],
                "value": row["fine_grained"],
            }
        )
        records.append(
            {
                "vlm": group,
                "system": "CLIP encoder",
                "model": clip["label"],
                "value": clip[clip_metric],
            }
        )
    if not records:
        raise ValueError("figure 3: no VLM names its CLIP encoder")
    data = pl.DataFrame(records)
    return (
        alt.Chart(data, title=title)
        .mark_bar()
        .encode(
            x=alt.X("vlm:N", title=None, sort=None, axis=alt.Axis(labelAngle=-30)),
            xOffset=alt.XOffset("system:N", sort=["VLM", "CLIP encoder"]),
            y=alt.Y("value:Q", axis=ACCURACY_AXIS),
            color=alt.Color("system:N", sort=["VLM", "CLIP encoder"], title=None),
            tooltip=["model:N", "system:N", alt.Tooltip("value:Q", format=".1f")],
        )
        .properties(width=alt.Step(22))
    )


def _context_labels(pairs: pl.DataFrame, factor: str) -> list[str]:
    """Per pair, the shared factor values that vary among the pairs (what sets them apart)."""
    others = [f for f in FACTORS if f != factor and f in pairs.columns]
    varying = [f for f in others if pairs[f].n_unique() > 1]
    if not varying:
        return ["all"] * pairs.height
    return [" · ".join(str(r[f]) for f in varying) for r in pairs.iter_rows(named=True)]


def _change_subtitle(pairs: pl.DataFrame) -> list[str]:
    """One line per change: mean deltas on both averages, as the paper's captions give them."""
    lines = []
    for (f, t), group in pairs.group_by(["from", "to"], maintain_order=True):
        parts = []
        for m in AVERAGES:
            mean = group[f"{m}_delta"].drop_nulls().mean()
            if mean is not None:
                parts.append(f"{_signed(mean)}pp {DELTA_NAMES[m]}")
        lines.append(f"{f} → {t}: {', '.join(parts) or 'no values'} ({group.height} pairs)")
    return lines


def factor_figure(
    pairs: pl.DataFrame,
    factor: str,
    *,
    title: str | None = None,
    order: Sequence[str] | None = None,
) -> alt.Chart:
    """Figures 4-7: for every pair differing only in ``factor``, its values side by side, per
    configuration (the shared factors), on both averages (one panel each); the subtitle gives
    each change's mean delta."""
    chosen = pairs.filter(pl.col("factor") == factor)
    if chosen.height == 0:
        raise ValueError(f"factor figure: no pair differs only in {factor!r}")
    contexts = _context_labels(chosen, factor)
    records = []
    for context, row in zip(contexts, chosen.iter_rows(named=True), strict=True):
        for side in ("from", "to"):
            for m in AVERAGES:
                records.append(
                    {
                        "configuration": context,
                        "value": row[side],
                        "run": row[f"run_{side}"],
                        "average": AVERAGE_NAMES[m],
                        "accuracy": row[f"{m}_{side}"],
                    }
                )
    data = pl.DataFrame(records).unique(maintain_order=True)
    levels_frame = pl.DataFrame({factor: [*chosen["from"], *chosen["to"]]})
    levels = level_order(levels_frame, factor, order)
    header = FACTOR_HEADERS.get(factor, factor)
    title = title or f"Ablating the {FACTOR_NAMES.get(factor, factor)}"
    return (
        alt.Chart(data, title=alt.Title(title, subtitle=_change_subtitle(chosen)))
        .mark_bar()
        .encode(
            x=alt.X(
                "configuration:N",
                title=None,
                sort=list(dict.fromkeys(contexts)),
                axis=alt.Axis(labelAngle=-30),
            ),
            xOffset=alt.XOffset("value:N", sort=levels),
            y=alt.Y("accuracy:Q", axis=ACCURACY_AXIS),
            color=alt.Color("value:N", sort=levels, title=header),
            column=alt.Column("average:N", title=None, sort=list(AVERAGE_NAMES.values())),
            tooltip=["run:N", "value:N", alt.Tooltip("accuracy:Q", format=".1f")],
        )
        .properties(width=alt.Step(16))
    )


def figure8_progression(
    summary: pl.DataFrame,
    *,
    reference: Mapping[str, float] | None = None,
    title: str = "Progression of combined ablation effects",
) -> alt.LayerChart:
    """Figure 8: both averages along the chain of ``summary_table`` rows (x in row order),
    each step labelled with its delta; ``reference`` {label: fine-grained value} draws
    horizontal rules (e.g. the released model the chain falls short of)."""
    if summary.height == 0:
        raise ValueError("figure 8: the summary has no rows")
    steps = summary["label"].to_list()
    records = []
    for row in summary.iter_rows(named=True):
        for m in AVERAGES:
            if row[m] is None:
                continue
            delta = row[f"{m}_delta"]
            value = format_number(row[m])
            text = value if delta is None else f"{value} ({_signed(delta)})"
            records.append(
                {
                    "step": row["label"],
                    "average": AVERAGE_NAMES[m],
                    "accuracy": row[m],
                    "text": text,
                }
            )
    data = pl.DataFrame(records)
    base = alt.Chart(data).encode(
        x=alt.X("step:N", sort=steps, title=None, axis=alt.Axis(labelAngle=-30, labelLimit=400)),
        y=alt.Y("accuracy:Q", axis=ACCURACY_AXIS, scale=alt.Scale(zero=False)),
        color=alt.Color("average:N", sort=list(AVERAGE_NAMES.values()), title=None),
    )
    layers = [
        base.mark_line(point=True),
        base.mark_text(dy=-10, fontSize=10).encode(text="text:N"),
    ]
    if reference:
        rules = pl.DataFrame(
            {
                "reference": [f"{k} ({format_number(v)})" for k, v in reference.items()],
                "accuracy": [float(v) for v in reference.values()],
            }
        )
        rule = alt.Chart(rules).encode(y="accuracy:Q")
        layers.append(rule.mark_rule(strokeDash=[4, 4], color="gray"))
        layers.append(
            rule.mark_text(align="left", dy=-6, x=4, color="gray", fontSize=10).encode(
                text="reference:N"
            )
        )
    return alt.layer(*layers, title=title).properties(width=alt.Step(90), height=300)


def confusion_figure(
    details: Mapping,
    *,
    title: str,
    max_classes: int = MAX_CLASSES,
) -> alt.HConcatChart:
    """Per-class view of one model on one benchmark, from its details JSON
    (``per_class``: [{classname, accuracy (fraction)}], ``confusions``: [{true_class,
    pred_class, count}]): the ``max_classes`` weakest classes' accuracy, and a heatmap of the
    most confused (true, predicted) class pairs."""
    for key in ("per_class", "confusions"):
        if key not in details:
            raise ValueError(f"confusion figure: details lack {key!r}")
    per_class = pl.DataFrame(
        [
            {"classname": r["classname"], "accuracy": 100 * r["accuracy"]}
            for r in details["per_class"]
        ],
        schema={"classname": pl.Utf8, "accuracy": pl.Float64},
    )
    weakest = per_class.sort(["accuracy", "classname"]).head(max_classes)
    bars = (
        alt.Chart(weakest, title=f"Per-class accuracy (weakest {weakest.height})")
        .mark_bar()
        .encode(
            y=alt.Y("classname:N", sort=weakest["classname"].to_list(), title=None),
            x=alt.X("accuracy:Q", axis=ACCURACY_AXIS, scale=alt.Scale(domain=[0, 100])),
            tooltip=["classname:N", alt.Tooltip("accuracy:Q", format=".1f")],
        )
    )
    confusions = pl.DataFrame(
        [
            {"true_class": r["true_class"], "pred_class": r["pred_class"], "count": r["count"]}
            for r in details["confusions"]
        ],
        schema={"true_class": pl.Utf8, "pred_class": pl.Utf8, "count": pl.Int64},
    )
    heat = (
        alt.Chart(confusions, title="Most confused class pairs")
        .mark_rect()
        .encode(
            x=alt.X("pred_class:N", title="Predicted class", axis=alt.Axis(labelAngle=-45)),
            y=alt.Y("true_class:N", title="True class"),
            color=alt.Color("count:Q", title="Questions"),
            tooltip=["true_class:N", "pred_class:N", "count:Q"],
        )
    )
    text = heat.mark_text(fontSize=9).encode(text="count:Q", color=alt.value("black"))
    return alt.hconcat(bars, alt.layer(heat, text), title=title)


def save_chart(
    chart: alt.TopLevelMixin,
    stem: str | Path,
    *,
    formats: Iterable[str] = ("svg", "html"),
    inline: bool = True,
) -> list[Path]:
    """Write ``chart`` to ``stem``.svg / .html / .png (atomically); HTML embeds the Vega
    scripts when ``inline`` (readable offline). Returns the written paths."""
    written = []
    for fmt in formats:
        if fmt not in ("svg", "html", "png"):
            raise ValueError(f"save_chart: unknown format {fmt!r} (svg, html or png)")
        path = Path(f"{stem}.{fmt}")
        with atomic_path(path) as tmp:
            extra = {"inline": inline} if fmt == "html" else {}
            chart.save(str(tmp), format=fmt, **extra)
        written.append(path)
    return written
