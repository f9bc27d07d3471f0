"""From per-benchmark numbers to the report's tables: ``fgvlm aggregate`` and the DAG's
aggregation share these functions.

``aggregate`` reads a long CSV ``model,benchmark,accuracy`` (percent; optional ``group``:
fine_grained | general), a runs CSV (``run`` + the factor columns) and optionally the config's
``report:`` definitions, so numbers from anywhere (a paper, another toolkit) aggregate the same
way. ``study_files`` names the DAG's result files a study reads (the rules' inputs);
``collect_metrics`` and ``collect_paired`` read them into the same shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import polars as pl
import polars.selectors as cs
import yaml
from tqdm import tqdm

from fgvlm import io
from fgvlm.config import ConfigError, load_schema
from fgvlm.report import effects, tables

log = logging.getLogger(__name__)

GROUPS = ("fine_grained", "general")
CSV_DECIMALS = 6  # percentages to 1e-6 pp: exact enough, and no float noise in the CSV
CAPTIONS = {
    "table1": (
        "Summary of important ablation settings and comparison to existing models (bolded): "
        "deltas against the step before in parentheses.",
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
    frame = _read_text_csv(path, tables.METRIC_COLUMNS)
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
    frame = _read_text_csv(path, ("run", *tables.FACTORS))
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
        fine = list(tables.FINE_GRAINED if fine_grained is None else fine_grained)
        gen = list(tables.GENERAL if general is None else general)
    tables.check_benchmark_lists(fine, gen)
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
    fine, general = tables.benchmark_groups(table)
    views = {}
    bold: dict[str, list[int]] = {}
    if summary is not None:
        views["table1"] = tables.summary_view(summary)
        bold["table1"] = [i for i, r in enumerate(summary["released"]) if r]
    views["table2"] = tables.aggregated_view(table)
    if general:
        views["table3"] = tables.benchmarks_view(table, general, labels=labels)
    if fine:
        views["table4"] = tables.benchmarks_view(table, fine, labels=labels)
    written = []
    for name, view in views.items():
        caption, label = CAPTIONS[name]
        for suffix, text in (
            ("md", tables.to_markdown(view, caption, bold_rows=bold.get(name, ()))),
            ("tex", tables.to_latex(view, caption, label, bold_rows=bold.get(name, ()))),
        ):
            path = out_dir / f"{name}.{suffix}"
            _write_text(text, path)
            written.append(path)
    return written


def read_report_definitions(path: str | Path) -> dict:
    """The ``report:`` definitions from a YAML file (a study config, or the section alone),
    checked against the config schema's ``report`` property."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    report = data.get("report", data) if isinstance(data, dict) else data
    schema = {**load_schema()["properties"]["report"], "$defs": load_schema().get("$defs", {})}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(report))
    if errors:
        where = ".".join(str(p) for p in errors[0].absolute_path) or "report"
        raise ConfigError(f"{path}: {where}: {errors[0].message}")
    return dict(report or {})


def _check_table1_runs(entries: Sequence[Mapping], runs: Iterable[str], source: str) -> None:
    known = set(runs)
    for i, entry in enumerate(entries):
        for key in ("run", "after"):
            if entry.get(key) and entry[key] not in known:
                raise ValueError(f"{source}: table1[{i}].{key}: {entry[key]!r} is not a run")


def build_outputs(
    metrics: pl.DataFrame,
    runs: pl.DataFrame,
    out_dir: str | Path,
    *,
    fine_grained: Sequence[str],
    general: Sequence[str],
    report: Mapping[str, Any] | None = None,
    released: pl.DataFrame | None = None,
    paired: effects.Paired | None = None,
    exclude: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
    n_resamples: int = effects.N_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the report derives from the numbers, written into ``out_dir``:
    ablations.csv (``tables.ablations_table``), effects.csv (every one-factor pair, intervals
    only with ``paired``) and effects_summary.csv (averaged over the pair sets of
    ``report["effects"]``), table1.csv (``tables.table1`` over ``report["table1"]``; its
    released ``model`` rows from ``released``: long metrics of those models) and table1-4
    .md/.tex. ``exclude``: runs kept out of the effects. Returns the written paths and
    counts."""
    out_dir = Path(out_dir)
    exclude = list(exclude)
    report = dict(report or {})
    entries = list(report.get("table1") or [])
    _check_table1_runs(entries, runs["run"], "report")
    table = tables.ablations_table(metrics, runs, fine_grained=fine_grained, general=general)
    pairs, summary = effects.factor_effects(
        table,
        paired=paired,
        exclude=exclude,
        definitions=report.get("effects") or {},
        n_resamples=n_resamples,
        seed=seed,
    )
    paths = {
        "ablations": out_dir / "ablations.csv",
        "effects": out_dir / "effects.csv",
        "effects_summary": out_dir / "effects_summary.csv",
        "table1": out_dir / "table1.csv",
    }
    write_csv(table, paths["ablations"])
    write_csv(pairs, paths["effects"])
    write_csv(summary, paths["effects_summary"])
    averages = None
    if released is not None and released.height:
        averages = tables.model_averages(released, fine_grained=fine_grained, general=general)
    summary_rows = tables.table1(table, entries, released=averages, exclude=exclude)
    write_csv(summary_rows, paths["table1"])  # Table 1's rows; its chain is Figure 8
    rendered = write_tables(table, out_dir, summary=summary_rows, labels=labels)
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
    report: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``fgvlm aggregate``: METRICS.csv (model, benchmark, accuracy in percent[, group]) and
    RUNS.csv (run + factors) -> ``out_dir``/ablations.csv, effects.csv (no intervals: only
    accuracies are known), effects_summary.csv, table1.csv, table1-4 .md/.tex, with the
    config's ``report:`` definitions (``read_report_definitions``). Benchmark lists default
    to the ``group`` column, else the paper's. METRICS.csv may also hold Table 1's released
    ``model`` rows. Returns ``build_outputs``'s summary."""
    report = dict(report or {})
    metrics = read_metrics_csv(metrics_csv)
    runs = read_runs_csv(runs_csv)
    released_names = [e["model"] for e in report.get("table1") or [] if "model" in e]
    is_released = pl.col("model").is_in(released_names)
    _check_known_runs(metrics.filter(~is_released), runs, str(metrics_csv), str(runs_csv))
    fine, gen = benchmark_lists(metrics, fine_grained, general, source=str(metrics_csv))
    unknown = [r for r in exclude if r not in set(runs["run"])]
    if unknown:
        raise ValueError(f"{runs_csv}: excluded run {unknown[0]!r} is not a run")
    return build_outputs(
        metrics.filter(~is_released).select(tables.METRIC_COLUMNS),
        runs,
        out_dir,
        fine_grained=fine,
        general=gen,
        report=report,
        released=metrics.filter(is_released).select(tables.METRIC_COLUMNS),
        exclude=exclude,
    )


# --- the DAG's results -------------------------------------------------------------------------


Files = Mapping[str, Mapping[str, str]]  # {model name in the tables: {benchmark: path}}


def study_files(spec: Mapping[str, Any], results_dir: str | Path = "results") -> dict[str, Any]:
    """The result files a study's aggregation reads (``fgvlm.config.report_spec``): per run
    and per Table 1 released model its metrics, per run its predictions, and the questions of
    the mean-per-class benchmarks (their intervals resample within classes). The rule
    declares exactly these as inputs and the stage reads only these."""
    results = Path(results_dir)
    benchmarks = [*spec["fine_grained"], *spec["general"]]

    def per_model(models: Mapping[str, str], kind: str, ext: str) -> dict[str, dict[str, str]]:
        return {
            name: {b: str(results / kind / folder / f"{b}.{ext}") for b in benchmarks}
            for name, folder in models.items()
        }

    return {
        "metrics": per_model(spec["models"], "metrics", "json"),
        "predictions": per_model(spec["models"], "predictions", "parquet"),
        "questions": {b: str(results / "questions" / f"{b}.parquet") for b in spec["per_class"]},
        "released": per_model(spec["table1_models"], "metrics", "json"),
    }


LEADERBOARD_CSV = "openvlm_leaderboard.csv"


def leaderboard_file(name: str | None = None) -> str:
    """Figure 2's leaderboard CSV: ``name`` where it is a file, else the packaged one."""
    if name and Path(name).is_file():
        return str(name)
    from importlib import resources

    packaged = resources.files("fgvlm.resources").joinpath(name or LEADERBOARD_CSV)
    if not packaged.is_file():
        raise FileNotFoundError(f"{name}: leaderboard CSV not found (nor packaged)")
    return str(packaged)


def flat_files(files: Mapping[str, Any]) -> list[str]:
    """Every path of a ``study_files`` mapping, once, in order (a rule's input list)."""
    out: list[str] = []
    for value in files.values():
        if isinstance(value, Mapping):
            out += flat_files(value)
        else:
            out.append(str(value))
    return list(dict.fromkeys(out))


def _metric_value(data: dict, path: Path, prefix: str = "") -> float:
    """The statistic named by ``primary`` (default accuracy), with ``prefix``, in percent."""
    key = prefix + data.get("primary", "accuracy")
    if key not in data:
        raise ValueError(f"{path}: no {key!r} (keys: {', '.join(sorted(data))})")
    value = float(data[key])
    if not 0 <= value <= 1:
        raise ValueError(f"{path}: {key} = {value} is not a fraction in [0, 1]")
    return 100 * value


def collect_metrics(files: Files, *, nway: bool = False) -> pl.DataFrame:
    """Long table (model, benchmark, accuracy in percent) from the metrics JSONs of
    ``files`` {model: {benchmark: path}}, using the statistic its ``primary`` names.
    ``nway``: add nway_accuracy (CLIP baselines' N-way statistic)."""
    records = []
    for name, benches in files.items():
        for bench, path in benches.items():
            path = Path(path)
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
    predictions: Files, metrics: Files, questions: Mapping[str, str]
) -> dict[tuple[str, str], pl.DataFrame]:
    """Per-question correctness for ``effects.factor_effects``: {(model, benchmark): qid,
    correct[, label]} from the ``predictions`` parquet files (per CircularEval group where
    they have a ``group`` column). Where the ``metrics`` JSON's ``primary`` is
    mean_per_class, the label comes from that benchmark's ``questions`` parquet so that
    intervals are per class too."""
    labels: dict[str, pl.DataFrame] = {}
    out = {}
    items = [(n, b, p) for n, benches in predictions.items() for b, p in benches.items()]
    for name, bench, path in tqdm(items, desc="paired answers", disable=len(items) < 50):
        path = Path(path)
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
        metrics_path = metrics.get(name, {}).get(bench)
        primary = io.read_json(metrics_path).get("primary") if metrics_path else None
        if primary == "mean_per_class":
            if bench not in questions:
                raise ValueError(
                    f"{path}: {bench} is scored per class but its questions are not an input"
                )
            if bench not in labels:
                labels[bench] = _question_labels(Path(questions[bench]))
            frame = frame.join(labels[bench], on="qid", how="left", maintain_order="left")
            if frame["label"].null_count():
                raise ValueError(f"{path}: qids missing from the {bench} questions")
        out[(name, bench)] = frame
    return out


def _question_labels(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: questions not found (needed for per-class intervals)")
    return pl.read_parquet(path, columns=["qid", "label"])


def aggregate_study(spec: Mapping[str, Any], files: Mapping[str, Any], out_dir: str | Path):
    """The DAG's aggregation: ``build_outputs`` over the ``study_files`` of ``spec``
    (``fgvlm.config.report_spec``), with paired intervals from the predictions."""
    released = collect_metrics(files["released"]) if files["released"] else None
    return build_outputs(
        collect_metrics(files["metrics"]),
        pl.DataFrame(spec["runs"], schema=dict.fromkeys(("run", *tables.FACTORS), pl.Utf8)),
        out_dir,
        fine_grained=spec["fine_grained"],
        general=spec["general"],
        report=spec["report"],
        released=released,
        paired=collect_paired(files["predictions"], files["metrics"], files["questions"]),
        exclude=spec["exclude"],
        labels=spec["labels"],
    )


def model_files(spec: Mapping[str, Any], results_dir: str | Path = "results") -> dict[str, Any]:
    """The metrics files of Section 3's table (``fgvlm.config.models_spec``): hub VLMs on
    every benchmark, CLIP baselines on the fine-grained ones."""
    results = Path(results_dir)
    fine, general = spec["fine_grained"], spec["general"]
    return {
        "vlms": {
            m: {b: str(results / "metrics" / m / f"{b}.json") for b in [*fine, *general]}
            for m in spec["hub_models"]
        },
        "clips": {
            name: {b: str(results / "metrics" / folder / f"{b}.json") for b in fine}
            for name, folder in spec["clip_models"].items()
        },
    }


def aggregate_models(spec: Mapping[str, Any], files: Mapping[str, Any], out_path: str | Path):
    """Section 3's table (``tables.models_table``) from ``model_files``, written as CSV."""
    table = tables.models_table(
        collect_metrics(files["vlms"]),
        collect_metrics(files["clips"], nway=True),
        fine_grained=spec["fine_grained"],
        general=spec["general"],
        labels=spec["model_labels"],
        encoders=spec["encoders"],
    )
    write_csv(table, out_path)
    return table
