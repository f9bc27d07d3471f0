"""One VLM on one benchmark: load its runner, read the questions, score them in resumable parts,
and summarize (metrics with intervals, per-class or per-category details)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fgvlm.evaluate.analysis import per_class_report
from fgvlm.evaluate.metrics import summarize
from fgvlm.evaluate.runners import eval_dtype, load_runner, question_source
from fgvlm.evaluate.scoring import evaluate_mcq, files_fingerprint, question_items
from fgvlm.mcq import MCQItem

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
    loader_workers: int = 0,
) -> tuple[pl.DataFrame, dict, dict]:
    """Evaluate one VLM on one benchmark (``spec``: ``fgvlm.config.vlm_eval_spec``).

    ``data`` is the question shards (with their ``questions`` file: the answer key) or a
    VLMEvalKit TSV. Images are decoded and prompts built in ``loader_workers`` processes
    (``load_items``). Answers are scored in parts under ``parts_dir`` so that a killed job
    resumes. Returns the predictions, the metrics (with the agreement of the scoring mode with
    greedy generation) and the details (per-class accuracy and confusions, or per-category).
    """
    model, benchmark = spec["model"], spec["benchmark"]
    runner = load_runner(model, model_dir, device=device, dtype=model["dtype"])
    all_images = model.get("all_images", False)  # set for the models shown every image
    raw, decode, answers, counts = question_source(
        benchmark, data, questions, all_images=all_images
    )
    option_prompt = model["option_prompt"]
    # parts scored after another prompt, in another dtype or with other images are not reused
    fingerprint = f"{files_fingerprint(model_dir, questions or data)}:{option_prompt}"
    if dtype := eval_dtype(model["dtype"], device):
        fingerprint += f":{dtype}"
    if all_images:
        fingerprint += ":all_images"
    predictions, summary = evaluate_mcq(
        runner,
        partial(
            load_items,
            QuestionItems(raw, decode, style=model["style"], option_prompt=option_prompt),
            workers=loader_workers,
        ),
        answers,
        parts_dir,
        mode=model["mode"],
        batch_size=batch_size,
        part_size=part_size,
        max_new_tokens=model["max_new_tokens"],
        fingerprint=fingerprint,
    )
    if benchmark["format"] == "questions":
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


class QuestionItems(IterableDataset):
    """``MCQItem``s of a raw sample stream: each sample decoded (``decode``) and prompted
    (``question_items``). In a ``DataLoader``, worker w of n takes samples w, w + n, ...; the
    loader hands the workers' items back in turn, i.e. in stream order."""

    def __init__(
        self,
        raw: Callable[[], Iterable[Any]],
        decode: Callable[[Any], tuple[dict, Any]],
        *,
        style: str,
        option_prompt: str,
    ) -> None:
        self.raw, self.decode = raw, decode
        self.style, self.option_prompt = style, option_prompt

    def __iter__(self) -> Iterator[MCQItem]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = (
            self.decode(sample)
            for index, sample in enumerate(self.raw())
            if index % workers == worker
        )
        yield from question_items(mine, style=self.style, option_prompt=self.option_prompt)


def _as_is(item: MCQItem) -> MCQItem:
    return item


def load_items(dataset: QuestionItems, *, workers: int) -> Iterator[MCQItem]:
    """The dataset's items in stream order, decoded in ``workers`` loader processes while the
    caller scores (0: here, one at a time)."""
    if workers == 0:
        return iter(dataset)
    loader = DataLoader(
        dataset, batch_size=None, num_workers=workers, collate_fn=_as_is, prefetch_factor=8
    )
    return iter(loader)


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
