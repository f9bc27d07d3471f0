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

from fgvlm import io
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


def placeholder(title: str, message: str) -> alt.Chart:
    """A figure that says why it has nothing to show (a small study lacks what it plots)."""
    data = pl.DataFrame({"text": [message]})
    return (
        alt.Chart(data, title=title)
        .mark_text(fontSize=13)
        .encode(text="text:N")
        .properties(width=420, height=80)
    )


def figure2_fine_vs_general(
    models: pl.DataFrame,
    *,
    general_title: str = "General VQA accuracy (%)",
    title: str = "Fine-grained classification vs general VQA across VLMs",
) -> alt.LayerChart | alt.Chart:
    """Scatter of the hub VLMs of ``models_table``: general (x) vs fine-grained (y), labelled;
    VLMs without a general number are named under the title."""
    vlms = models.filter(pl.col("kind") == "vlm")
    data = vlms.filter(
        pl.col("fine_grained").is_not_null() & pl.col("general").is_not_null()
    ).select("label", "fine_grained", "general")
    missing = vlms.filter(pl.col("general").is_null())["label"].to_list()
    note = [f"Not shown, no {general_title.split(' (')[0]}: {', '.join(missing)}"]
    subtitle = note if missing else []
    if data.height == 0:
        return placeholder(
            alt.Title(title, subtitle=subtitle), "no VLM has both averages in this study"
        )
    base = alt.Chart(data).encode(
        x=alt.X("general:Q", title=general_title, scale=alt.Scale(zero=False)),
        y=alt.Y(
            "fine_grained:Q",
            title="Fine-grained classification accuracy (%)",
            scale=alt.Scale(zero=False),
        ),
        tooltip=["label:N", "general:Q", "fine_grained:Q"],
    )
    points = base.mark_circle(size=70)
    labels = base.mark_text(align="left", dx=6, dy=-6, fontSize=10).encode(text="label:N")
    return alt.layer(points, labels, title=alt.Title(title, subtitle=subtitle)).properties(
        width=420, height=320
    )


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
        return placeholder(title, "no VLM names its CLIP encoder in this study")
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


def _change_subtitle(summary: pl.DataFrame) -> list[str]:
    """One line per summary row (``effects.summarize_effects``): its pair set, the change and
    the mean deltas on both averages, as the paper's captions give them."""
    lines = []
    for row in summary.iter_rows(named=True):
        parts = [
            f"{_signed(row[f'{m}_delta'])}pp {DELTA_NAMES[m]}"
            for m in AVERAGES
            if row[f"{m}_delta"] is not None
        ]
        head = f"{row['selection']}: " if row["selection"] else ""
        lines.append(
            f"{head}{row['from']} → {row['to']}: {', '.join(parts) or 'no values'} "
            f"({row['n_pairs']} pairs)"
        )
    return lines


def factor_figure(
    pairs: pl.DataFrame,
    factor: str,
    *,
    summary: pl.DataFrame | None = None,
    title: str | None = None,
    order: Sequence[str] | None = None,
) -> alt.FacetChart | alt.Chart:
    """Figures 4-7: for every pair differing only in ``factor``, its values side by side, per
    configuration (the shared factors), on both averages (one panel each). Error bars on the
    changed bar: the paired-bootstrap 95% interval of the change (where answers gave one).
    Subtitle: ``summary`` rows of ``factor`` (effects_summary.csv), else each change's mean."""
    title = title or f"Ablating the {FACTOR_NAMES.get(factor, factor)}"
    chosen = pairs.filter(pl.col("factor") == factor)
    if chosen.height == 0:
        return placeholder(title, "no one-factor pair in this study")
    if summary is None:
        from fgvlm.report.effects import summarize_effects

        summary = summarize_effects(chosen)
    summary = summary.filter(pl.col("factor") == factor)
    contexts = _context_labels(chosen, factor)
    records = []
    for context, row in zip(contexts, chosen.iter_rows(named=True), strict=True):
        for side in ("from", "to"):
            for m in AVERAGES:
                value, low, high = row[f"{m}_{side}"], None, None
                if side == "to" and row.get(f"{m}_ci_low") is not None and value is not None:
                    # the interval of the change, drawn around the changed run's accuracy
                    low = value + row[f"{m}_ci_low"] - row[f"{m}_delta"]
                    high = value + row[f"{m}_ci_high"] - row[f"{m}_delta"]
                records.append(
                    {
                        "configuration": context,
                        "value": row[side],
                        "run": row[f"run_{side}"],
                        "average": AVERAGE_NAMES[m],
                        "accuracy": value,
                        "ci_low": low,
                        "ci_high": high,
                    }
                )
    schema = {
        "configuration": pl.Utf8,
        "value": pl.Utf8,
        "run": pl.Utf8,
        "average": pl.Utf8,
        "accuracy": pl.Float64,
        "ci_low": pl.Float64,
        "ci_high": pl.Float64,
    }
    data = pl.DataFrame(records, schema=schema, orient="row").unique(maintain_order=True)
    levels_frame = pl.DataFrame({factor: [*chosen["from"], *chosen["to"]]})
    levels = level_order(levels_frame, factor, order)
    header = FACTOR_HEADERS.get(factor, factor)
    x = alt.X(
        "configuration:N",
        title=None,
        sort=list(dict.fromkeys(contexts)),
        axis=alt.Axis(labelAngle=-30),
    )
    offset = alt.XOffset("value:N", sort=levels)
    bars = (
        alt.Chart()
        .mark_bar()
        .encode(
            x=x,
            xOffset=offset,
            y=alt.Y("accuracy:Q", axis=ACCURACY_AXIS),
            color=alt.Color("value:N", sort=levels, title=header),
            tooltip=["run:N", "value:N", alt.Tooltip("accuracy:Q", format=".1f")],
        )
    )
    errors = (
        alt.Chart()
        .transform_filter("isValid(datum.ci_low)")
        .mark_rule(color="black")
        .encode(
            x=x,
            xOffset=offset,
            y=alt.Y("ci_low:Q"),
            y2="ci_high:Q",
            tooltip=[
                "run:N",
                alt.Tooltip("ci_low:Q", format=".1f", title="95% CI low"),
                alt.Tooltip("ci_high:Q", format=".1f", title="95% CI high"),
            ],
        )
    )
    subtitle = _change_subtitle(summary) + [
        "error bars: paired-bootstrap 95% interval of the change"
    ]
    return (
        alt.layer(bars, errors, data=data)
        .properties(width=alt.Step(16))
        .facet(
            column=alt.Column("average:N", title=None, sort=list(AVERAGE_NAMES.values())),
            title=alt.Title(title, subtitle=subtitle),
        )
    )


def figure8_progression(
    summary: pl.DataFrame,
    *,
    reference: Mapping[str, float] | None = None,
    title: str = "Progression of combined ablation effects",
) -> alt.LayerChart | alt.Chart:
    """Figure 8: both averages along the chain of ``summary_table`` rows (x in row order),
    each step labelled with its delta; ``reference`` {label: fine-grained value} draws
    horizontal rules (e.g. the released model the chain falls short of)."""
    if summary.height == 0:
        return placeholder(title, "no Table 1 chain in this study")
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


def read_leaderboard(path: str | Path) -> dict[str, float]:
    """{Hub repo: OpenVLM Leaderboard average} from the leaderboard CSV (lines starting with
    "#" are its provenance); rows without a number are left out."""
    frame = pl.read_csv(path, comment_prefix="#", schema_overrides={"average": pl.Float64})
    return {
        r["repo"]: r["average"] for r in frame.iter_rows(named=True) if r["average"] is not None
    }


def make_figures(
    inputs: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    report: Mapping | None = None,
    repos: Mapping[str, str] | None = None,
    row_encoders: Mapping[str, str] | None = None,
    confusion_title: str,
) -> list[Path]:
    """Figures 2-8 and a per-class confusion view, as SVG and HTML in ``out_dir``, from the
    declared ``inputs``: ablations, effects, effects_summary, table1, models (CSVs), details
    (JSON) and, where Figure 2's x-axis is the leaderboard's, leaderboard (CSV).

    ``report``: the config's ``report:`` definitions (figure2.general: leaderboard | measured;
    figure8.reference: the run or Table 1 model drawn as a reference line). ``repos`` maps
    hub VLMs to their repo (the leaderboard's key). ``row_encoders`` maps trained ablation
    runs to the CLIP model of their vision tower, so Figure 3 sets them beside it too."""
    report, out_dir = dict(report or {}), Path(out_dir)
    encoders = dict(row_encoders or {})
    models = pl.read_csv(inputs["models"], schema_overrides={"clip": pl.Utf8})
    ablations = pl.read_csv(inputs["ablations"], infer_schema_length=None)
    trained = ablations.filter(pl.col("run").is_in(list(encoders))).select(
        model=pl.col("run"),
        label=pl.col("run"),
        kind=pl.lit("vlm"),
        clip=pl.col("run").replace_strict(encoders, default=None, return_dtype=pl.Utf8),
        fine_grained=pl.col("classification").cast(pl.Float64),
        general=pl.col("vlm").cast(pl.Float64),
        n_way=pl.lit(None, dtype=pl.Float64),
    )
    with_rows = pl.concat([models.select(trained.columns), trained], how="vertical_relaxed")
    general_title = "General VQA accuracy (%)"
    if (report.get("figure2") or {}).get("general", "measured") == "leaderboard":
        board = read_leaderboard(inputs["leaderboard"])
        by_repo = {m: board.get(r) for m, r in (repos or {}).items()}
        models = models.with_columns(
            pl.col("model")
            .replace_strict(by_repo, default=None, return_dtype=pl.Float64)
            .alias("general")
        )
        general_title = "OpenVLM Leaderboard average, 8 benchmarks (%)"
    strings = dict.fromkeys(("from", "to", "run_from", "run_to", "factor"), pl.Utf8)
    pairs = pl.read_csv(inputs["effects"], infer_schema_length=None, schema_overrides=strings)
    summary = pl.read_csv(
        inputs["effects_summary"],
        infer_schema_length=None,
        schema_overrides={**strings, "selection": pl.Utf8},
    )
    table1 = pl.read_csv(inputs["table1"], infer_schema_length=None)
    reference = None
    ref_name = (report.get("figure8") or {}).get("reference")
    if ref_name:
        hit = table1.filter(pl.col("run") == ref_name)
        source = hit if hit.height else ablations.filter(pl.col("run") == ref_name)
        if source.height == 0 or source["classification"][0] is None:
            raise ValueError(f"figure 8: reference {ref_name!r} has no Table 1 or ablation row")
        label = hit["label"][0] if hit.height else ref_name
        reference = {label: float(source["classification"][0])}
    charts = {
        "figure2": figure2_fine_vs_general(models, general_title=general_title),
        "figure3": figure3_vlm_vs_encoder(with_rows),
        **{
            name: factor_figure(pairs, factor, summary=summary)
            for name, factor in FIGURE_FACTORS.items()
        },
        "figure8": figure8_progression(table1.filter(pl.col("chain")), reference=reference),
        "confusion": confusion_figure(io.read_json(inputs["details"]), title=confusion_title),
    }
    written = []
    for name, chart in charts.items():
        written += save_chart(chart, out_dir / name)
    return written
