"""CLIP zero-shot baselines on the multiple-choice benchmarks.

The standard zero-shot setup (paper Sec. 3.3, App. B.1): images and prompted class names are
embedded, and cosine similarity picks the class, once among all classes (N-way) and once
among the question's options (5-way, comparable with the VLMs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

from fgvlm.evaluate.metrics import accuracy, bootstrap_ci, mean_per_class_accuracy, summarize
from fgvlm.mcq import LETTERS
from fgvlm.models.clip import LoadedClip, encode_class_prompts, encode_images

PREDICTION_SCHEMA = {
    "qid": pl.String,
    "output": pl.String,
    "pred": pl.String,
    "correct": pl.Boolean,
    "label": pl.Int64,
    "nway_pred": pl.Int64,
    "nway_correct": pl.Boolean,
}


def _check_record(record: dict[str, Any], classnames: list[str]) -> None:
    """The record's options are valid class indices whose names match ``classnames``."""
    qid = record.get("qid", "?")
    for key in ("qid", "options", "option_labels", "answer", "label"):
        if key not in record:
            raise ValueError(f"question {qid}: record lacks {key!r}")
    for name, label in zip(record["options"], record["option_labels"], strict=True):
        if not 0 <= label < len(classnames) or classnames[label] != name:
            raise ValueError(
                f"question {qid}: option {name!r} with label {label} does not match the "
                f"class-name list ({len(classnames)} classes)"
            )


def _split(samples: Iterable[tuple[dict, Image.Image]], records: list[dict]) -> Iterator:
    """Yield the images of ``samples`` while collecting their records (images stay lazy)."""
    for record, image in samples:
        records.append(record)
        yield image


def evaluate_clip(
    samples: Iterable[tuple[dict, Image.Image]],
    clip: LoadedClip,
    classnames: list[str],
    templates: list[str],
    *,
    batch_size: int,
    device: str = "cpu",
    primary: str = "accuracy",
) -> tuple[pl.DataFrame, dict]:
    """Zero-shot CLIP on questions: N-way (all classes) and 5-way (the record's options).

    In: (question record, image) pairs, the model, the benchmark's class names and templates.
    Out: predictions sorted by qid (qid, output = chosen option's name, pred = its letter,
    correct, label, nway_pred, nway_correct) and metrics = ``summarize`` of the 5-way results
    plus nway_accuracy, nway_mean_per_class and nway_ci95 (of the primary statistic).
    """
    records: list[dict] = []
    image_emb = encode_images(clip, _split(samples, records), batch_size, device)
    if not records:
        raise ValueError("no questions to evaluate")
    class_emb = encode_class_prompts(clip, classnames, templates, device)
    logits = image_emb @ class_emb.T
    rows = []
    for record, scores in zip(records, logits, strict=True):
        _check_record(record, classnames)
        option_labels = np.asarray(record["option_labels"], dtype=np.int64)
        choice = int(np.argmax(scores[option_labels]))
        nway = int(np.argmax(scores))
        label = int(record["label"])
        rows.append(
            {
                "qid": record["qid"],
                "output": record["options"][choice],
                "pred": LETTERS[choice],
                "correct": LETTERS[choice] == record["answer"],
                "label": label,
                "nway_pred": nway,
                "nway_correct": nway == label,
            }
        )
    predictions = pl.DataFrame(rows, schema=PREDICTION_SCHEMA).sort("qid")
    labels = predictions["label"].to_numpy()
    nway_correct = predictions["nway_correct"].to_numpy()
    metrics = summarize(predictions["correct"].to_numpy(), labels, None, primary=primary)
    metrics["nway_accuracy"] = accuracy(nway_correct)
    metrics["nway_mean_per_class"] = mean_per_class_accuracy(nway_correct, labels)
    metrics["nway_ci95"] = list(bootstrap_ci(nway_correct, labels, statistic=primary))
    return predictions, metrics
