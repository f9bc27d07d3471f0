"""Per-class report: accuracy by class and the most confused class pairs."""

from __future__ import annotations

import json

import polars as pl
import pytest

from fgvlm.evaluate.analysis import N_CONFUSIONS, per_class_report

NAMES = ["tulip", "rose", "daisy", "sunflower", "orchid", "lily"]


def question(i: int, label: int, option_labels: list[int]) -> dict:
    """One 5-way question whose answer is ``label``'s position in ``option_labels``."""
    return {
        "qid": f"flowers-{i:06d}",
        "image": f"img{i}",
        "question": "What type of object is in this photo?",
        "options": [NAMES[k] for k in option_labels],
        "option_labels": option_labels,
        "answer": "ABCDE"[option_labels.index(label)],
        "label": label,
        "classname": NAMES[label],
    }


QUESTIONS = pl.DataFrame(
    [
        question(0, 0, [0, 1, 2, 3, 4]),  # tulip, answer A
        question(1, 0, [1, 0, 2, 3, 4]),  # tulip, answer B
        question(2, 0, [2, 3, 0, 1, 5]),  # tulip, answer C
        question(3, 1, [0, 1, 2, 3, 4]),  # rose, answer B
        question(4, 1, [1, 0, 2, 3, 4]),  # rose, answer A
        question(5, 2, [5, 4, 3, 2, 1]),  # daisy, answer D
    ]
)


def predictions(preds: list[str | None]) -> pl.DataFrame:
    answers = QUESTIONS["answer"].to_list()
    return pl.DataFrame(
        {
            "qid": QUESTIONS["qid"],
            "output": [p or "no idea" for p in preds],
            "pred": pl.Series(preds, dtype=pl.String),
            "correct": [p == a for p, a in zip(preds, answers, strict=True)],
        }
    )


def test_per_class_accuracy_and_confusions_by_hand():
    # tulip: right, predicted rose (A of q1), unparsable; rose: predicted tulip twice; daisy: right
    report = per_class_report(predictions(["A", "A", None, "A", "B", "D"]), QUESTIONS)
    assert report["n"] == 6 and report["n_classes"] == 3
    assert report["unparsable"] == pytest.approx(1 / 6)
    assert report["per_class"] == [
        {"label": 0, "classname": "tulip", "n": 3, "correct": 1, "unparsable": 1,
         "accuracy": pytest.approx(1 / 3)},
        {"label": 1, "classname": "rose", "n": 2, "correct": 0, "unparsable": 0, "accuracy": 0.0},
        {"label": 2, "classname": "daisy", "n": 1, "correct": 1, "unparsable": 0, "accuracy": 1.0},
    ]  # fmt: skip
    assert report["confusions"] == [
        {"true_label": 1, "true_class": "rose", "pred_label": 0, "pred_class": "tulip", "count": 2},
        {"true_label": 0, "true_class": "tulip", "pred_label": 1, "pred_class": "rose", "count": 1},
    ]
    # JSON-safe and deterministic: same inputs, same text
    text = json.dumps(report, sort_keys=True)
    assert text == json.dumps(
        per_class_report(predictions(["A", "A", None, "A", "B", "D"]), QUESTIONS), sort_keys=True
    )


def test_confusion_with_a_class_without_test_images_uses_its_option_name():
    report = per_class_report(predictions(["A", "B", "E", "B", "A", "D"]), QUESTIONS)
    assert report["confusions"] == [
        {"true_label": 0, "true_class": "tulip", "pred_label": 5, "pred_class": "lily", "count": 1}
    ]


def test_top_confusions_are_capped_and_sorted():
    pairs = [(t, w) for t in range(6) for w in range(6) if t != w]  # 30 distinct pairs
    pairs += [(3, 1), (3, 1), (5, 2)]  # (3, 1) three times, (5, 2) twice
    rows, preds = [], []
    for i, (true, wrong) in enumerate(pairs):
        others = [k for k in range(6) if k not in (true, wrong)][:3]
        rows.append(question(i, true, [wrong, true, *others]))
        preds.append("A")  # the wrong class
    questions = pl.DataFrame(rows)
    frame = pl.DataFrame({"qid": questions["qid"], "pred": preds, "correct": [False] * len(preds)})
    confusions = per_class_report(frame, questions)["confusions"]
    assert len(confusions) == N_CONFUSIONS
    top = [(c["true_label"], c["pred_label"], c["count"]) for c in confusions[:3]]
    assert top == [(3, 1, 3), (5, 2, 2), (0, 1, 1)]  # by count, then by (true, predicted)
    rest = [(c["true_label"], c["pred_label"]) for c in confusions[2:]]
    assert rest == sorted(rest)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (predictions(["A"] * 6).with_columns(correct=pl.lit(True)), "correct=True but pred 'A'"),
        (predictions(["F", "A", "A", "A", "A", "A"]), "pred 'F', not an option letter"),
        (predictions(["A"] * 6).with_columns(qid=pl.lit("x")), "qid 'x' appears more than once"),
        (predictions(["A"] * 6).drop("pred"), "predictions lack column"),
        (predictions(["A"] * 6).head(0), "empty"),
    ],
)
def test_inconsistent_predictions_are_errors(frame, message):
    with pytest.raises(ValueError, match=message):
        per_class_report(frame, QUESTIONS)


def test_prediction_without_question_is_an_error():
    frame = predictions(["A"] * 6).with_columns(qid=pl.Series([f"other-{i}" for i in range(6)]))
    with pytest.raises(ValueError, match="qid 'other-0' is not among the questions"):
        per_class_report(frame, QUESTIONS)
