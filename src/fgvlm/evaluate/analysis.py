"""Per-class side report of one evaluation: which classes a model gets right, and what it
mistakes them for (per-class accuracy and the most confused class pairs).
"""

from __future__ import annotations

import string
from collections import Counter
from typing import Any

import numpy as np
import polars as pl

N_CONFUSIONS = 20
PREDICTION_COLUMNS = ("qid", "pred", "correct")
QUESTION_COLUMNS = ("qid", "options", "option_labels", "answer", "label", "classname")


def _check_columns(frame: pl.DataFrame, columns: tuple[str, ...], name: str) -> None:
    """Raise ValueError naming the frame and the columns it lacks."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lack column(s) {', '.join(missing)}")


def _joined(predictions: pl.DataFrame, questions: pl.DataFrame) -> pl.DataFrame:
    """Each prediction with its question; every prediction must have one, qids unique."""
    _check_columns(predictions, PREDICTION_COLUMNS, "predictions")
    _check_columns(questions, QUESTION_COLUMNS, "questions")
    for frame, name in ((predictions, "predictions"), (questions, "questions")):
        duplicated = frame.filter(pl.col("qid").is_duplicated())["qid"]
        if len(duplicated):
            raise ValueError(f"{name}: qid {duplicated[0]!r} appears more than once")
    joined = predictions.select(PREDICTION_COLUMNS).join(
        questions.select(QUESTION_COLUMNS), on="qid", how="left"
    )
    orphans = joined.filter(pl.col("answer").is_null())["qid"]
    if len(orphans):
        raise ValueError(f"predictions: qid {orphans[0]!r} is not among the questions")
    return joined.sort("qid")


def _predicted_label(row: dict[str, Any]) -> int | None:
    """The class label of the predicted letter, ``None`` when the output was unparsable."""
    pred = row["pred"]
    if pred is None:
        return None
    index = string.ascii_uppercase.find(pred)
    if not 0 <= index < len(row["option_labels"]):
        raise ValueError(f"predictions: qid {row['qid']!r} has pred {pred!r}, not an option letter")
    return int(row["option_labels"][index])


def per_class_report(predictions: pl.DataFrame, questions: pl.DataFrame) -> dict[str, Any]:
    """Per-class accuracy and the most confused (true class, predicted class) pairs, JSON-ready.

    In: predictions (qid, pred: letter or null, correct) and the benchmark's questions (qid,
    options, option_labels, answer, label, classname).
    Out: {"n", "n_classes", "unparsable", "per_class": [{"label", "classname", "n", "correct",
    "unparsable", "accuracy"}] by label, "confusions": the top ``N_CONFUSIONS`` [{"true_label",
    "true_class", "pred_label", "pred_class", "count"}] by count, then labels}.
    A prediction's ``correct`` must agree with ``pred == answer``.
    """
    joined = _joined(predictions, questions)
    if joined.height == 0:
        raise ValueError("predictions: empty, nothing to report")
    names: dict[int, str] = {}
    for row in questions.select("option_labels", "options").iter_rows():
        names.update(zip(map(int, row[0]), row[1], strict=True))  # every option's class name
    totals: Counter[int] = Counter()
    hits: Counter[int] = Counter()
    unparsable: Counter[int] = Counter()
    pairs: Counter[tuple[int, int]] = Counter()
    for row in joined.iter_rows(named=True):
        label = int(row["label"])
        names[label] = row["classname"]
        if bool(row["correct"]) != (row["pred"] == row["answer"]):
            raise ValueError(
                f"predictions: qid {row['qid']!r} has correct={row['correct']} "
                f"but pred {row['pred']!r} vs answer {row['answer']!r}"
            )
        predicted = _predicted_label(row)
        totals[label] += 1
        hits[label] += bool(row["correct"])
        if predicted is None:
            unparsable[label] += 1
        elif predicted != label:
            pairs[(label, predicted)] += 1
    per_class = [
        {
            "label": label,
            "classname": names[label],
            "n": totals[label],
            "correct": hits[label],
            "unparsable": unparsable[label],
            "accuracy": hits[label] / totals[label],
        }
        for label in sorted(totals)
    ]
    top = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:N_CONFUSIONS]
    confusions = [
        {
            "true_label": true,
            "true_class": names[true],
            "pred_label": pred,
            "pred_class": names[pred],
            "count": count,
        }
        for (true, pred), count in top
    ]
    return {
        "n": joined.height,
        "n_classes": len(totals),
        "unparsable": float(np.mean([row is None for row in joined["pred"].to_list()])),
        "per_class": per_class,
        "confusions": confusions,
    }
