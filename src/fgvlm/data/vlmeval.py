"""VLMEvalKit's multiple-choice TSV benchmarks (MMBench_DEV_EN, MMMU_DEV_VAL, MMStar) as records.

A VLMEvalKit MCQ TSV has one row per question: ``index``, ``question``, ``hint`` (optional),
option columns ``A``..``I`` (empty past the question's options), ``answer`` (a letter),
``category`` and ``image`` (base64). The quirks follow VLMEvalKit's ImageBaseDataset:
- MMBench: an image cell of at most 64 characters holds the index of another row whose image it
  shares (follow-up questions and CircularEval copies, index + k * 1,000,000).
- MMMU: a ``split`` column ("dev", "validation"); "open" questions without options (scored as
  VLMEvalKit scores them, see ``scan_vlmeval_tsv``); an image cell may be a list of base64
  images with their names in ``image_path`` (a question about several images).
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
import logging
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
OPEN_OTHER = "Other Answers"  # VLMEvalKit MMMU_preproc: option B of a rewritten open question

log = logging.getLogger(__name__)


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


def _list_cell(cell: str, what: str) -> list[str]:
    """The strings of a cell: one, or a JSON/Python list of several (MMMU's multi-image rows)."""
    if not cell.startswith("["):
        return [cell]
    try:
        values = json.loads(cell)
    except json.JSONDecodeError:
        values = ast.literal_eval(cell)  # pandas writes lists with single quotes
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{what} cell is not a non-empty list of strings")
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


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str | None]]]:
    """The header and rows of a TSV; a byte that is not UTF-8 fails naming the file, the line
    and the row's index."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        number = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}: line {number} ({_row_label(data, err.start)}) is not UTF-8: "
            f"byte {data[err.start]:#04x} at file offset {err.start}"
        ) from err
    with _large_fields():
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
        return list(reader.fieldnames or []), list(reader)


def _row_label(data: bytes, offset: int) -> str:
    """ "row index N" of the line holding byte ``offset`` (the header's index column), or "header"."""
    start = data.rfind(b"\n", 0, offset) + 1
    if start == 0:
        return "header"
    end = data.find(b"\n", offset)
    fields = data[start : end if end >= 0 else len(data)].split(b"\t")
    header = data[: data.find(b"\n")].decode("utf-8", "replace").rstrip("\r").split("\t")
    column = header.index("index") if "index" in header else 0
    value = fields[column] if column < len(fields) else b"?"
    return f"row index {value.decode('utf-8', 'replace').strip()}"


def _images(cell: str, row: dict[str, str | None], where: str) -> tuple[list[bytes], list[str]]:
    """Every image of a resolved image cell, decoded, and their ``image_path`` names (VLMEvalKit's
    file names for a multi-image row; empty when the column is absent)."""
    try:
        images = [_decode_image(b64) for b64 in _list_cell(cell, "image")]
    except (ValueError, SyntaxError, binascii.Error, OSError) as err:
        raise ValueError(f"{where}: image cannot be decoded ({err})") from err
    names_cell = _cell(row, "image_path")
    names = [] if names_cell is None else _list_cell(names_cell, "image_path")
    if len(images) > 1 and names and len(names) != len(images):
        raise ValueError(f"{where}: {len(images)} images but {len(names)} image_path names")
    return images, names


def scan_vlmeval_tsv(
    path: Path, *, split: str | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read a VLMEvalKit MCQ TSV: the question records and what was read and skipped.

    ``split``: keep only rows whose ``split`` column equals it (MMMU_DEV_VAL: "validation").
    Open questions (``question_type`` "open", no options: MMMU) are kept as VLMEvalKit scores
    them (``MMMU_preproc``): options A = the gold answer text, B = "Other Answers", answer = the
    gold letter if it is one, else "A"; ``open`` marks them, and the model is to be shown the
    question without options. Any other row without options is skipped and reported.
    Out: records {"qid", "question", "hint", "options", "answer", "category", "group", "open",
    "image" (bytes: the first image), "images" (every image, in order), "image_paths",
    "n_images"} in file order (``group``: the qid of the question a CircularEval copy rotates,
    else the qid itself), and counts {"rows", "questions", "base_questions" (distinct groups: what is scored), "skipped_split", "open",
    "skipped", "image_references", "multi_image", "circular", "skipped_rows" ([{"index",
    "reason"}] of every skipped row)}.
    Raises ValueError naming the file and the row's index for a malformed row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VLMEvalKit TSV not found: {path}")
    columns, rows = _read_rows(path)
    missing = [c for c in (*REQUIRED_COLUMNS, "A") if c not in columns]
    if split is not None and "split" not in columns:
        missing.append("split")
    if missing:
        raise ValueError(f"{path}: missing required column(s) {', '.join(missing)}")
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
    counts: Counter = Counter(rows=len(rows))
    skipped: list[dict[str, str]] = []
    decoded: dict[str, tuple[list[bytes], list[str]]] = {}  # resolved image cell -> images
    records = []
    for row in tqdm(rows, desc=f"read {path.name}", unit="row", leave=False):
        key = _cell(row, "index")
        where = f"{path}: row index {key}"
        if split is not None and _cell(row, "split") != split:
            counts["skipped_split"] += 1
            continue
        options = _options(row, where)
        is_open = not options and _cell(row, "question_type") == "open"
        if not options and not is_open:
            skipped.append({"index": key, "reason": "no options"})
            log.warning("%s: skipped, no options (and not an open question)", where)
            continue
        record = _open_record(row, key, where) if is_open else _record(row, key, options, where)
        if len(cells[key]) <= MAX_REFERENCE_LEN:
            counts["image_references"] += 1
        cell = _resolve(key, cells, where)
        if cell not in decoded:
            decoded[cell] = _images(cell, row, where)
        images, names = decoded[cell]
        record.update(image=images[0], images=images, image_paths=names, n_images=len(images))
        counts["open"] += is_open
        counts["multi_image"] += len(images) > 1
        counts["circular"] += record["group"] != record["qid"]
        records.append(record)
    counts["questions"] = len(records)
    counts["base_questions"] = len({r["group"] for r in records})
    counts["skipped"] = len(skipped)
    if skipped:
        log.warning("%s: %d row(s) skipped: %s", path, len(skipped), skipped)
    names = ("rows", "questions", "base_questions", "skipped_split", "open", "skipped")
    extra = ("image_references", "multi_image", "circular")
    return records, {
        **{name: int(counts[name]) for name in (*names, *extra)},
        "skipped_rows": skipped,
    }


def _record(row: dict[str, str | None], key: str, options: list[str], where: str) -> dict:
    """The question record of one multiple-choice row (images filled in by the caller)."""
    answer = _cell(row, "answer")
    letters = OPTION_LETTERS[: len(options)]
    if answer is None or answer not in letters:
        raise ValueError(f"{where}: answer {answer!r} is not one of the option letters {letters}")
    return _base_record(row, key, options, answer, where)


def _open_record(row: dict[str, str | None], key: str, where: str) -> dict:
    """An open question as VLMEvalKit's ``MMMU_preproc`` scores it: A = the gold answer text,
    B = "Other Answers"; the gold letter is the answer itself if it is a letter, else "A"."""
    gold = _cell(row, "answer")
    if gold is None:
        raise ValueError(f"{where}: open question without an answer")
    answer = gold if gold in OPTION_LETTERS else "A"
    return {**_base_record(row, key, [gold, OPEN_OTHER], answer, where), "open": True}


def _base_record(
    row: dict[str, str | None], key: str, options: list[str], answer: str, where: str
) -> dict:
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
        "open": False,
    }


def check_count(counts: dict[str, Any], expected: int | None, path: Path, *, accept: bool) -> None:
    """Compare a benchmark's scored questions (CircularEval groups) with ``expected``.

    A mismatch raises ValueError naming the file and both counts, unless ``accept`` (then it is
    logged); ``expected`` None checks nothing.
    """
    if expected is None or counts["base_questions"] == expected:
        return
    message = (
        f"{path}: {counts['base_questions']} questions (CircularEval groups; {counts['questions']} rows "
        f"kept of {counts['rows']}), expected {expected}"
    )
    if not accept:
        raise ValueError(f"{message}; set accept_count_mismatch: true to accept")
    log.warning("%s (accepted: accept_count_mismatch)", message)
