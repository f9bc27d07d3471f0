"""Classification metrics shared by CLIP and VLM evaluation: accuracy, mean-per-class
accuracy, and bootstrap confidence intervals. All results are plain Python floats in [0, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np

STATISTICS = ("accuracy", "mean_per_class")


def _as_bool(correct: np.ndarray) -> np.ndarray:
    """``correct`` as a non-empty 1-D bool array."""
    values = np.asarray(correct)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"correct must be a non-empty 1-D array, got shape {values.shape}")
    if values.dtype != bool:
        if not np.isin(values, (0, 1)).all():
            raise ValueError("correct must hold booleans (or 0/1)")
        values = values.astype(bool)
    return values


def _class_counts(correct: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class present in ``labels``: (number of items, number correct)."""
    labels = np.asarray(labels)
    if labels.shape != correct.shape:
        raise ValueError(f"labels has shape {labels.shape}, correct has {correct.shape}")
    _, index = np.unique(labels, return_inverse=True)
    totals = np.bincount(index)
    hits = np.bincount(index, weights=correct.astype(np.float64))
    return totals, hits


def accuracy(correct: np.ndarray) -> float:
    """Fraction of true entries in ``correct`` (bool [n])."""
    return float(_as_bool(correct).mean())


def mean_per_class_accuracy(correct: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of each class's accuracy."""
    totals, hits = _class_counts(_as_bool(correct), labels)
    return float(np.mean(hits / totals))


def bootstrap_ci(
    correct: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    statistic: str = "accuracy",
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` ("accuracy" or "mean_per_class").

    Resampling n items with replacement only changes the number correct, which is then
    Binomial(n, observed accuracy): we draw those counts directly (exact, vectorised).
    "mean_per_class" resamples within each class (class sizes are fixed by the test set),
    so it needs ``labels``. Same inputs and seed -> same interval.
    """
    values = _as_bool(correct)
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; choose one of {STATISTICS}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    rng = np.random.Generator(np.random.PCG64(seed))
    if statistic == "accuracy":
        n = values.size
        draws = rng.binomial(n, values.mean(), size=n_resamples) / n
    else:
        if labels is None:
            raise ValueError("statistic 'mean_per_class' needs labels")
        totals, hits = _class_counts(values, labels)
        counts = rng.binomial(totals, hits / totals, size=(n_resamples, totals.size))
        draws = (counts / totals).mean(axis=1)
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def summarize(
    correct: np.ndarray,
    labels: np.ndarray | None,
    unparsable: np.ndarray | None,
    *,
    primary: str,
) -> dict[str, Any]:
    """Metrics of one model on one benchmark, JSON-ready.

    Out: {"accuracy", "mean_per_class" (null without labels), "n", "unparsable" (rate), "ci95"
    ([lo, hi] of the primary statistic), "primary"}; fractions in [0, 1].
    """
    if labels is None and primary != "accuracy":
        raise ValueError(f"primary statistic {primary!r} needs class labels")
    if primary not in STATISTICS:
        raise ValueError(f"unknown primary statistic {primary!r}; choose one of {STATISTICS}")
    values = _as_bool(correct)
    rate = 0.0
    if unparsable is not None:
        flags = _as_bool(unparsable)
        if flags.shape != values.shape:
            raise ValueError(f"unparsable has shape {flags.shape}, correct has {values.shape}")
        rate = float(flags.mean())
    low, high = bootstrap_ci(values, labels, statistic=primary)
    return {
        "accuracy": accuracy(values),
        "mean_per_class": None if labels is None else mean_per_class_accuracy(values, labels),
        "n": int(values.size),
        "unparsable": rate,
        "ci95": [low, high],
        "primary": primary,
    }
