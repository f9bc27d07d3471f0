"""VLMEvalKit's multiple-choice TSV benchmarks (MMBench_DEV_EN, MMMU_DEV_VAL, MMStar) as records.

A VLMEvalKit MCQ TSV has one row per question: ``index``, ``question``, ``hint`` (optional),
option columns ``A``..``I`` (empty past the question's options), ``answer`` (a letter),
``category`` and ``image`` (base64). The quirks follow VLMEvalKit's ImageBaseDataset:
- MMBench: an image cell of at most 64 characters holds the index of another row whose image it
  shares (follow-up questions and CircularEval copies, index + k * 1,000,000).
- MMMU: a ``split`` column ("dev", "validation"); "open" questions without options; an image
  cell may be a list of base64 images (a question about several images).
Rows are read with the csv module (no pandas); every kept image is decoded by PIL once.
"""

from __future__ import annotations

import ast
import base64
import binascii
import contextlib
import csv
import io
import json
import string
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

REQUIRED_COLUMNS = ("index", "question", "answer", "category", "image")
OPTION_LETTERS = string.ascii_uppercase
MAX_REFERENCE_LEN = 64  # VLMEvalKit: an image cell this short is another row's index
CIRCULAR_OFFSET = 1_000_000  # MMBench CircularEval copies: index + k * 1,000,000


@contextlib.contextmanager
def _large_fields() -> Iterator[None]:
    """Let the csv module read cells of any size (base64 images), then restore its limit."""
    previous = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _cell(row: dict[str, str | None], column: str) -> str | None:
    """A cell's stripped text, ``None`` when the column is absent or the cell is empty/NaN."""
    value = row.get(column)
    if value is None:
        return None
    value = value.strip()
    return None if value == "" or value.lower() == "nan" else value


def _options(row: dict[str, str | None], where: str) -> list[str]:
    """The row's option texts, contiguous from A; a gap ("A", "", "C") is an error."""
    values = [_cell(row, letter) for letter in OPTION_LETTERS]
    count = len(values) - next((i for i, v in enumerate(reversed(values)) if v is not None), 26)
    options = values[:count]
    if any(v is None for v in options):
        missing = OPTION_LETTERS[options.index(None)]
        raise ValueError(f"{where}: option {missing} is empty but a later option is set")
    return options  # type: ignore[return-value]


def _image_list(cell: str) -> list[str]:
    """The base64 strings of an image cell: one, or a JSON/Python list of several (MMMU)."""
    if not cell.startswith("["):
        return [cell]
    try:
        values = json.loads(cell)
    except json.JSONDecodeError:
        values = ast.literal_eval(cell)  # pandas writes lists with single quotes
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ValueError("image cell is not a non-empty list of base64 strings")
    return values


def _decode_image(b64: str) -> bytes:
    """Raw image bytes from base64, checked by fully decoding them with PIL."""
    data = base64.b64decode(b64.strip(), validate=True)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
    return data


def _resolve(key: str, cells: dict[str, str], where: str) -> str:
    """The image cell of row ``key``, following a short cell to the row it names."""
    cell = cells[key]
    if len(cell) > MAX_REFERENCE_LEN:
        return cell
    target = cells.get(cell)
    if target is None:
        raise ValueError(f"{where}: image refers to row index {cell!r}, which is not in the file")
    if len(target) <= MAX_REFERENCE_LEN:
        raise ValueError(f"{where}: image refers to row index {cell!r}, which holds no image")
    return target


def scan_vlmeval_tsv(
    path: Path, *, split: str | None = None
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Read a VLMEvalKit MCQ TSV: the question records and the counts of what was skipped.

    ``split``: keep only rows whose ``split`` column equals it (MMMU_DEV_VAL: "validation").
    Out: records {"qid", "question", "hint", "options", "answer", "category", "image" (bytes),
    "n_images", "group"} in file order (``group``: the qid of the question a CircularEval copy
    rotates, else the qid itself), and counts {"rows", "questions", "skipped_split",
    "skipped_open", "image_references", "multi_image", "circular"}.
    Raises ValueError naming the file and the row's index for a malformed row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VLMEvalKit TSV not found: {path}")
    with _large_fields(), path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        columns = reader.fieldnames or []
        missing = [c for c in (*REQUIRED_COLUMNS, "A") if c not in columns]
        if split is not None and "split" not in columns:
            missing.append("split")
        if missing:
            raise ValueError(f"{path}: missing required column(s) {', '.join(missing)}")
        rows = list(reader)
    cells: dict[str, str] = {}  # index -> raw image cell, over every row (references cross splits)
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        key = _cell(row, "index")
        if key is None:
            raise ValueError(f"{path}: line {number} has no index")
        if key in cells:
            raise ValueError(f"{path}: row index {key} appears twice")
        image = _cell(row, "image")
        if image is None:
            raise ValueError(f"{path}: row index {key}: empty image cell")
        cells[key] = image
    counts = Counter(rows=len(rows))
    decoded: dict[str, tuple[bytes, int]] = {}  # resolved image cell -> (first image, count)
    records = []
    for row in tqdm(rows, desc=f"read {path.name}", unit="row", leave=False):
        key = _cell(row, "index")
        where = f"{path}: row index {key}"
        if split is not None and _cell(row, "split") != split:
            counts["skipped_split"] += 1
            continue
        options = _options(row, where)
        if not options or _cell(row, "question_type") == "open":
            counts["skipped_open"] += 1  # MMMU open questions: no letter to choose
            continue
        record = _record(row, key, options, where)
        if len(cells[key]) <= MAX_REFERENCE_LEN:
            counts["image_references"] += 1
        cell = _resolve(key, cells, where)
        if cell not in decoded:
            try:
                images = _image_list(cell)
                decoded[cell] = (_decode_image(images[0]), len(images))
            except (ValueError, SyntaxError, binascii.Error, OSError) as err:
                raise ValueError(f"{where}: image cannot be decoded ({err})") from err
        record["image"], record["n_images"] = decoded[cell]
        counts["multi_image"] += record["n_images"] > 1
        counts["circular"] += record["group"] != record["qid"]
        records.append(record)
    counts["questions"] = len(records)
    names = ("rows", "questions", "skipped_split", "skipped_open")
    extra = ("image_references", "multi_image", "circular")
    return records, {name: int(counts[name]) for name in (*names, *extra)}


def _record(row: dict[str, str | None], key: str, options: list[str], where: str) -> dict:
    """The question record of one row (image filled in by the caller)."""
    answer = _cell(row, "answer")
    letters = OPTION_LETTERS[: len(options)]
    if answer is None or answer not in letters:
        raise ValueError(f"{where}: answer {answer!r} is not one of the option letters {letters}")
    question = _cell(row, "question")
    if question is None:
        raise ValueError(f"{where}: empty question")
    category = _cell(row, "category")
    if category is None:
        raise ValueError(f"{where}: empty category")
    group = key
    if key.isdigit() and int(key) >= CIRCULAR_OFFSET:
        group = str(int(key) % CIRCULAR_OFFSET)
    return {
        "qid": key,
        "question": question,
        "hint": _cell(row, "hint"),
        "options": options,
        "answer": answer,
        "category": category,
        "group": group,
    }


def read_vlmeval_tsv(path: Path, *, split: str | None = None) -> list[dict[str, Any]]:
    """The multiple-choice question records of a VLMEvalKit TSV (see ``scan_vlmeval_tsv``)."""
    return scan_vlmeval_tsv(path, split=split)[0]


def summarize_tsv(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of a benchmark's records, JSON-ready: questions, per category, per option count,
    with a hint, with several images, CircularEval copies and distinct base questions."""
    return {
        "questions": len(records),
        "categories": dict(sorted(Counter(r["category"] for r in records).items())),
        "options": {
            str(k): v for k, v in sorted(Counter(len(r["options"]) for r in records).items())
        },
        "with_hint": sum(r["hint"] is not None for r in records),
        "multi_image": sum(r.get("n_images", 1) > 1 for r in records),
        "circular": sum(r["group"] != r["qid"] for r in records),
        "groups": len({r["group"] for r in records}),
    }
