"""VLMEvalKit TSV reader: MMBench, MMMU and MMStar layouts, their quirks, and malformed rows."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from fgvlm.data.synthetic_vqa import write_vqa_tsv
from fgvlm.data.vlmeval import read_vlmeval_tsv, scan_vlmeval_tsv, summarize_tsv

NAN = math.nan


def b64_image(colour: tuple[int, int, int], fmt: str = "JPEG") -> str:
    """A small image in base64, as VLMEvalKit TSVs store them (long enough not to be a reference)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


RED, GREEN, BLUE = b64_image((200, 0, 0)), b64_image((0, 200, 0), "PNG"), b64_image((0, 0, 200))


def write_tsv(path: Path, rows: list[dict]) -> Path:
    """Write rows the way VLMEvalKit does (pandas, tab-separated, NaN as an empty cell)."""
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def mmbench_rows() -> list[dict]:
    """MMBench_DEV_EN's layout and quirks: hints, A-D with missing options, image references."""
    base = {"source": "x", "l2-category": "perception", "split": "dev"}
    return [
        {"index": 0, "question": "What colour is it?", "hint": "Look at the whole image.",
         "A": "red", "B": "green", "C": "blue", "D": "black", "answer": "A",
         "category": "attribute", "image": RED, **base},
        # a follow-up question on row 0's image; no hint; only A-C
        {"index": 1, "question": "Is it bright?", "hint": NAN, "A": "yes", "B": "no",
         "C": "unsure", "D": NAN, "answer": "B", "category": "attribute", "image": "0", **base},
        {"index": 2, "question": "Which shape?", "hint": NAN, "A": "square", "B": "circle",
         "C": NAN, "D": NAN, "answer": "B", "category": "shape", "image": GREEN, **base},
        # CircularEval copy of row 0: options rotated, image by reference
        {"index": 1_000_000, "question": "What colour is it?", "hint": "Look at the whole image.",
         "A": "green", "B": "blue", "C": "black", "D": "red", "answer": "D",
         "category": "attribute", "image": "0", **base},
    ]  # fmt: skip


def test_mmbench_quirks(tmp_path):
    path = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", mmbench_rows())
    records, counts = scan_vlmeval_tsv(path)
    assert [r["qid"] for r in records] == ["0", "1", "2", "1000000"]
    first, follow_up, shape, circular = records
    # index-referenced images resolve to the referenced row's bytes
    assert follow_up["image"] == first["image"] == circular["image"] == base64.b64decode(RED)
    assert shape["image"] == base64.b64decode(GREEN)
    assert Image.open(io.BytesIO(shape["image"])).format == "PNG"
    assert first["hint"] == "Look at the whole image." and follow_up["hint"] is None
    assert [len(r["options"]) for r in records] == [4, 3, 2, 4]
    assert follow_up["options"] == ["yes", "no", "unsure"] and follow_up["answer"] == "B"
    assert circular["group"] == "0" and first["group"] == "0" and shape["group"] == "2"
    assert all(r["n_images"] == 1 for r in records)
    assert counts == {
        "rows": 4, "questions": 4, "skipped_split": 0, "skipped_open": 0,
        "image_references": 2, "multi_image": 0, "circular": 1,
    }  # fmt: skip
    summary = summarize_tsv(records)
    assert summary == {
        "questions": 4,
        "categories": {"attribute": 3, "shape": 1},
        "options": {"2": 1, "3": 1, "4": 2},
        "with_hint": 2,
        "multi_image": 0,
        "circular": 1,
        "groups": 3,
    }
    json.dumps(summary)  # JSON-ready
    assert read_vlmeval_tsv(path) == records


def mmmu_rows() -> list[dict]:
    """MMMU_DEV_VAL's layout: split column, A-I, open questions, multi-image cells."""
    empty = {letter: NAN for letter in "ABCDEFGHI"}
    return [
        {"index": 0, "question": "<image 1> Which style?", **empty, "A": "baroque",
         "B": "gothic", "answer": "A", "category": "Art", "image": RED, "id": "dev_Art_1",
         "split": "dev", "question_type": "multiple-choice"},
        {"index": 1, "question": "<image 1> <image 2> Which is larger?", **empty, "A": "left",
         "B": "right", "C": "same", "D": "unclear", "E": "neither", "answer": "E",
         "category": "Math", "image": json.dumps([GREEN, BLUE]), "id": "validation_Math_1",
         "split": "validation", "question_type": "multiple-choice"},
        {"index": 2, "question": "<image 1> What is x?", **empty, "answer": "42",
         "category": "Math", "image": BLUE, "id": "validation_Math_2", "split": "validation",
         "question_type": "open"},
        # pandas writes a Python list with single quotes
        {"index": 3, "question": "<image 1> Which design?", **empty, "A": "a", "B": "b",
         "C": "c", "answer": "C", "category": "Design", "image": str([BLUE, RED, GREEN]),
         "id": "validation_Design_1", "split": "validation", "question_type": "multiple-choice"},
        {"index": 4, "question": "<image 1> Which map?", **empty, "A": "one", "B": "two",
         "answer": "B", "category": "Geography", "image": GREEN, "id": "validation_Geo_1",
         "split": "validation", "question_type": "multiple-choice"},
    ]  # fmt: skip


def test_mmmu_split_open_questions_and_multi_image(tmp_path):
    path = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", mmmu_rows())
    records, counts = scan_vlmeval_tsv(path, split="validation")
    assert [r["qid"] for r in records] == ["1", "3", "4"]
    assert counts["skipped_split"] == 1 and counts["skipped_open"] == 1
    assert counts["multi_image"] == 2 and counts["questions"] == 3 and counts["rows"] == 5
    two, three, plain = records
    assert two["n_images"] == 2 and two["image"] == base64.b64decode(GREEN)  # the first image
    assert three["n_images"] == 3 and three["image"] == base64.b64decode(BLUE)
    assert plain["n_images"] == 1
    assert two["options"] == ["left", "right", "same", "unclear", "neither"]
    assert two["answer"] == "E" and two["hint"] is None
    assert [r["category"] for r in records] == ["Math", "Design", "Geography"]
    # no split: dev and validation, still without the open question
    assert [r["qid"] for r in read_vlmeval_tsv(path)] == ["0", "1", "3", "4"]
    assert read_vlmeval_tsv(path, split="test") == []


def test_mmstar_layout(tmp_path):
    rows = [
        {"index": i, "question": f"Question {i}?", "A": "w", "B": "x", "C": "y", "D": "z",
         "answer": "ABCD"[i % 4], "category": "coarse perception",
         "l2_category": "image scene and topic", "image": [RED, GREEN, BLUE][i % 3]}
        for i in range(6)
    ]  # fmt: skip
    records = read_vlmeval_tsv(write_tsv(tmp_path / "MMStar.tsv", rows))
    assert [r["answer"] for r in records] == ["A", "B", "C", "D", "A", "B"]
    assert all(r["hint"] is None and len(r["options"]) == 4 for r in records)
    assert records[3]["image"] == base64.b64decode(RED)


def malformed(rows: list[dict], index: int, **changes) -> list[dict]:
    """``rows`` with the row of ``index`` changed."""
    return [{**r, **changes} if r["index"] == index else r for r in rows]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"answer": "D"}, r"row index 2: answer 'D' is not one of the option letters AB"),
        ({"answer": NAN}, r"row index 2: answer None"),
        ({"image": base64.b64encode(b"not an image at all, just some bytes " * 4).decode()},
         r"row index 2: image cannot be decoded"),
        ({"image": "%%% not base64 %%%" * 8}, r"row index 2: image cannot be decoded"),
        ({"image": "77"}, r"row index 2: image refers to row index '77', which is not in the file"),
        ({"image": "1"}, r"row index 2: image refers to row index '1', which holds no image"),
        ({"A": NAN}, r"row index 2: option A is empty but a later option is set"),
        ({"question": NAN}, r"row index 2: empty question"),
        ({"image": NAN}, r"row index 2: empty image cell"),
    ],
)  # fmt: skip
def test_malformed_row_names_file_and_row(tmp_path, changes, message):
    path = write_tsv(tmp_path / "bad.tsv", malformed(mmbench_rows(), 2, **changes))
    with pytest.raises(ValueError, match=message) as err:
        read_vlmeval_tsv(path)
    assert str(path) in str(err.value)


def test_truncated_image_is_undecodable(tmp_path):
    data = base64.b64decode(RED)
    truncated = base64.b64encode(data[: len(data) // 2]).decode()
    path = write_tsv(tmp_path / "cut.tsv", malformed(mmbench_rows(), 0, image=truncated))
    with pytest.raises(ValueError, match=r"cut.tsv: row index 0: image cannot be decoded"):
        read_vlmeval_tsv(path)


def test_file_level_errors(tmp_path):
    rows = mmbench_rows()
    with pytest.raises(ValueError, match=r"nocat.tsv: missing required column\(s\) category"):
        read_vlmeval_tsv(write_tsv(tmp_path / "nocat.tsv", [
            {k: v for k, v in r.items() if k != "category"} for r in rows
        ]))  # fmt: skip
    twice = write_tsv(tmp_path / "twice.tsv", [*rows, rows[2]])
    with pytest.raises(ValueError, match=r"twice.tsv: row index 2 appears twice"):
        read_vlmeval_tsv(twice)
    mmstar = write_tsv(
        tmp_path / "MMStar.tsv", [{k: v for k, v in rows[0].items() if k != "split"}]
    )
    with pytest.raises(ValueError, match=r"MMStar.tsv: missing required column\(s\) split"):
        read_vlmeval_tsv(mmstar, split="validation")
    with pytest.raises(FileNotFoundError, match="absent.tsv"):
        read_vlmeval_tsv(tmp_path / "absent.tsv")


@pytest.mark.parametrize("style", ["mmbench", "mmmu", "mmstar"])
def test_reads_every_synthetic_style(tmp_path, style):
    path = tmp_path / f"{style}.tsv"
    write_vqa_tsv(path, seed=3, n_questions=40, image_size=16, style=style)
    split = "validation" if style == "mmmu" else None
    records, counts = scan_vlmeval_tsv(path, split=split)
    frame = pd.read_csv(path, sep="\t")
    assert counts["rows"] == len(frame) == 40
    expected = frame if split is None else frame[frame["split"] == split]
    assert [r["qid"] for r in records] == [str(i) for i in expected["index"]]
    assert [r["answer"] for r in records] == list(expected["answer"])
    for record in records:
        assert record["answer"] in "ABCDE"[: len(record["options"])]
        assert Image.open(io.BytesIO(record["image"])).size == (16, 16)
    if style == "mmbench":
        assert counts["image_references"] > 0 and counts["circular"] > 0
        for record in records:  # a CircularEval copy shows its base question's image
            base = next(r for r in records if r["qid"] == record["group"])
            assert record["image"] == base["image"]
    if style == "mmmu":
        assert counts["skipped_split"] == 40 - len(records) > 0
        assert all(r["question"].startswith("<image 1> ") for r in records)
