"""Accuracy, mean-per-class accuracy, bootstrap intervals and metric summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fgvlm.evaluate.metrics import (
    accuracy,
    bootstrap_ci,
    mean_per_class_accuracy,
    summarize,
)

# unbalanced: class 0 has 4 items (3 right), class 1 has 1 item (wrong), class 7 has 1 (right)
CORRECT = np.array([True, True, True, False, False, True])
LABELS = np.array([0, 0, 0, 0, 1, 7])


def test_accuracy_and_mean_per_class_by_hand():
    assert accuracy(CORRECT) == pytest.approx(4 / 6)
    assert mean_per_class_accuracy(CORRECT, LABELS) == pytest.approx((3 / 4 + 0 + 1) / 3)
    assert accuracy(np.array([1, 0, 0, 1])) == 0.5
    # balanced classes: the two statistics agree
    assert mean_per_class_accuracy(np.array([1, 0, 1, 1]), np.array([0, 0, 1, 1])) == 0.75


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: accuracy(np.array([], dtype=bool)), "non-empty"),
        (lambda: accuracy(np.array([0, 2])), "boolean"),
        (lambda: mean_per_class_accuracy(CORRECT, LABELS[:3]), "shape"),
        (lambda: bootstrap_ci(CORRECT, statistic="mean_per_class"), "needs labels"),
        (lambda: bootstrap_ci(CORRECT, statistic="median"), "median"),
        (lambda: bootstrap_ci(CORRECT, level=1.5), "level"),
        (lambda: summarize(CORRECT, LABELS, None, primary="top5"), "top5"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("statistic", ["accuracy", "mean_per_class"])
def test_bootstrap_is_deterministic_and_contains_the_estimate(statistic):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, 500)
    correct = rng.random(500) < 0.3 + labels / 40
    estimate = (
        accuracy(correct) if statistic == "accuracy" else mean_per_class_accuracy(correct, labels)
    )
    low, high = bootstrap_ci(correct, labels, statistic=statistic, seed=1)
    assert (low, high) == bootstrap_ci(correct, labels, statistic=statistic, seed=1)
    assert (low, high) != bootstrap_ci(correct, labels, statistic=statistic, seed=2)
    assert 0 <= low < estimate < high <= 1
    assert type(low) is float and type(high) is float


def test_bootstrap_width_matches_the_binomial_standard_error():
    correct = np.arange(10_000) % 2 == 0  # accuracy 0.5
    low, high = bootstrap_ci(correct, n_resamples=4000)
    half_width = 1.96 * np.sqrt(0.25 / 10_000)
    assert low == pytest.approx(0.5 - half_width, abs=0.002)
    assert high == pytest.approx(0.5 + half_width, abs=0.002)
    narrower = bootstrap_ci(correct, level=0.5)
    assert low < narrower[0] < narrower[1] < high


def test_bootstrap_of_perfect_scores_is_a_point():
    assert bootstrap_ci(np.ones(30, dtype=bool)) == (1.0, 1.0)


def test_summarize_is_json_ready():
    unparsable = np.array([False, False, True, False, False, False])
    got = summarize(CORRECT, LABELS, unparsable, primary="mean_per_class")
    assert set(got) == {"accuracy", "mean_per_class", "n", "unparsable", "ci95", "primary"}
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["mean_per_class"] == pytest.approx(7 / 12)
    assert got["n"] == 6 and type(got["n"]) is int
    assert got["unparsable"] == pytest.approx(1 / 6)
    assert got["primary"] == "mean_per_class"
    assert got["ci95"] == list(bootstrap_ci(CORRECT, LABELS, statistic="mean_per_class"))
    assert all(type(v) is float for v in (got["accuracy"], got["mean_per_class"], *got["ci95"]))
    assert json.loads(json.dumps(got)) == got
    plain = summarize(CORRECT, LABELS, None, primary="accuracy")
    assert plain["unparsable"] == 0.0
    assert plain["ci95"] == list(bootstrap_ci(CORRECT))
