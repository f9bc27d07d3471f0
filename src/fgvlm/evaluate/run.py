"""One VLM on one benchmark: load its runner, read the questions, score them in resumable parts,
and summarize (metrics with intervals, per-class or per-category details)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl

from fgvlm.evaluate.analysis import per_class_report
from fgvlm.evaluate.metrics import summarize
from fgvlm.evaluate.runners import load_runner, question_source
from fgvlm.evaluate.scoring import evaluate_mcq, files_fingerprint, question_items

log = logging.getLogger(__name__)


def evaluate_vlm(
    spec: dict,
    *,
    model_dir: Path,
    data: Path,
    questions: Path | None,
    parts_dir: Path,
    batch_size: int,
    part_size: int,
    device: str,
) -> tuple[pl.DataFrame, dict, dict]:
    """Evaluate one VLM on one benchmark (``spec``: ``fgvlm.config.vlm_eval_spec``).

    ``data`` is the question shards (with their ``questions`` file: the answer key) or a
    VLMEvalKit TSV. Answers are scored in parts under ``parts_dir`` so that a killed job
    resumes. Returns the predictions, the metrics (with the agreement of the scoring mode with
    greedy generation) and the details (per-class accuracy and confusions, or per-category).
    """
    model, benchmark = spec["model"], spec["benchmark"]
    runner = load_runner(model, model_dir, device=device)
    stream, answers, counts = question_source(benchmark, data, questions)
    option_prompt = model["option_prompt"]
    predictions, summary = evaluate_mcq(
        runner,
        lambda: question_items(stream(), style=model["style"], option_prompt=option_prompt),
        answers,
        parts_dir,
        mode=model["mode"],
        batch_size=batch_size,
        part_size=part_size,
        max_new_tokens=model["max_new_tokens"],
        # parts scored after another prompt are not reused
        fingerprint=f"{files_fingerprint(model_dir, questions or data)}:{option_prompt}",
    )
    if benchmark["kind"] == "questions":
        question_table = pl.read_parquet(questions)
        labels = predictions.join(question_table.select("qid", "label"), on="qid", how="left")
        details = per_class_report(predictions, question_table)
        correct = predictions["correct"].to_numpy()
        unparsable = predictions["pred"].is_null().to_numpy()
        labels = labels["label"].to_numpy()
    else:
        predictions = predictions.with_columns(
            pl.col("qid").replace_strict(counts["groups"], default=pl.col("qid")).alias("group")
        )
        correct, unparsable, details = _vqa_correctness(predictions, counts)
        labels = None
    metrics = summarize(correct, labels, unparsable, primary=benchmark["metric"])
    metrics.update(summary)
    metrics["generate_accuracy"] = float(np.mean(predictions["generate_correct"].to_numpy()))
    metrics["questions"] = {k: v for k, v in counts.items() if not isinstance(v, dict)}
    metrics["model"], metrics["style"] = model["name"], model["style"]
    return predictions, metrics, details


def _vqa_correctness(predictions: pl.DataFrame, counts: dict):
    """Per-question (or, for MMBench's CircularEval copies, per-group: all copies right)
    correctness, unparsable flags, and per-category accuracy. ``predictions`` has a ``group``
    column (the question itself when it has no copies)."""
    frame = predictions.with_columns(
        pl.col("qid").replace_strict(counts.get("categories") or {}, default="").alias("category"),
    )
    grouped = frame.group_by("group", maintain_order=True).agg(
        pl.col("correct").all(),
        pl.col("pred").is_null().any().alias("unparsable"),
        pl.col("category").first(),
    )
    per_category = (
        grouped.group_by("category")
        .agg(pl.col("correct").mean().alias("accuracy"), pl.len().alias("n"))
        .sort("category")
    )
    details = {"per_category": per_category.to_dicts(), "groups": grouped.height}
    return grouped["correct"].to_numpy(), grouped["unparsable"].to_numpy().astype(np.bool_), details
