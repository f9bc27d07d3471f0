"""VLMEvalKit TSV reader: MMBench, MMMU and MMStar layouts, their quirks, and malformed rows."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fgvlm.data.synthetic_vqa import write_vqa_tsv
from fgvlm.data.vlmeval import check_count, scan_vlmeval_tsv

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
        "rows": 4, "questions": 4, "base_questions": 3, "skipped_split": 0, "open": 0, "skipped": 0,
        "image_references": 2, "multi_image": 0, "circular": 1, "skipped_rows": [],
    }  # fmt: skip


def mmmu_rows() -> list[dict]:
    """MMMU_DEV_VAL's layout: split column, A-I, open questions, multi-image cells with their
    ``image_path`` names."""
    empty = {letter: NAN for letter in "ABCDEFGHI"}
    return [
        {"index": 0, "question": "<image 1> Which style?", **empty, "A": "baroque",
         "B": "gothic", "answer": "A", "category": "Art", "image": RED, "image_path": "0.jpg",
         "id": "dev_Art_1", "split": "dev", "question_type": "multiple-choice"},
        {"index": 1, "question": "<image 1> <image 2> Which is larger?", **empty, "A": "left",
         "B": "right", "C": "same", "D": "unclear", "E": "neither", "answer": "E",
         "category": "Math", "image": json.dumps([GREEN, BLUE]),
         "image_path": json.dumps(["1--1.jpg", "1--2.jpg"]), "id": "validation_Math_1",
         "split": "validation", "question_type": "multiple-choice"},
        {"index": 2, "question": "<image 1> What is x?", **empty, "answer": "42",
         "category": "Math", "image": BLUE, "image_path": "2.jpg", "id": "validation_Math_2",
         "split": "validation", "question_type": "open"},
        # pandas writes a Python list with single quotes
        {"index": 3, "question": "<image 1> Which design?", **empty, "A": "a", "B": "b",
         "C": "c", "answer": "C", "category": "Design", "image": str([BLUE, RED, GREEN]),
         "image_path": str(["3--1.jpg", "3--2.jpg", "3--3.jpg"]), "id": "validation_Design_1",
         "split": "validation", "question_type": "multiple-choice"},
        {"index": 4, "question": "<image 1> Which map?", **empty, "A": "one", "B": "two",
         "answer": "B", "category": "Geography", "image": GREEN, "image_path": "4.jpg",
         "id": "validation_Geo_1", "split": "validation", "question_type": "multiple-choice"},
        # an open question whose gold answer is itself a letter (VLMEvalKit keeps the letter)
        {"index": 5, "question": "<image 1> Which panel?", **empty, "answer": "B",
         "category": "Art", "image": RED, "image_path": "5.jpg", "id": "validation_Art_2",
         "split": "validation", "question_type": "open"},
    ]  # fmt: skip


def test_mmmu_split_open_questions_and_multi_image(tmp_path):
    path = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", mmmu_rows())
    records, counts = scan_vlmeval_tsv(path, split="validation")
    assert [r["qid"] for r in records] == ["1", "2", "3", "4", "5"]
    assert counts["skipped_split"] == 1 and counts["open"] == 2 and counts["skipped"] == 0
    assert counts["multi_image"] == 2 and counts["questions"] == counts["base_questions"] == 5
    assert counts["rows"] == 6
    two, open_text, three, plain, open_letter = records
    # every image of a multi-image question, in order; ``image`` is the first
    assert two["images"] == [base64.b64decode(GREEN), base64.b64decode(BLUE)]
    assert two["n_images"] == 2 and two["image"] == base64.b64decode(GREEN)
    assert two["image_paths"] == ["1--1.jpg", "1--2.jpg"]
    assert three["images"] == [base64.b64decode(c) for c in (BLUE, RED, GREEN)]
    assert three["image_paths"] == ["3--1.jpg", "3--2.jpg", "3--3.jpg"]
    assert plain["n_images"] == 1 and plain["images"] == [plain["image"]]
    assert two["options"] == ["left", "right", "same", "unclear", "neither"]
    assert two["answer"] == "E" and two["hint"] is None and not two["open"]
    # VLMEvalKit's MMMU_preproc: A = gold text, B = "Other Answers"; gold letter "A" unless the
    # gold answer is a letter itself
    assert open_text["open"] and open_text["options"] == ["42", "Other Answers"]
    assert open_text["answer"] == "A"
    assert open_letter["options"] == ["B", "Other Answers"] and open_letter["answer"] == "B"
    assert [r["category"] for r in records] == ["Math", "Math", "Design", "Geography", "Art"]
    # no split: dev and validation
    assert [r["qid"] for r in scan_vlmeval_tsv(path)[0]] == ["0", "1", "2", "3", "4", "5"]
    assert scan_vlmeval_tsv(path, split="test")[0] == []


def test_multi_image_names_must_match_the_images(tmp_path):
    rows = malformed(mmmu_rows(), 1, image_path=json.dumps(["only-one.jpg", "a", "b"]))
    path = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", rows)
    with pytest.raises(ValueError, match=r"row index 1: 2 images but 3 image_path names"):
        scan_vlmeval_tsv(path)[0]


def test_row_without_options_is_skipped_counted_and_logged(tmp_path, caplog):
    rows = malformed(mmbench_rows(), 2, A=NAN, B=NAN)
    path = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)
    with caplog.at_level("WARNING", logger="fgvlm.data.vlmeval"):
        records, counts = scan_vlmeval_tsv(path)
    assert [r["qid"] for r in records] == ["0", "1", "1000000"]
    assert counts["skipped"] == 1 and counts["open"] == 0
    assert counts["skipped_rows"] == [{"index": "2", "reason": "no options"}]
    assert "row index 2: skipped, no options" in caplog.text
    json.dumps(counts)  # goes into the metrics file as it is


def test_non_utf8_bytes_name_file_line_and_row(tmp_path):
    path = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", mmbench_rows())
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"Which shape?", b"Which sh\xe9pe?")  # Latin-1, not UTF-8
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(
        ValueError, match=r"MMBench_DEV_EN.tsv: line 4 \(row index 2\) is not UTF-8"
    ):
        scan_vlmeval_tsv(path)[0]


def test_count_check_names_file_and_both_counts(tmp_path, caplog):
    path = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", mmbench_rows())
    _, counts = scan_vlmeval_tsv(path)
    check_count(counts, 3, path, accept=False)  # 3 base questions (4 rows)
    check_count(counts, None, path, accept=False)
    with pytest.raises(ValueError, match=r"MMBench_DEV_EN.tsv: 3 questions .* expected 2948"):
        check_count(counts, 2948, path, accept=False)
    with caplog.at_level("WARNING", logger="fgvlm.data.vlmeval"):
        check_count(counts, 2948, path, accept=True)
    assert "expected 2948 (accepted" in caplog.text


def test_mmstar_layout(tmp_path):
    rows = [
        {"index": i, "question": f"Question {i}?", "A": "w", "B": "x", "C": "y", "D": "z",
         "answer": "ABCD"[i % 4], "category": "coarse perception",
         "l2_category": "image scene and topic", "image": [RED, GREEN, BLUE][i % 3]}
        for i in range(6)
    ]  # fmt: skip
    records = scan_vlmeval_tsv(write_tsv(tmp_path / "MMStar.tsv", rows))[0]
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
        scan_vlmeval_tsv(path)[0]
    assert str(path) in str(err.value)


def test_truncated_image_is_undecodable(tmp_path):
    data = base64.b64decode(RED)
    truncated = base64.b64encode(data[: len(data) // 2]).decode()
    path = write_tsv(tmp_path / "cut.tsv", malformed(mmbench_rows(), 0, image=truncated))
    with pytest.raises(ValueError, match=r"cut.tsv: row index 0: image cannot be decoded"):
        scan_vlmeval_tsv(path)[0]


def test_file_level_errors(tmp_path):
    rows = mmbench_rows()
    with pytest.raises(ValueError, match=r"nocat.tsv: missing required column\(s\) category"):
        scan_vlmeval_tsv(write_tsv(tmp_path / "nocat.tsv", [
            {k: v for k, v in r.items() if k != "category"} for r in rows
        ]))  # fmt: skip
    twice = write_tsv(tmp_path / "twice.tsv", [*rows, rows[2]])
    with pytest.raises(ValueError, match=r"twice.tsv: row index 2 appears twice"):
        scan_vlmeval_tsv(twice)[0]
    mmstar = write_tsv(
        tmp_path / "MMStar.tsv", [{k: v for k, v in rows[0].items() if k != "split"}]
    )
    with pytest.raises(ValueError, match=r"MMStar.tsv: missing required column\(s\) split"):
        scan_vlmeval_tsv(mmstar, split="validation")[0]
    with pytest.raises(FileNotFoundError, match="absent.tsv"):
        scan_vlmeval_tsv(tmp_path / "absent.tsv")[0]


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
    gold = [r["options"][0] if r["open"] else r["answer"] for r in records]
    assert gold == [str(a) for a in expected["answer"]]  # open: A = the gold text
    for record in records:
        assert record["answer"] in "ABCDE"[: len(record["options"])]
        assert record["image"] == record["images"][0]
        assert all(Image.open(io.BytesIO(b)).size == (16, 16) for b in record["images"])
    if style == "mmbench":
        assert counts["image_references"] > 0 and counts["circular"] > 0
        for record in records:  # a CircularEval copy shows its base question's image
            base = next(r for r in records if r["qid"] == record["group"])
            assert record["image"] == base["image"]
    if style == "mmmu":
        assert counts["skipped_split"] == 40 - len(records) > 0
        assert all(r["question"].startswith("<image 1> ") for r in records)
        assert counts["open"] > 0 and counts["multi_image"] > 0 and counts["skipped"] == 0


def test_models_shown_every_image_get_them_decoded_in_order(tmp_path):
    """What evaluation reads (``question_source`` + ``QuestionItems``, as ``evaluate_vlm``
    calls them): with ``all_images`` an MMMU item carries its further images in order; without,
    the first only; the scanned records are never changed."""
    from fgvlm.evaluate.run import QuestionItems
    from fgvlm.evaluate.runners import question_source

    path = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", mmmu_rows())
    spec = {"format": "vlmeval_tsv", "split": "validation", "expected_count": 5}
    spec["accept_count_mismatch"] = False
    colours = {}
    for all_images in (False, True):
        raw, decode, _, _ = question_source(spec, path, all_images=all_images)
        items = list(QuestionItems(raw, decode, style="llava", option_prompt="cloze"))
        colours[all_images] = {
            item.qid: ["rgb"[int(np.argmax(image.getpixel((8, 6))))] for image in item.images]
            for item in items
        }
        assert all("extra_images" not in record for record in raw())
    assert colours[True]["1"] == ["g", "b"] and colours[True]["3"] == ["b", "r", "g"]
    assert colours[False]["1"] == ["g"] and colours[False]["3"] == ["b"]
    assert colours[True]["4"] == colours[False]["4"] and len(colours[True]["4"]) == 1


def test_question_source_checks_the_count_and_reports_skipped_rows(tmp_path):
    from fgvlm.evaluate.runners import question_source

    rows = malformed(mmbench_rows(), 2, A=NAN, B=NAN)
    path = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)
    spec = {"format": "vlmeval_tsv", "split": None, "expected_count": 1164}
    with pytest.raises(ValueError, match=r"MMBench_DEV_EN.tsv: 2 questions .*expected 1164"):
        question_source({**spec, "accept_count_mismatch": False}, path)
    raw, decode, answers, counts = question_source({**spec, "accept_count_mismatch": True}, path)
    assert answers == {"0": "A", "1": "B", "1000000": "D"}
    assert counts["base_questions"] == 2 and counts["expected_count"] == 1164
    assert counts["skipped_rows"] == [{"index": "2", "reason": "no options"}]
    assert [decode(sample)[0]["qid"] for sample in raw()] == ["0", "1", "1000000"]
    exact = {**spec, "expected_count": 2, "accept_count_mismatch": False}
    assert question_source(exact, path)[3]["base_questions"] == 2
