"""The paper's tables as data frames, and their Markdown and LaTeX renderings.

``ablations_table`` builds the contract table ``results/tables/ablations.csv`` (one row per
ablation: the factors, per-benchmark accuracies in percent, the ``classification`` and ``vlm``
averages); ``summary_table`` the progression of Table 1; ``models_table`` the Section 3 models
(hub VLMs and CLIP baselines). The ``*_view`` functions give frames with the paper's headers,
which ``to_markdown`` and ``to_latex`` render with one decimal.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal

import polars as pl

FACTORS = ("vision_encoder", "llm", "arch", "pt_data", "ft_data", "updating")
FINE_GRAINED = ("imagenet", "flowers", "pets", "food")
GENERAL = ("mmbench", "mmmu", "mmstar")
AVERAGES = ("classification", "vlm")  # classification: fine-grained mean; vlm: general mean
METRIC_COLUMNS = ("model", "benchmark", "accuracy")

# Headers as the paper prints them: Tables 2-4, then Table 1 (which drops Updating).
FACTOR_HEADERS = {
    "vision_encoder": "Vision Encoder",
    "llm": "LLM",
    "arch": "Arch",
    "pt_data": "PT Data",
    "ft_data": "FT Data",
    "updating": "Updating",
}
SUMMARY_HEADERS = {
    "vision_encoder": "Vision Encoder",
    "llm": "LLM",
    "arch": "Arch.",
    "pt_data": "Pretraining Data",
    "ft_data": "Finetuning Data",
}
AVERAGE_HEADERS = {"classification": "Classification", "vlm": "VLM"}
SUMMARY_AVERAGE_HEADERS = {
    "classification": "Fine-grained Classification",
    "vlm": "General VQA",
}
BENCHMARK_HEADERS = {
    "imagenet": "ImageNet",
    "flowers": "Flowers",
    "pets": "Pets",
    "food": "Food",
    "mmbench": "MMBench",
    "mmmu": "MMMU",
    "mmstar": "MMStar",
}
MISSING_CELL = "-"
# A rendered cell that holds a number, possibly with a delta: "59.3", "57.9 (+5.1)".
_NUMERIC_CELL = re.compile(r"^[-+]?\d+(\.\d+)?( \([-+]\d+(\.\d+)?\))?$")


# --- the ablation table ------------------------------------------------------------------------


def _require_columns(frame: pl.DataFrame, columns: Iterable[str], name: str) -> None:
    """Raise ValueError naming ``name`` and the columns it lacks."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {', '.join(missing)}")


def check_benchmark_lists(fine_grained: Sequence[str], general: Sequence[str]) -> None:
    """Both lists: unique, disjoint, and no name that clashes with another table column."""
    reserved = {"run", *FACTORS, *AVERAGES}
    seen: set[str] = set()
    for name in [*fine_grained, *general]:
        if name in reserved:
            raise ValueError(f"benchmark {name!r} clashes with a table column of that name")
        if name in seen:
            raise ValueError(f"benchmark {name!r} is listed twice (fine-grained and general)")
        seen.add(name)


def _strict_mean(columns: Sequence[str]) -> pl.Expr:
    """Mean of ``columns`` per row, null as soon as one is null (never a partial mean)."""
    if not columns:
        return pl.lit(None, dtype=pl.Float64)
    any_null = pl.any_horizontal([pl.col(c).is_null() for c in columns])
    total = pl.sum_horizontal([pl.col(c) for c in columns])
    return pl.when(any_null).then(None).otherwise(total / len(columns))


def _check_metrics(metrics: pl.DataFrame, name: str) -> pl.DataFrame:
    """The long metrics table with a float accuracy; duplicates and bad values rejected."""
    _require_columns(metrics, METRIC_COLUMNS, name)
    metrics = metrics.with_columns(pl.col("accuracy").cast(pl.Float64))
    dup = metrics.filter(pl.struct("model", "benchmark").is_duplicated())
    if dup.height:
        row = dup.row(0, named=True)
        raise ValueError(f"{name}: {row['model']!r} on {row['benchmark']!r} appears more than once")
    for row in metrics.iter_rows(named=True):
        value = row["accuracy"]
        if value is None or not math.isfinite(value) or not 0 <= value <= 100:
            raise ValueError(
                f"{name}: accuracy of {row['model']!r} on {row['benchmark']!r} is {value!r}; "
                "expected a percentage in [0, 100]"
            )
    return metrics


def _wide(
    metrics: pl.DataFrame, keys: pl.DataFrame, benchmarks: Sequence[str], value: str
) -> pl.DataFrame:
    """``keys`` (one ``model`` per row, in order) with one ``value`` column per benchmark."""
    out = keys
    for bench in benchmarks:
        part = metrics.filter(pl.col("benchmark") == bench).select(
            "model", pl.col(value).alias(bench)
        )
        out = out.join(part, on="model", how="left", maintain_order="left")
    return out


def ablations_table(
    metrics: pl.DataFrame,
    runs: pl.DataFrame,
    *,
    fine_grained: Sequence[str],
    general: Sequence[str],
) -> pl.DataFrame:
    """The ablation table: one row per run, accuracies in percent.

    In: ``metrics`` long (model, benchmark, accuracy in percent; ``model`` is a run name),
    ``runs`` (run + the ``FACTORS`` columns, one row per run, in table order).
    Out: run, vision_encoder, llm, arch, pt_data, ft_data, updating, the ``fine_grained``
    benchmarks, ``classification`` (their mean), the ``general`` benchmarks, ``vlm`` (their
    mean). Means are of unrounded values; a row missing any benchmark of an average gets a
    null average. Runs without metrics keep null cells; metrics of unknown runs, duplicates
    and benchmarks in neither list raise ValueError.
    """
    check_benchmark_lists(fine_grained, general)
    _require_columns(runs, ("run", *FACTORS), "runs")
    dup = runs.filter(pl.col("run").is_duplicated())
    if dup.height:
        raise ValueError(f"runs: run {dup['run'][0]!r} appears more than once")
    for factor in ("run", *FACTORS):
        blank = runs.filter(pl.col(factor).is_null() | (pl.col(factor).cast(pl.Utf8) == ""))
        if blank.height:
            raise ValueError(f"runs: row {blank.row(0, named=True)} has no {factor}")
    metrics = _check_metrics(metrics, "metrics")
    known = set(runs["run"])
    unknown = metrics.filter(~pl.col("model").is_in(list(known)))
    if unknown.height:
        raise ValueError(
            f"metrics: model {unknown['model'][0]!r} is not a run of the runs table "
            f"(runs: {', '.join(runs['run'])})"
        )
    listed = [*fine_grained, *general]
    stray = metrics.filter(~pl.col("benchmark").is_in(listed))
    if stray.height:
        raise ValueError(
            f"metrics: benchmark {stray['benchmark'][0]!r} is neither fine-grained "
            f"({', '.join(fine_grained)}) nor general ({', '.join(general)})"
        )
    keys = runs.select(pl.col("run").cast(pl.Utf8).alias("model"))
    wide = _wide(metrics, keys, listed, "accuracy").rename({"model": "run"})
    factors = runs.select("run", *[pl.col(f).cast(pl.Utf8) for f in FACTORS])
    table = factors.join(wide, on="run", how="left", maintain_order="left")
    table = table.with_columns(
        _strict_mean(fine_grained).alias("classification"),
        _strict_mean(general).alias("vlm"),
    )
    return table.select(
        "run", *FACTORS, *fine_grained, "classification", *general, "vlm"
    ).with_columns(pl.col([*listed, *AVERAGES]).cast(pl.Float64))


def benchmark_groups(table: pl.DataFrame) -> tuple[list[str], list[str]]:
    """(fine-grained, general) benchmark columns of an ablation table, read off its layout:
    the columns between the factors and ``classification``, then up to ``vlm``."""
    _require_columns(table, ("run", *FACTORS, *AVERAGES), "ablation table")
    columns = table.columns
    start = max(columns.index(f) for f in FACTORS) + 1
    middle, end = columns.index("classification"), columns.index("vlm")
    return columns[start:middle], columns[middle + 1 : end]


# --- one-factor neighbours and the Table 1 progression -----------------------------------------


def differing_factors(a: Mapping, b: Mapping, factors: Sequence[str] = FACTORS) -> list[str]:
    """The factors whose values differ between rows ``a`` and ``b``."""
    return [f for f in factors if a[f] != b[f]]


def progression_chain(
    table: pl.DataFrame,
    *,
    metric: str = "classification",
    start: str | None = None,
    end: str | None = None,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Runs from a weak to a strong configuration, changing one factor per step (Figure 8).

    Steps join rows that differ in exactly one factor; rows with a null ``metric`` and
    ``exclude``d runs take no part. ``start`` defaults to the row with the lowest ``metric``,
    ``end`` to the highest-``metric`` row reachable from it. Among the shortest paths the one
    whose smallest step is largest wins (the most even ascent), then the earliest rows.
    """
    excluded = set(exclude)
    rows = [
        r for r in table.iter_rows(named=True) if r[metric] is not None and r["run"] not in excluded
    ]
    if not rows:
        raise ValueError(f"progression: no row has a {metric} value")
    index = {r["run"]: i for i, r in enumerate(rows)}
    for name in (start, end):
        if name is not None and name not in index:
            raise ValueError(f"progression: run {name!r} is not in the table (or has no {metric})")
    first = index[start] if start else min(range(len(rows)), key=lambda i: rows[i][metric])
    neighbours = [
        [j for j in range(len(rows)) if len(differing_factors(rows[i], rows[j])) == 1]
        for i in range(len(rows))
    ]
    # Breadth-first layers; each node keeps its best (smallest step, path) from the layer before.
    best: dict[int, tuple[float, list[int]]] = {first: (math.inf, [first])}
    layer = [first]
    while layer:
        nxt: dict[int, tuple[float, list[int]]] = {}
        for i in layer:
            low, path = best[i]
            for j in neighbours[i]:
                if j in best:
                    continue
                step = rows[j][metric] - rows[i][metric]
                cand = (min(low, step), [*path, j])
                old = nxt.get(j)
                if old is None or cand[0] > old[0] or (cand[0] == old[0] and cand[1] < old[1]):
                    nxt[j] = cand
        best.update(nxt)
        layer = sorted(nxt)
    if end is not None:
        if index[end] not in best:
            raise ValueError(f"progression: {end!r} cannot be reached from {rows[first]['run']!r}")
        last = index[end]
    else:
        last = max(best, key=lambda i: (rows[i][metric], -i))
    return [rows[i]["run"] for i in best[last][1]]


def chain_after(chain: Sequence[str]) -> dict[str, str]:
    """``after`` for ``summary_table``: each run of ``chain`` compared with the one before it."""
    return {b: a for a, b in zip(chain, chain[1:], strict=False)}


def _change_text(row: Mapping, ref: Mapping, factors: Sequence[str]) -> str:
    changed = [f for f in differing_factors(ref, row, factors) if ref[f] and row[f]]
    return "; ".join(f"{FACTOR_HEADERS[f]}: {ref[f]} → {row[f]}" for f in changed)


def summary_table(
    table: pl.DataFrame,
    runs: Sequence[str],
    *,
    after: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """Table 1: chosen rows in order, each optionally compared with an earlier configuration.

    In: the ablation table; ``runs`` to show; ``after`` maps a run to the run its deltas are
    taken against (see ``chain_after``); ``labels`` the "Model/Ablation" names (default: the
    change against ``after`` as "LLM: Vicuna-7B → Qwen2-7B", else the run name).
    Out: label, run, the factors, classification, vlm, after, change,
    classification_delta, vlm_delta (percentage points, null without ``after``).
    """
    after = dict(after or {})
    labels = dict(labels or {})
    by_run = {r["run"]: r for r in table.iter_rows(named=True)}
    records = []
    for run in runs:
        if run not in by_run:
            raise ValueError(f"summary: run {run!r} is not in the ablation table")
        row = by_run[run]
        ref_name = after.get(run)
        if ref_name is not None and ref_name not in by_run:
            raise ValueError(f"summary: {run!r} is compared with unknown run {ref_name!r}")
        ref = by_run.get(ref_name) if ref_name else None
        change = _change_text(row, ref, FACTORS) if ref else None
        record = {
            "label": labels.get(run) or change or run,
            "run": run,
            **{f: row[f] for f in FACTORS},
            **{m: row[m] for m in AVERAGES},
            "after": ref_name,
            "change": change,
        }
        for m in AVERAGES:
            ok = ref is not None and row[m] is not None and ref[m] is not None
            record[f"{m}_delta"] = row[m] - ref[m] if ok else None
        records.append(record)
    schema = {
        "label": pl.Utf8,
        "run": pl.Utf8,
        **dict.fromkeys(FACTORS, pl.Utf8),
        **dict.fromkeys(AVERAGES, pl.Float64),
        "after": pl.Utf8,
        "change": pl.Utf8,
        **{f"{m}_delta": pl.Float64 for m in AVERAGES},
    }
    return pl.DataFrame(records, schema=schema, orient="row")


def model_averages(
    metrics: pl.DataFrame, *, fine_grained: Sequence[str], general: Sequence[str]
) -> pl.DataFrame:
    """Per model of long ``metrics``: ``classification`` and ``vlm`` (strict means)."""
    metrics = _check_metrics(metrics, "metrics")
    keys = metrics.select(pl.col("model").unique(maintain_order=True))
    wide = _wide(metrics, keys, [*fine_grained, *general], "accuracy")
    return wide.select(
        pl.col("model").alias("run"),
        _strict_mean(fine_grained).cast(pl.Float64).alias("classification"),
        _strict_mean(general).cast(pl.Float64).alias("vlm"),
    )


def table1(
    table: pl.DataFrame,
    entries: Sequence[Mapping],
    *,
    released: pl.DataFrame | None = None,
    exclude: Iterable[str] = (),
) -> pl.DataFrame:
    """Table 1 as the config's ``report.table1`` defines it: one row per entry, in order.

    An entry names an ablation ``run`` or a released ``model`` (its averages from
    ``released``: run, classification, vlm; its ``factors`` from the entry), a ``label``, and
    whether it is a ``chain`` step (compared with the chain step before it: Figure 8's
    progression), ``released`` (bold) or compared ``after`` another entry's run.
    Without entries: the ``progression_chain`` from the weakest row (``exclude``d runs aside).
    Out: ``summary_table``'s columns, then chain and released (bool).
    """
    if not entries:
        chain = progression_chain(table, exclude=exclude)
        entries = [{"run": run, "chain": True} for run in chain]
    rows = table.select("run", *FACTORS, *AVERAGES)
    extra = []
    for entry in entries:
        if "model" in entry:
            factors = dict(entry.get("factors") or {})
            values = {}
            if released is not None:
                hit = released.filter(pl.col("run") == entry["model"])
                values = hit.row(0, named=True) if hit.height else {}
            extra.append(
                {
                    "run": entry["model"],
                    **{f: factors.get(f) for f in FACTORS},
                    **{m: values.get(m) for m in AVERAGES},
                }
            )
    if extra:
        schema = {"run": pl.Utf8, **dict.fromkeys(FACTORS, pl.Utf8)}
        schema.update(dict.fromkeys(AVERAGES, pl.Float64))
        rows = pl.concat([rows, pl.DataFrame(extra, schema=schema, orient="row")])
    names = [entry.get("run") or entry["model"] for entry in entries]
    after: dict[str, str] = {}
    previous = None
    for name, entry in zip(names, entries, strict=True):
        if entry.get("chain"):
            if previous is not None:
                after[name] = previous
            previous = name
        if entry.get("after"):
            after[name] = entry["after"]
    labels = {n: e["label"] for n, e in zip(names, entries, strict=True) if e.get("label")}
    summary = summary_table(rows, names, after=after, labels=labels)
    return summary.with_columns(
        pl.Series("chain", [bool(e.get("chain")) for e in entries], dtype=pl.Boolean),
        pl.Series("released", [bool(e.get("released")) for e in entries], dtype=pl.Boolean),
    )


# --- Section 3: released VLMs and CLIP baselines -----------------------------------------------


def models_table(
    vlm_metrics: pl.DataFrame,
    clip_metrics: pl.DataFrame,
    *,
    fine_grained: Sequence[str],
    general: Sequence[str],
    labels: Mapping[str, str] | None = None,
    encoders: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """Section 3's models: hub VLMs (fine-grained and general averages) and CLIP baselines.

    In: ``vlm_metrics`` long (model, benchmark, accuracy in percent); ``clip_metrics`` long
    (model, benchmark, accuracy = 5-way, nway_accuracy = N-way, percent) on the fine-grained
    benchmarks; ``labels`` display names; ``encoders`` maps a VLM to the CLIP model behind its
    vision tower (a ``clip_metrics`` model, for Figure 3).
    Out: model, label, kind ("vlm" | "clip"), clip, fine_grained (5-way mean), general (VLMs),
    n_way (CLIPs); strict means (null when a benchmark is missing). VLMs first, then CLIPs,
    each in order of first appearance.
    """
    check_benchmark_lists(fine_grained, general)
    labels, encoders = dict(labels or {}), dict(encoders or {})
    vlm_metrics = _check_metrics(vlm_metrics, "VLM metrics")
    clip_metrics = _check_metrics(clip_metrics, "CLIP metrics")
    _require_columns(clip_metrics, ("nway_accuracy",), "CLIP metrics")
    clip_metrics = clip_metrics.with_columns(pl.col("nway_accuracy").cast(pl.Float64))
    vlm_keys = vlm_metrics.select(pl.col("model").unique(maintain_order=True))
    clip_keys = clip_metrics.select(pl.col("model").unique(maintain_order=True))
    vlms = _wide(vlm_metrics, vlm_keys, [*fine_grained, *general], "accuracy").select(
        "model",
        pl.lit("vlm").alias("kind"),
        _strict_mean(fine_grained).alias("fine_grained"),
        _strict_mean(general).alias("general"),
        pl.lit(None, dtype=pl.Float64).alias("n_way"),
    )
    five = _wide(clip_metrics, clip_keys, fine_grained, "accuracy")
    nway = _wide(clip_metrics, clip_keys, fine_grained, "nway_accuracy")
    clips = (
        five.select("model", _strict_mean(fine_grained).alias("fine_grained"))
        .join(
            nway.select("model", _strict_mean(fine_grained).alias("n_way")),
            on="model",
            maintain_order="left",
        )
        .select(
            "model",
            pl.lit("clip").alias("kind"),
            "fine_grained",
            pl.lit(None, dtype=pl.Float64).alias("general"),
            "n_way",
        )
    )
    out = pl.concat([vlms, clips], how="vertical")
    for model in encoders.values():
        if model not in set(clips["model"]):
            raise ValueError(f"models: encoder {model!r} has no CLIP metrics")
    return out.select(
        "model",
        pl.col("model").replace_strict(labels, default=pl.col("model")).alias("label"),
        "kind",
        pl.col("model").replace_strict(encoders, default=None, return_dtype=pl.Utf8).alias("clip"),
        pl.col(["fine_grained", "general", "n_way"]).cast(pl.Float64),
    )


# --- views with the paper's headers ------------------------------------------------------------


def _factor_view(table: pl.DataFrame, with_run: bool) -> list[pl.Expr]:
    exprs = [pl.col("run").alias("Run")] if with_run else []
    return exprs + [pl.col(f).alias(FACTOR_HEADERS[f]) for f in FACTORS]


def aggregated_view(table: pl.DataFrame, *, with_run: bool = False) -> pl.DataFrame:
    """Table 2: the factors, then the Classification and VLM averages."""
    return table.select(
        *_factor_view(table, with_run),
        *[pl.col(m).alias(AVERAGE_HEADERS[m]) for m in AVERAGES],
    )


def benchmarks_view(
    table: pl.DataFrame,
    benchmarks: Sequence[str],
    *,
    labels: Mapping[str, str] | None = None,
    with_run: bool = False,
) -> pl.DataFrame:
    """Tables 3 (general benchmarks) and 4 (fine-grained): the factors, then each benchmark."""
    names = {**BENCHMARK_HEADERS, **dict(labels or {})}
    return table.select(
        *_factor_view(table, with_run),
        *[pl.col(b).alias(names.get(b, b)) for b in benchmarks],
    )


def _with_delta(value: float | None, delta: float | None) -> str | None:
    """'57.9 (+5.1)'; the value alone without a delta; None without a value."""
    if value is None:
        return None
    if delta is None:
        return _number(value)
    return f"{_number(value)} ({_signed(delta)})"


def format_number(value: float, *, signed: bool = False) -> str:
    """``value`` to one decimal, half away from zero once float noise below 1e-6 is dropped
    (so 61.65 prints 61.7, as the paper rounds); never "-0.0"."""
    exact = Decimal(repr(round(value, 6))).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    if exact == 0:
        exact = abs(exact)
    return f"{exact:+}" if signed else f"{exact}"


def _number(value: float) -> str:
    return format_number(value)


def _signed(value: float) -> str:
    return format_number(value, signed=True)


def summary_view(summary: pl.DataFrame) -> pl.DataFrame:
    """Table 1: Model/Ablation, the factors (no Updating), both averages with deltas."""
    records = []
    for row in summary.iter_rows(named=True):
        record = {"Model/Ablation": row["label"]}
        record.update({h: row[f] for f, h in SUMMARY_HEADERS.items()})
        for m, header in SUMMARY_AVERAGE_HEADERS.items():
            record[header] = _with_delta(row[m], row[f"{m}_delta"])
        records.append(record)
    columns = ["Model/Ablation", *SUMMARY_HEADERS.values(), *SUMMARY_AVERAGE_HEADERS.values()]
    return pl.DataFrame(records, schema=dict.fromkeys(columns, pl.Utf8), orient="row")


# --- renderings --------------------------------------------------------------------------------


def _cells(frame: pl.DataFrame) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, rendered cells (floats to one decimal, nulls as '-') and right-alignment."""
    rows = [
        [
            MISSING_CELL if v is None else (_number(v) if isinstance(v, float) else str(v))
            for v in row
        ]
        for row in frame.iter_rows()
    ]
    right = []
    for i, dtype in enumerate(frame.dtypes):
        values = [r[i] for r in rows if r[i] != MISSING_CELL]
        numeric = dtype.is_numeric() or (values and all(_NUMERIC_CELL.match(v) for v in values))
        right.append(bool(numeric))
    return list(frame.columns), rows, right


def to_markdown(frame: pl.DataFrame, caption: str, *, bold_rows: Iterable[int] = ()) -> str:
    """A pipe table with a pandoc caption line ("Table: ...") above it; numbers to 1 decimal,
    numeric columns right-aligned, rows listed in ``bold_rows`` in bold."""
    headers, rows, right = _cells(frame)
    bold = set(bold_rows)
    lines = [f"Table: {caption}", "", "| " + " | ".join(headers) + " |"]
    lines.append("| " + " | ".join("---:" if r else "---" for r in right) + " |")
    for i, row in enumerate(rows):
        cells = [f"**{c}**" if i in bold else c for c in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "→": r"$\rightarrow$",
}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(
    frame: pl.DataFrame, caption: str, label: str, *, bold_rows: Iterable[int] = ()
) -> str:
    """A booktabs ``table`` environment with caption and label; numbers to 1 decimal, numeric
    columns right-aligned, rows listed in ``bold_rows`` in bold."""
    headers, rows, right = _cells(frame)
    bold = set(bold_rows)
    spec = "".join("r" if r else "l" for r in right)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(caption)}}}",
        rf"\label{{{label}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(latex_escape(h) for h in headers) + r" \\",
        r"\midrule",
    ]
    for i, row in enumerate(rows):
        cells = [latex_escape(c) for c in row]
        if i in bold:
            cells = [rf"\textbf{{{c}}}" for c in cells]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
