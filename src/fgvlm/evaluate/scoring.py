"""Model-agnostic scoring of multiple-choice questions, batched and resumable.

Every VLM runner (``fgvlm.evaluate.runners``) implements ``fgvlm.mcq.MCQModel``: greedy
generation and continuation log-probabilities. On top of those two calls this module scores
questions in three modes:

- ``generate``: the paper's protocol: a greedy answer of at most ``max_new_tokens`` tokens,
  then ``fgvlm.evaluate.answers.extract_answer`` (None when no option can be read from it).
- ``letter_likelihood``: the option letter ("A", "B", ...) the model finds most likely as its
  answer right after the prompt.
- ``option_likelihood``: the option whose text the model finds most likely as its answer. The
  score is the *sum* of the text's token log-probabilities, i.e. the log-probability of
  answering exactly that text; no length normalisation (a proper probability, and one that does
  not depend on how the tokenizer segments the name). Ties go to the first option. The text is
  scored after the item's ``cloze_prompt`` when it has one (the question without the lettered
  options and the letter instruction: a prompt that asks for a letter makes every option's text
  an unlikely answer), else after its ``prompt``.

Results are written in parts (``part-00000.parquet`` ...) so a killed evaluation resumes where
it stopped; ``merge_parts`` turns the parts into the predictions frame.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image
from tqdm import tqdm

from fgvlm.evaluate.answers import extract_answer
from fgvlm.evaluate.prompts import cloze_prompt, mcq_prompt, open_prompt
from fgvlm.io import write_parquet
from fgvlm.mcq import MCQItem, MCQModel, option_letters

log = logging.getLogger(__name__)

MODES = ("generate", "letter_likelihood", "option_likelihood")
PART_PREFIX = "part-"
PART_META_KEY = "fgvlm_scoring"

PART_SCHEMA = {
    "qid": pl.String,
    "output": pl.String,
    "pred": pl.String,
    "mode": pl.String,
    "scores": pl.List(pl.Float64),
}


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; choose one of {MODES}")


def _argmax(scores: Sequence[float], qid: str) -> int:
    """Index of the highest score, the first one on ties; NaN is an error (it would hide a bug)."""
    if any(math.isnan(s) for s in scores):
        raise ValueError(f"question {qid}: NaN option score in {list(scores)}")
    best = 0
    for i, value in enumerate(scores):
        if value > scores[best]:
            best = i
    return best


def _checked_scores(
    scores: list[list[float]], items: list[MCQItem], continuations: list[list[str]]
) -> list[list[float]]:
    """``scores`` as floats after checking they have one value per continuation."""
    if len(scores) != len(items):
        raise ValueError(f"model returned {len(scores)} score lists for {len(items)} questions")
    for item, row, conts in zip(items, scores, continuations, strict=True):
        if len(row) != len(conts):
            raise ValueError(
                f"question {item.qid}: model returned {len(row)} scores for {len(conts)} options"
            )
    return [[float(s) for s in row] for row in scores]


def score_batch(
    model: MCQModel, items: list[MCQItem], *, mode: str, max_new_tokens: int = 8
) -> list[dict[str, Any]]:
    """Score one batch. Out per item: {"qid", "output", "pred" (letter or None), "mode",
    "scores" (one float per option; None for ``generate``)}.

    ``output`` is the generated text (generate), the chosen letter (letter_likelihood) or the
    chosen option's text (option_likelihood).
    """
    _check_mode(mode)
    if mode == "generate":
        outputs = model.generate(items, max_new_tokens=max_new_tokens)
        if len(outputs) != len(items):
            raise ValueError(f"model returned {len(outputs)} answers for {len(items)} questions")
        return [
            {
                "qid": item.qid,
                "output": output,
                "pred": extract_answer(output, item.options),
                "mode": mode,
                "scores": None,
            }
            for item, output in zip(items, outputs, strict=True)
        ]
    letters = [option_letters(item) for item in items]
    asked = [_asked(item, mode) for item in items]
    continuations = letters if mode == "letter_likelihood" else [item.options for item in items]
    scores = _checked_scores(
        model.continuation_logprobs(asked, continuations), items, continuations
    )
    rows = []
    for item, conts, row, item_letters in zip(items, continuations, scores, letters, strict=True):
        choice = _argmax(row, item.qid)
        rows.append(
            {
                "qid": item.qid,
                "output": conts[choice],
                "pred": item_letters[choice],
                "mode": mode,
                "scores": row,
            }
        )
    return rows


def _asked(item: MCQItem, mode: str) -> MCQItem:
    """The item as the model is asked it in ``mode``: ``option_likelihood`` scores the option
    texts after the cloze prompt when the item has one."""
    if mode == "option_likelihood" and item.cloze_prompt:
        return replace(item, prompt=item.cloze_prompt)
    return item


def length_order(model: MCQModel, items: Sequence[MCQItem], mode: str) -> list[int]:
    """Indices of ``items`` from the longest prompt to the shortest (ties in item order), so
    that a batch holds prompts of similar length and pads little. The length is the runner's
    ``prompt_length`` (image tokens included) where it has one, else the prompt's characters."""
    measure = getattr(model, "prompt_length", None)
    lengths = [
        measure(_asked(item, mode)) if measure else len(_asked(item, mode).prompt) for item in items
    ]
    return sorted(range(len(items)), key=lambda i: (-lengths[i], i))


def _score_sorted(
    model: MCQModel,
    items: Sequence[MCQItem],
    *,
    mode: str,
    batch_size: int,
    max_new_tokens: int,
    sort_by_length: bool,
    bar: tqdm,
) -> list[dict[str, Any]]:
    """Rows of ``items`` in item order, scored in batches of similar prompt length (or in item
    order when ``sort_by_length`` is off). Answers do not depend on the batches a runner sees
    (``MCQModel``), so sorting changes speed only."""
    order = length_order(model, items, mode) if sort_by_length else list(range(len(items)))
    rows: list[dict[str, Any] | None] = [None] * len(items)
    for batch in _batches(order, batch_size):
        scored = score_batch(
            model, [items[i] for i in batch], mode=mode, max_new_tokens=max_new_tokens
        )
        for i, row in zip(batch, scored, strict=True):
            rows[i] = row
        bar.update(len(batch))
    return rows  # type: ignore[return-value]


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be positive, got {size}")
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _progress(total: int | None, desc: str) -> tqdm:
    """A progress bar counting questions, so its rate reads questions/s."""
    return tqdm(total=total, desc=desc, unit="question", dynamic_ncols=True)


def _check_unique(qids: Iterable[str], where: str) -> None:
    seen: set[str] = set()
    for qid in qids:
        if qid in seen:
            raise ValueError(f"{where}: question id {qid!r} occurs twice")
        seen.add(qid)


def score(
    model: MCQModel,
    items: Sequence[MCQItem],
    *,
    mode: str,
    batch_size: int,
    max_new_tokens: int = 8,
    sort_by_length: bool = True,
) -> list[dict[str, Any]]:
    """Score ``items`` in batches (see ``score_batch`` for the rows); rows in item order.
    Batches group prompts of similar length (``length_order``) unless ``sort_by_length`` is off.
    """
    _check_mode(mode)
    _check_unique((item.qid for item in items), "score")
    with _progress(len(items), f"{model.name} {mode}") as bar:
        return _score_sorted(
            model,
            list(items),
            mode=mode,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            sort_by_length=sort_by_length,
            bar=bar,
        )


def agreement(preds_a: Sequence[str | None], preds_b: Sequence[str | None]) -> float:
    """Fraction of questions on which two prediction lists are equal (None equals None)."""
    if len(preds_a) != len(preds_b):
        raise ValueError(f"prediction lists differ in length: {len(preds_a)} vs {len(preds_b)}")
    if not preds_a:
        raise ValueError("agreement of empty prediction lists is undefined")
    return sum(a == b for a, b in zip(preds_a, preds_b, strict=True)) / len(preds_a)


def files_fingerprint(*paths: str | os.PathLike) -> str:
    """A short hash of the files under ``paths`` (relative name, size, mtime): changes whenever
    a model or question file is rewritten, so parts scored with old inputs are not reused."""
    digest = hashlib.sha256()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root}: cannot fingerprint a missing path")
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            stat = path.stat()
            name = path.relative_to(root) if root.is_dir() else path.name
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def part_path(parts_dir: Path, index: int) -> Path:
    """``parts_dir/part-00003.parquet`` for index 3."""
    return Path(parts_dir) / f"{PART_PREFIX}{index:05d}.parquet"


def _part_meta(model: MCQModel, mode: str, max_new_tokens: int, fingerprint: str) -> dict:
    """What must match for a written part to be reused (the qids are checked separately)."""
    meta = {"model": model.name, "mode": mode, "fingerprint": fingerprint}
    if mode == "generate":
        meta["max_new_tokens"] = max_new_tokens
    return meta


def _reusable(path: Path, qids: list[str], meta: dict) -> bool:
    """True when ``path`` is a finished part for exactly these questions and settings."""
    if not path.is_file():
        return False
    try:
        stored = json.loads(pl.read_parquet_metadata(path).get(PART_META_KEY, "null"))
        written = pl.read_parquet(path, columns=["qid"])["qid"].to_list()
    except Exception as err:  # an unreadable part is recomputed, never trusted
        log.warning("%s: unreadable part, recomputing (%s)", path, err)
        return False
    if stored != meta or written != qids:
        log.info("%s: written for other questions or settings, recomputing", path)
        return False
    return True


def score_to_parts(
    model: MCQModel,
    items: Iterable[MCQItem],
    parts_dir: str | os.PathLike,
    *,
    mode: str,
    batch_size: int,
    part_size: int,
    max_new_tokens: int = 8,
    fingerprint: str = "",
    total: int | None = None,
    sort_by_length: bool = True,
) -> dict[str, int]:
    """Score ``items`` into ``parts_dir/part-NNNNN.parquet``, ``part_size`` questions per part.

    Part k holds items [k * part_size, (k + 1) * part_size), written atomically. A part already
    written for the same questions, model name, mode, ``max_new_tokens`` (generate) and
    ``fingerprint`` (e.g. ``files_fingerprint(model_dir, questions)``) is kept without calling the
    model, so rerunning a killed evaluation resumes where it stopped; anything else is
    recomputed. Batches never straddle parts, so a resumed run gives the same rows as an
    uninterrupted one; within a part, batches group prompts of similar length
    (``length_order``, unless ``sort_by_length`` is off) and rows are written in item order.
    Parts past the last one (an older, longer item list) are deleted.
    ``items`` may be a stream (one part in memory at a time); ``total`` sizes the progress bar.
    Out: {"parts", "computed", "reused"} counts.
    """
    _check_mode(mode)
    if part_size < 1:
        raise ValueError(f"part size must be positive, got {part_size}")
    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    meta = _part_meta(model, mode, max_new_tokens, fingerprint)
    if total is None and isinstance(items, Sequence):
        total = len(items)
    counts = {"parts": 0, "computed": 0, "reused": 0}
    seen: set[str] = set()
    start = time.perf_counter()
    with _progress(total, f"{model.name} {mode}") as bar:
        for index, chunk in enumerate(_batches(items, part_size)):
            qids = [item.qid for item in chunk]
            for qid in qids:
                if qid in seen:
                    raise ValueError(f"{parts_dir}: question id {qid!r} occurs twice")
                seen.add(qid)
            path = part_path(parts_dir, index)
            counts["parts"] += 1
            if _reusable(path, qids, meta):
                counts["reused"] += 1
                bar.update(len(chunk))
                continue
            rows = _score_sorted(
                model,
                chunk,
                mode=mode,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                sort_by_length=sort_by_length,
                bar=bar,
            )
            frame = pl.DataFrame(rows, schema=PART_SCHEMA)
            write_parquet(frame, path, metadata={PART_META_KEY: json.dumps(meta, sort_keys=True)})
            counts["computed"] += 1
    for stale in sorted(parts_dir.glob(f"{PART_PREFIX}*.parquet"))[counts["parts"] :]:
        stale.unlink()
    log.info(
        "%s %s: %d parts (%d computed, %d reused) in %.1f s",
        model.name,
        mode,
        counts["parts"],
        counts["computed"],
        counts["reused"],
        time.perf_counter() - start,
    )
    return counts


def merge_parts(parts_dir: str | os.PathLike, answers: Mapping[str, str]) -> pl.DataFrame:
    """The predictions frame of a finished ``score_to_parts`` run.

    In: the parts folder and the correct letter of every question (qid -> letter, in question
    order). Out: qid, output, pred, correct (pred == answer; a None pred is wrong), mode, scores,
    one row per question in ``answers`` order. Missing or unknown questions are errors.
    """
    parts_dir = Path(parts_dir)
    paths = sorted(parts_dir.glob(f"{PART_PREFIX}*.parquet"))
    if not paths:
        raise FileNotFoundError(f"{parts_dir}: no {PART_PREFIX}*.parquet files")
    frame = pl.concat([pl.read_parquet(p) for p in paths], how="vertical")
    _check_unique(frame["qid"].to_list(), str(parts_dir))
    modes = frame["mode"].unique().to_list()
    if len(modes) != 1:
        raise ValueError(f"{parts_dir}: parts mix scoring modes {sorted(modes)}")
    scored = set(frame["qid"].to_list())
    unknown = scored - set(answers)
    if unknown:
        raise ValueError(f"{parts_dir}: predictions for unknown questions, e.g. {min(unknown)!r}")
    missing = [qid for qid in answers if qid not in scored]
    if missing:
        raise ValueError(
            f"{parts_dir}: {len(missing)} questions not scored yet, e.g. {missing[0]!r} "
            "(run score_to_parts to completion first)"
        )
    order = pl.DataFrame(
        {"qid": list(answers), "answer": list(answers.values()), "_row": range(len(answers))},
        schema={"qid": pl.String, "answer": pl.String, "_row": pl.Int64},
    )
    return (
        frame.join(order, on="qid", how="inner")
        .sort("_row")
        .with_columns(correct=(pl.col("pred") == pl.col("answer")).fill_null(False))
        .select("qid", "output", "pred", "correct", "mode", "scores")
    )


def evaluate_mcq(
    model: MCQModel,
    items: Sequence[MCQItem] | Callable[[], Iterable[MCQItem]],
    answers: Mapping[str, str],
    parts_root: str | os.PathLike,
    *,
    mode: str,
    batch_size: int,
    part_size: int,
    max_new_tokens: int = 8,
    fingerprint: str = "",
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Score in ``mode`` and, for the agreement every evaluation reports, also in ``generate``.

    ``items``: the questions, or a function returning a fresh stream of them (called once per
    mode, so images need not all be in memory). Parts go to ``parts_root/<mode>/``.
    Out: the predictions frame (``merge_parts`` columns of ``mode`` plus generate_output,
    generate_pred, generate_correct) and {"mode", "n", "agreement_with_generate"}.
    """
    _check_mode(mode)
    modes = [mode] if mode == "generate" else [mode, "generate"]
    frames = {}
    for current in modes:
        stream = items() if callable(items) else items
        score_to_parts(
            model,
            stream,
            Path(parts_root) / current,
            mode=current,
            batch_size=batch_size,
            part_size=part_size,
            max_new_tokens=max_new_tokens,
            fingerprint=fingerprint,
            total=len(answers),
        )
        frames[current] = merge_parts(Path(parts_root) / current, answers)
    generated = frames["generate"].select(
        "qid",
        generate_output="output",
        generate_pred="pred",
        generate_correct="correct",
    )
    predictions = frames[mode].join(generated, on="qid", how="left", maintain_order="left")
    summary = {
        "mode": mode,
        "n": predictions.height,
        "agreement_with_generate": agreement(
            predictions["pred"].to_list(), predictions["generate_pred"].to_list()
        ),
    }
    return predictions, summary


OPTION_PROMPTS = ("cloze", "listed")


def question_items(
    samples: Iterable[tuple[dict[str, Any], Image.Image | None]],
    *,
    style: str,
    option_prompt: str = "cloze",
) -> Iterator[MCQItem]:
    """``MCQItem``s from (question record, image) pairs, e.g. ``iter_question_samples``; a
    record's decoded ``extra_images`` (``fgvlm.evaluate.runners.question_source``) follow the
    image.

    The prompt is ``fgvlm.evaluate.prompts.mcq_prompt`` of the record's question, options and
    hint (when it has one) in the model family's ``style``. ``option_prompt`` says what
    ``option_likelihood`` scores the options after: ``cloze`` (the hint and question alone,
    ``cloze_prompt``) or ``listed`` (the full prompt).
    """
    if option_prompt not in OPTION_PROMPTS:
        raise ValueError(f"option_prompt {option_prompt!r}: choose one of {OPTION_PROMPTS}")

    for record, image in samples:
        for key in ("qid", "question", "options"):
            if key not in record:
                raise ValueError(f"question {record.get('qid', '?')}: record lacks {key!r}")
        if record.get("open"):  # no options shown: they hold the gold answer's text
            prompt = open_prompt(record["question"], hint=record.get("hint"), style=style)
        else:
            prompt = mcq_prompt(
                record["question"], list(record["options"]), hint=record.get("hint"), style=style
            )
        cloze = (
            cloze_prompt(record["question"], hint=record.get("hint"))
            if option_prompt == "cloze"
            else None
        )
        extra = tuple(record.get("extra_images", ()))
        yield MCQItem(record["qid"], image, prompt, list(record["options"]), cloze, extra)
