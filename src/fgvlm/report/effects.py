"""Factor effects (paper §4): what changing one factor does to the two averages.

Every pair of ablation rows that differ in exactly one factor is a controlled comparison; its
delta (percentage points) is the effect of that change in that context. With per-question
correctness the delta gets a paired bootstrap interval (the same resampled questions for both
runs) and an exact McNemar p-value; the per-change means are the paper's "+7.5pp" numbers.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import polars as pl
from scipy.stats import binomtest

from fgvlm.report.tables import AVERAGES, FACTORS, benchmark_groups, differing_factors

EFFECT_FACTORS = ("llm", "vision_encoder", "pt_data", "updating", "ft_data", "arch")
# The value that means "no data" (``fgvlm.config.factor_labels`` prints "none" so): a baseline.
BASELINE_VALUES = ("None",)
N_RESAMPLES = 1000
LEVEL = 0.95
# Deltas recomputed from the per-question answers must agree with the table's to this much (pp).
CONSISTENCY_TOLERANCE = 1e-6

Paired = Mapping[tuple[str, str], pl.DataFrame]


def level_order(table: pl.DataFrame, factor: str, order: Sequence[str] | None = None) -> list[str]:
    """The values of ``factor``, baseline first: those in ``order``, then "None", then the rest
    in order of first appearance in the table. A pair's "from" is its earlier value."""
    seen = list(dict.fromkeys(table[factor].to_list()))
    head = [v for v in (order or []) if v in seen]
    head += [v for v in BASELINE_VALUES if v in seen and v not in head]
    return head + [v for v in seen if v not in head]


def _pair_schema() -> dict[str, pl.DataType]:
    schema: dict[str, pl.DataType] = {
        "factor": pl.Utf8,
        "from": pl.Utf8,
        "to": pl.Utf8,
        "run_from": pl.Utf8,
        "run_to": pl.Utf8,
    }
    schema.update(dict.fromkeys(FACTORS, pl.Utf8))
    for m in AVERAGES:
        for suffix in ("from", "to", "delta", "ci_low", "ci_high", "p"):
            schema[f"{m}_{suffix}"] = pl.Float64
    return schema


SUMMARY_SCHEMA = {
    "factor": pl.Utf8,
    "selection": pl.Utf8,
    "from": pl.Utf8,
    "to": pl.Utf8,
    "n_pairs": pl.Int64,
    "classification_delta": pl.Float64,
    "vlm_delta": pl.Float64,
    "classification_positive": pl.Int64,
    "vlm_positive": pl.Int64,
}
# A summary's pair set: {column of effects.csv: value or list of values}; {} takes every pair.
Selection = Mapping[str, str | Sequence[str]]
Definitions = Mapping[str, Sequence[Mapping]]


def one_factor_pairs(
    table: pl.DataFrame,
    factors: Sequence[str] = EFFECT_FACTORS,
    *,
    exclude: Iterable[str] = (),
    order: Mapping[str, Sequence[str]] | None = None,
) -> list[dict]:
    """Pairs of rows differing in exactly one factor, one of ``factors``, as dicts
    {factor, from, to, run_from, run_to, row_from, row_to}; ``from`` is the earlier level
    (``level_order``). Sorted by factor (in ``factors`` order), levels, then table rows."""
    excluded = set(exclude)
    rows = [r for r in table.iter_rows(named=True) if r["run"] not in excluded]
    levels = {f: level_order(table, f, (order or {}).get(f)) for f in factors}
    pairs = []
    for i, a in enumerate(rows):
        for j in range(i + 1, len(rows)):
            b = rows[j]
            changed = differing_factors(a, b, FACTORS)  # every other factor must be equal
            if len(changed) != 1 or changed[0] not in factors:
                continue
            f = changed[0]
            lo, hi = (a, b) if levels[f].index(a[f]) < levels[f].index(b[f]) else (b, a)
            key = (
                factors.index(f),
                levels[f].index(lo[f]),
                levels[f].index(hi[f]),
                rows.index(lo),
                rows.index(hi),
            )
            pairs.append((key, {"factor": f, "row_from": lo, "row_to": hi}))
    out = []
    for _, pair in sorted(pairs, key=lambda p: p[0]):
        lo, hi, f = pair["row_from"], pair["row_to"], pair["factor"]
        out.append({**pair, "from": lo[f], "to": hi[f], "run_from": lo["run"], "run_to": hi["run"]})
    return out


# --- paired statistics over questions ----------------------------------------------------------


def _strata(a: pl.DataFrame, b: pl.DataFrame, where: str) -> np.ndarray:
    """Per stratum (class when a ``label`` column is given, else the whole benchmark): the
    counts [only-a-right, only-b-right, concordant] of the questions both runs answered."""
    for frame, side in ((a, "first"), (b, "second")):
        missing = [c for c in ("qid", "correct") if c not in frame.columns]
        if missing:
            raise ValueError(f"{where}: {side} run's answers lack column(s) {', '.join(missing)}")
        dup = frame.filter(pl.col("qid").is_duplicated())
        if dup.height:
            raise ValueError(f"{where}: qid {dup['qid'][0]!r} appears twice in the {side} run")
        if frame["correct"].null_count():
            raise ValueError(f"{where}: the {side} run has null 'correct' values")
    cols = ["qid", "correct", *(["label"] if "label" in a.columns else [])]
    joined = a.select(cols).join(
        b.select("qid", pl.col("correct").alias("correct_b")), on="qid", how="full"
    )
    lonely = joined.filter(pl.col("qid").is_null() | pl.col("qid_right").is_null())
    if lonely.height:
        qid = lonely["qid"][0] if lonely["qid"][0] is not None else lonely["qid_right"][0]
        raise ValueError(f"{where}: the runs answered different questions (qid {qid!r})")
    ca = joined["correct"].cast(pl.Boolean).to_numpy()
    cb = joined["correct_b"].cast(pl.Boolean).to_numpy()
    if "label" in joined.columns:
        _, stratum = np.unique(joined["label"].to_numpy(), return_inverse=True)
    else:
        stratum = np.zeros(len(ca), dtype=np.int64)
    a_only = np.bincount(stratum, weights=ca & ~cb)
    b_only = np.bincount(stratum, weights=cb & ~ca)
    total = np.bincount(stratum)
    return np.stack([a_only, b_only, total - a_only - b_only], axis=1).astype(np.int64)


def _pair_seed(seed: int, *parts: str) -> np.random.SeedSequence:
    """A seed per comparison, so adding rows leaves the other intervals unchanged."""
    return np.random.SeedSequence([seed, zlib.crc32("\0".join(parts).encode())])


def paired_delta(
    first: Sequence[pl.DataFrame],
    second: Sequence[pl.DataFrame],
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int | np.random.SeedSequence = 0,
    level: float = LEVEL,
    where: str = "paired answers",
) -> dict[str, float | int]:
    """Paired comparison of two runs over the same benchmarks (one frame per benchmark, in
    the same order): qid, correct (bool), optional label (then the benchmark's statistic is
    mean-per-class accuracy, resampled within classes).

    Delta = mean over benchmarks of (second - first) in percentage points. Interval: percentile
    bootstrap resampling each benchmark's questions with replacement, the same questions for
    both runs (drawn exactly as multinomial counts of the paired outcomes). McNemar: exact
    two-sided binomial test on the discordant questions pooled over the benchmarks.
    Out: {delta, ci_low, ci_high, p, fixed (second right, first wrong), broken (the reverse)}.
    """
    if len(first) != len(second) or not first:
        raise ValueError(f"{where}: need the same non-zero number of benchmarks for both runs")
    if not 0 < level < 1 or n_resamples < 1:
        raise ValueError(f"{where}: bad level {level} or n_resamples {n_resamples}")
    rng = np.random.Generator(np.random.PCG64(seed))
    point, draws, fixed, broken = [], [], 0, 0
    for k, (a, b) in enumerate(zip(first, second, strict=True)):
        counts = _strata(a, b, f"{where} (benchmark {k})")
        n = counts.sum(axis=1)
        point.append(float(np.mean((counts[:, 1] - counts[:, 0]) / n)))
        resampled = rng.multinomial(n, counts / n[:, None], size=(n_resamples, len(n)))
        draws.append(((resampled[..., 1] - resampled[..., 0]) / n).mean(axis=1))
        broken += int(counts[:, 0].sum())
        fixed += int(counts[:, 1].sum())
    spread = 100 * np.mean(draws, axis=0)
    low, high = np.quantile(spread, [(1 - level) / 2, (1 + level) / 2])
    discordant = fixed + broken
    p = binomtest(fixed, discordant, 0.5).pvalue if discordant else 1.0
    return {
        "delta": 100 * float(np.mean(point)),
        "ci_low": float(low),
        "ci_high": float(high),
        "p": float(p),
        "fixed": fixed,
        "broken": broken,
    }


def _paired_stats(
    paired: Paired,
    run_from: str,
    run_to: str,
    benchmarks: Sequence[str],
    average: str,
    *,
    n_resamples: int,
    seed: int,
    level: float,
) -> dict | None:
    """``paired_delta`` for one pair and one average; None when some answers are missing."""
    keys = [(r, b) for r in (run_from, run_to) for b in benchmarks]
    if not benchmarks or any(k not in paired for k in keys):
        return None
    return paired_delta(
        [paired[(run_from, b)] for b in benchmarks],
        [paired[(run_to, b)] for b in benchmarks],
        n_resamples=n_resamples,
        seed=_pair_seed(seed, run_from, run_to, average),
        level=level,
        where=f"{run_from} vs {run_to} ({average})",
    )


# --- the effects tables ------------------------------------------------------------------------


def factor_effects(
    table: pl.DataFrame,
    factors: Sequence[str] = EFFECT_FACTORS,
    *,
    paired: Paired | None = None,
    exclude: Iterable[str] = (),
    order: Mapping[str, Sequence[str]] | None = None,
    definitions: Definitions | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Effects of single-factor changes on the ``classification`` and ``vlm`` averages.

    In: the ablation table (``tables.ablations_table``); ``factors`` to vary; ``paired``
    {(run, benchmark): frame of qid, correct[, label]} for intervals and p-values (absent
    answers give null ones); ``exclude`` runs kept out of every pair (a released checkpoint or
    a seed replicate that duplicates a row's factors); ``order`` {factor: values} to set
    which level is "from" (default ``level_order``).

    Out ``pairs`` (effects.csv), one row per pair of rows differing only in ``factor``:
    factor, from, to (its two values), run_from, run_to, the factor columns (the shared
    context; null for ``factor``), and per average m in (classification, vlm): m_from, m_to
    (percent), m_delta (to - from, percentage points), m_ci_low, m_ci_high (paired bootstrap
    interval at ``level``), m_p (exact McNemar p-value, discordant questions pooled over the
    average's benchmarks).
    Out ``summary`` (effects_summary.csv), one row per (factor, selection, from, to) of
    ``summarize_effects`` over ``definitions``: n_pairs, the mean deltas classification_delta
    and vlm_delta (over pairs with a value), and how many pairs improved:
    classification_positive, vlm_positive.
    """
    unknown = [f for f in factors if f not in FACTORS]
    if unknown:
        raise ValueError(f"effects: unknown factor(s) {unknown}; choose from {FACTORS}")
    groups = dict(zip(AVERAGES, benchmark_groups(table), strict=True))
    records = []
    for pair in one_factor_pairs(table, factors, exclude=exclude, order=order):
        lo, hi = pair["row_from"], pair["row_to"]
        record = {k: pair[k] for k in ("factor", "from", "to", "run_from", "run_to")}
        record.update({f: (None if f == pair["factor"] else lo[f]) for f in FACTORS})
        for m in AVERAGES:
            delta = None if lo[m] is None or hi[m] is None else hi[m] - lo[m]
            record.update({f"{m}_from": lo[m], f"{m}_to": hi[m], f"{m}_delta": delta})
            stats = None
            if paired is not None:
                stats = _paired_stats(
                    paired,
                    lo["run"],
                    hi["run"],
                    groups[m],
                    m,
                    n_resamples=n_resamples,
                    seed=seed,
                    level=level,
                )
            if stats is not None and delta is not None:
                if abs(stats["delta"] - delta) > CONSISTENCY_TOLERANCE:
                    raise ValueError(
                        f"effects: {lo['run']} vs {hi['run']}: the answers give a {m} delta of "
                        f"{stats['delta']:.6f}pp but the table {delta:.6f}pp (do the "
                        "predictions belong to the metrics?)"
                    )
            for key in ("ci_low", "ci_high", "p"):
                record[f"{m}_{key}"] = None if stats is None else stats[key]
        records.append(record)
    pairs = pl.DataFrame(records, schema=_pair_schema(), orient="row")
    return pairs, summarize_effects(pairs, definitions)


def select_pairs(pairs: pl.DataFrame, where: Selection) -> pl.DataFrame:
    """The pairs matching ``where`` (column=value; a list value matches any of its items)."""
    selected = pairs
    for column, value in where.items():
        if column not in pairs.columns:
            raise ValueError(f"effects: {column!r} is not a column of effects.csv")
        values = [value] if isinstance(value, str) else list(value)
        selected = selected.filter(pl.col(column).is_in(values))
    return selected


def summarize_effects(pairs: pl.DataFrame, definitions: Definitions | None = None) -> pl.DataFrame:
    """Mean delta per (factor, selection, from, to): each factor's pairs are averaged over
    the pair sets ``definitions`` names ({factor: [{label, where}]}, the config's
    ``report.effects``), a factor not listed over all its pairs; changes in the order they
    first appear."""
    if pairs.height == 0:
        return pl.DataFrame(schema=SUMMARY_SCHEMA)
    parts = []
    for factor in pairs["factor"].unique(maintain_order=True):
        for definition in (definitions or {}).get(factor) or [{}]:
            chosen = select_pairs(
                pairs.filter(pl.col("factor") == factor), definition.get("where") or {}
            )
            if chosen.height == 0:
                continue
            parts.append(
                chosen.group_by(["factor", "from", "to"], maintain_order=True).agg(
                    pl.lit(definition.get("label", "")).alias("selection"),
                    pl.len().cast(pl.Int64).alias("n_pairs"),
                    *[pl.col(f"{m}_delta").mean().alias(f"{m}_delta") for m in AVERAGES],
                    *[
                        (pl.col(f"{m}_delta") > 0).sum().cast(pl.Int64).alias(f"{m}_positive")
                        for m in AVERAGES
                    ],
                )
            )
    if not parts:
        return pl.DataFrame(schema=SUMMARY_SCHEMA)
    return pl.concat(parts).select(list(SUMMARY_SCHEMA)).cast(SUMMARY_SCHEMA)


def mean_effect(pairs: pl.DataFrame, average: str = "classification", **where: str) -> float:
    """Mean ``average`` delta over the pairs matching ``where`` (``select_pairs``), e.g.
    ``mean_effect(pairs, factor="llm", to="Qwen2-7B")``."""
    deltas = select_pairs(pairs, where)[f"{average}_delta"].drop_nulls()
    if deltas.is_empty():
        raise ValueError(f"effects: no pair matches {where}")
    return float(deltas.mean())
