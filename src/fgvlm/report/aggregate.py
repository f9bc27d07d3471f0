"""From per-benchmark numbers to the report's tables: ``fgvlm aggregate`` and the DAG's
aggregation share these functions.

``aggregate`` reads a long CSV ``model,benchmark,accuracy`` (percent; optional ``group``:
fine_grained | general) and a runs CSV (``run`` + the factor columns), so numbers from anywhere
(a paper, another toolkit) aggregate the same way. ``collect_metrics`` and ``collect_paired``
read the DAG's ``results/metrics`` and ``results/predictions`` into the same shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import polars.selectors as cs
from tqdm import tqdm

from fgvlm import io
from fgvlm.config import factor_labels, trained_rows
from fgvlm.report import effects as fe
from fgvlm.report import tables as ft

log = logging.getLogger(__name__)

GROUPS = ("fine_grained", "general")
CSV_DECIMALS = 6  # percentages to 1e-6 pp: exact enough, and no float noise in the CSV
CAPTIONS = {
    "table1": (
        "Summary of the ablation progression: one factor changed per row, deltas against the "
        "row before in parentheses.",
        "tab:summary",
    ),
    "table2": ("Detailed results of model ablations.", "tab:ablations"),
    "table3": ("Detailed results of model ablations on general VQA benchmarks.", "tab:general"),
    "table4": (
        "Detailed results of model ablations on fine-grained classification benchmarks.",
        "tab:fine_grained",
    ),
}


# --- reading the CSV inputs --------------------------------------------------------------------


def _read_text_csv(path: Path, required: Sequence[str]) -> pl.DataFrame:
    """A CSV read as text (no type guessing), its required columns checked, cells stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        frame = pl.read_csv(path, infer_schema=False)
    except pl.exceptions.PolarsError as err:
        raise ValueError(f"{path}: not a readable CSV ({err})") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(frame.columns)})"
        )
    frame = frame.with_columns(pl.col(pl.Utf8).str.strip_chars())
    for column in required:
        blank = frame.with_row_index().filter(pl.col(column).is_null() | (pl.col(column) == ""))
        if blank.height:
            raise ValueError(f"{path}: line {blank['index'][0] + 2}: empty {column!r}")
    return frame


def _first_duplicate(frame: pl.DataFrame, keys: Sequence[str]) -> tuple[int, int] | None:
    """(line of the first repeat, line it repeats) for duplicated ``keys``, else None."""
    seen: dict[tuple, int] = {}
    for i, row in enumerate(frame.select(keys).iter_rows()):
        if row in seen:
            return i + 2, seen[row]
        seen[row] = i + 2
    return None


def read_metrics_csv(path: str | Path) -> pl.DataFrame:
    """The long metrics CSV: model, benchmark, accuracy (percent, float)[, group].

    Errors name the file and line: missing columns, empty cells, non-numeric accuracies,
    a (model, benchmark) given twice, an unknown group.
    """
    path = Path(path)
    frame = _read_text_csv(path, ft.METRIC_COLUMNS)
    numbers = frame["accuracy"].cast(pl.Float64, strict=False)
    bad = frame.with_row_index().filter(numbers.is_null() | numbers.is_nan())
    if bad.height:
        raise ValueError(
            f"{path}: line {bad['index'][0] + 2}: accuracy {bad['accuracy'][0]!r} is not a number"
        )
    frame = frame.with_columns(numbers.alias("accuracy"))
    dup = _first_duplicate(frame, ["model", "benchmark"])
    if dup:
        raise ValueError(f"{path}: line {dup[0]}: model and benchmark repeat line {dup[1]}")
    if "group" in frame.columns:
        wrong = frame.with_row_index().filter(~pl.col("group").is_in(GROUPS))
        if wrong.height:
            raise ValueError(
                f"{path}: line {wrong['index'][0] + 2}: group {wrong['group'][0]!r} is not "
                f"one of {', '.join(GROUPS)}"
            )
    return frame


def read_runs_csv(path: str | Path) -> pl.DataFrame:
    """The runs CSV: run + the six factor columns (extra columns are kept, unused).

    Errors name the file and line: missing columns, empty cells, a run given twice.
    """
    path = Path(path)
    frame = _read_text_csv(path, ("run", *ft.FACTORS))
    dup = _first_duplicate(frame, ["run"])
    if dup:
        raise ValueError(f"{path}: line {dup[0]}: run repeats line {dup[1]}")
    return frame


def benchmark_lists(
    metrics: pl.DataFrame,
    fine_grained: Sequence[str] | None = None,
    general: Sequence[str] | None = None,
    *,
    source: str = "metrics",
) -> tuple[list[str], list[str]]:
    """The (fine-grained, general) benchmark lists: as given; else from the ``group`` column
    (in order of first appearance); else the paper's. Every benchmark of ``metrics`` must be
    in one of them."""
    if fine_grained is None and general is None and "group" in metrics.columns:
        pairs = metrics.select("benchmark", "group").unique(maintain_order=True)
        clash = pairs.filter(pl.col("benchmark").is_duplicated())
        if clash.height:
            raise ValueError(f"{source}: benchmark {clash['benchmark'][0]!r} is in both groups")
        fine = pairs.filter(pl.col("group") == "fine_grained")["benchmark"].to_list()
        gen = pairs.filter(pl.col("group") == "general")["benchmark"].to_list()
    else:
        fine = list(ft.FINE_GRAINED if fine_grained is None else fine_grained)
        gen = list(ft.GENERAL if general is None else general)
    ft.check_benchmark_lists(fine, gen)
    listed = set(fine) | set(gen)
    for i, bench in enumerate(metrics["benchmark"]):
        if bench not in listed:
            raise ValueError(
                f"{source}: line {i + 2}: benchmark {bench!r} is neither fine-grained "
                f"({', '.join(fine)}) nor general ({', '.join(gen)})"
            )
    return fine, gen


def _check_known_runs(metrics: pl.DataFrame, runs: pl.DataFrame, source: str, runs_src: str):
    known = set(runs["run"])
    for i, model in enumerate(metrics["model"]):
        if model not in known:
            raise ValueError(f"{source}: line {i + 2}: model {model!r} is not a run in {runs_src}")


# --- writing -----------------------------------------------------------------------------------


def write_csv(frame: pl.DataFrame, path: str | Path) -> None:
    """Write ``frame`` as CSV atomically, floats rounded to ``CSV_DECIMALS``."""
    with io.atomic_path(path) as tmp:
        frame.with_columns(cs.float().round(CSV_DECIMALS)).write_csv(tmp)


def _write_text(text: str, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        tmp.write_text(text)


def write_tables(
    table: pl.DataFrame,
    out_dir: str | Path,
    *,
    summary: pl.DataFrame | None = None,
    labels: Mapping[str, str] | None = None,
) -> list[Path]:
    """Markdown and LaTeX renderings of Tables 1 (when ``summary`` is given), 2, 3 and 4 as
    ``out_dir``/table<N>.md and .tex; ``labels`` are benchmark headers."""
    out_dir = Path(out_dir)
    fine, general = ft.benchmark_groups(table)
    views = {}
    if summary is not None:
        views["table1"] = ft.summary_view(summary)
    views["table2"] = ft.aggregated_view(table)
    if general:
        views["table3"] = ft.benchmarks_view(table, general, labels=labels)
    if fine:
        views["table4"] = ft.benchmarks_view(table, fine, labels=labels)
    written = []
    for name, view in views.items():
        caption, label = CAPTIONS[name]
        for suffix, text in (
            ("md", ft.to_markdown(view, caption)),
            ("tex", ft.to_latex(view, caption, label)),
        ):
            path = out_dir / f"{name}.{suffix}"
            _write_text(text, path)
            written.append(path)
    return written


def build_outputs(
    metrics: pl.DataFrame,
    runs: pl.DataFrame,
    out_dir: str | Path,
    *,
    fine_grained: Sequence[str],
    general: Sequence[str],
    paired: fe.Paired | None = None,
    exclude: Iterable[str] = (),
    chain_start: str | None = None,
    labels: Mapping[str, str] | None = None,
    n_resamples: int = fe.N_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the report derives from the numbers, written into ``out_dir``:
    ablations.csv (``tables.ablations_table``), effects.csv and effects_summary.csv
    (``effects.factor_effects``; intervals only with ``paired``), and table1-4 .md/.tex
    (Table 1: the ``progression_chain`` from ``chain_start`` or the weakest row).
    ``exclude``: runs kept out of the effects and of the chain. Returns the written paths
    and counts."""
    out_dir = Path(out_dir)
    exclude = list(exclude)
    table = ft.ablations_table(metrics, runs, fine_grained=fine_grained, general=general)
    pairs, summary = fe.factor_effects(
        table, paired=paired, exclude=exclude, n_resamples=n_resamples, seed=seed
    )
    paths = {
        "ablations": out_dir / "ablations.csv",
        "effects": out_dir / "effects.csv",
        "effects_summary": out_dir / "effects_summary.csv",
    }
    write_csv(table, paths["ablations"])
    write_csv(pairs, paths["effects"])
    write_csv(summary, paths["effects_summary"])
    progression = None
    if table["classification"].drop_nulls().len():
        chain = ft.progression_chain(table, start=chain_start, exclude=exclude)
        progression = ft.summary_table(table, chain, after=ft.chain_after(chain))
        paths["progression"] = out_dir / "progression.csv"
        write_csv(progression, paths["progression"])  # Table 1's rows, for Figure 8
    rendered = write_tables(table, out_dir, summary=progression, labels=labels)
    log.info("aggregated %d rows, %d one-factor pairs into %s", table.height, pairs.height, out_dir)
    return {
        **{k: str(v) for k, v in paths.items()},
        "tables": [str(p) for p in rendered],
        "rows": table.height,
        "pairs": pairs.height,
        "fine_grained": list(fine_grained),
        "general": list(general),
    }


def aggregate(
    metrics_csv: str | Path,
    runs_csv: str | Path,
    out_dir: str | Path,
    *,
    fine_grained: Sequence[str] | None = None,
    general: Sequence[str] | None = None,
    exclude: Iterable[str] = (),
    chain_start: str | None = None,
) -> dict[str, Any]:
    """``fgvlm aggregate``: METRICS.csv (model, benchmark, accuracy in percent[, group]) and
    RUNS.csv (run + factors) -> ``out_dir``/ablations.csv, effects.csv (no intervals: only
    accuracies are known), effects_summary.csv, table1-4 .md/.tex. Benchmark lists default
    to the ``group`` column, else the paper's. Returns ``build_outputs``'s summary."""
    metrics = read_metrics_csv(metrics_csv)
    runs = read_runs_csv(runs_csv)
    _check_known_runs(metrics, runs, str(metrics_csv), str(runs_csv))
    fine, gen = benchmark_lists(metrics, fine_grained, general, source=str(metrics_csv))
    unknown = [r for r in exclude if r not in set(runs["run"])]
    if unknown:
        raise ValueError(f"{runs_csv}: excluded run {unknown[0]!r} is not a run")
    return build_outputs(
        metrics.select(ft.METRIC_COLUMNS),
        runs,
        out_dir,
        fine_grained=fine,
        general=gen,
        exclude=exclude,
        chain_start=chain_start,
    )


# --- the DAG's results -------------------------------------------------------------------------


def _as_mapping(models: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """{name in the table: model folder under results/}; a list maps each name to itself."""
    return dict(models) if isinstance(models, Mapping) else {m: m for m in models}


def _metric_value(data: dict, path: Path, prefix: str = "") -> float:
    """The statistic named by ``primary`` (default accuracy), with ``prefix``, in percent."""
    key = prefix + data.get("primary", "accuracy")
    if key not in data:
        raise ValueError(f"{path}: no {key!r} (keys: {', '.join(sorted(data))})")
    value = float(data[key])
    if not 0 <= value <= 1:
        raise ValueError(f"{path}: {key} = {value} is not a fraction in [0, 1]")
    return 100 * value


def collect_metrics(
    results_dir: str | Path,
    models: Sequence[str] | Mapping[str, str],
    benchmarks: Sequence[str],
    *,
    nway: bool = False,
) -> pl.DataFrame:
    """Long table (model, benchmark, accuracy in percent) from
    ``results_dir``/metrics/<model>/<benchmark>.json, using the statistic its ``primary``
    names. ``models``: names, or {name in the table: model folder}. ``nway``: add
    nway_accuracy (CLIP baselines' N-way statistic)."""
    results_dir = Path(results_dir)
    records = []
    for name, folder in _as_mapping(models).items():
        for bench in benchmarks:
            path = results_dir / "metrics" / folder / f"{bench}.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: metrics not found")
            data = io.read_json(path)
            record = {"model": name, "benchmark": bench, "accuracy": _metric_value(data, path)}
            if nway:
                record["nway_accuracy"] = _metric_value(data, path, "nway_")
            records.append(record)
    schema = {"model": pl.Utf8, "benchmark": pl.Utf8, "accuracy": pl.Float64}
    if nway:
        schema["nway_accuracy"] = pl.Float64
    return pl.DataFrame(records, schema=schema, orient="row")


def collect_paired(
    results_dir: str | Path,
    models: Sequence[str] | Mapping[str, str],
    benchmarks: Sequence[str],
) -> dict[tuple[str, str], pl.DataFrame]:
    """Per-question correctness for ``effects.factor_effects``: {(model, benchmark): qid,
    correct[, label]} from ``results_dir``/predictions/<model>/<benchmark>.parquet (per
    CircularEval group where the predictions have a ``group`` column). Where the
    metrics JSON's ``primary`` is mean_per_class, the label comes from
    ``results_dir``/questions/<benchmark>.parquet so that intervals are per class too."""
    results_dir = Path(results_dir)
    labels: dict[str, pl.DataFrame] = {}
    out = {}
    items = [(n, f, b) for n, f in _as_mapping(models).items() for b in benchmarks]
    for name, folder, bench in tqdm(items, desc="paired answers", disable=len(items) < 50):
        path = results_dir / "predictions" / folder / f"{bench}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: predictions not found")
        frame = pl.read_parquet(path)
        missing = [c for c in ("qid", "correct") if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        if "group" in frame.columns:
            # CircularEval (MMBench): a question counts once, right only if all its copies are
            frame = frame.group_by("group", maintain_order=True).agg(pl.col("correct").all())
            frame = frame.rename({"group": "qid"})
        frame = frame.select("qid", pl.col("correct").cast(pl.Boolean))
        metrics_path = results_dir / "metrics" / folder / f"{bench}.json"
        primary = io.read_json(metrics_path).get("primary") if metrics_path.is_file() else None
        if primary == "mean_per_class":
            if bench not in labels:
                labels[bench] = _question_labels(results_dir / "questions" / f"{bench}.parquet")
            frame = frame.join(labels[bench], on="qid", how="left", maintain_order="left")
            if frame["label"].null_count():
                raise ValueError(f"{path}: qids missing from the {bench} questions")
        out[(name, bench)] = frame
    return out


def _question_labels(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: questions not found (needed for per-class intervals)")
    return pl.read_parquet(path, columns=["qid", "label"])


def runs_from_config(config: dict) -> pl.DataFrame:
    """The runs table of a study config: one row per ablation, run = its name, the factors
    as the paper prints them (``fgvlm.config.factor_labels``)."""
    rows = [{"run": row["name"], **factor_labels(config, row)} for row in config["ablations"]]
    return pl.DataFrame(rows, schema=dict.fromkeys(("run", *ft.FACTORS), pl.Utf8), orient="row")


def effects_exclusions(config: dict) -> list[str]:
    """Rows of a study config to keep out of the effects: those repeating another row's
    factors, preferring to keep trained rows with the default seed (so the paper's released
    LLaVA-1.5 and its second LLaVA reproduction give way to the reproduction of row 12)."""
    default_seed = config["seed"]
    preferred = [
        row["name"] for row in trained_rows(config) if row.get("seed", default_seed) == default_seed
    ]
    return fe.replicate_runs(runs_from_config(config), preferred)
