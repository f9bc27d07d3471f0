"""The synthetic demo world: determinism, layout, captions/instructions, VLMEvalKit TSV quirks."""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import json
import re
from pathlib import Path

import pandas as pd
import polars as pl
import pytest
from PIL import Image

from fgvlm.data.synthetic import FAMILIES, class_folder, generate_world
from fgvlm.data.synthetic_vqa import write_vqa_tsv

SMALL = {"train_per_class": 3, "test_per_class": 1}


def _tree_hash(root: Path) -> str:
    """Hash of every file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, family: str) -> None:
    generate_world(tmp_path / "a", family=family, seed=1, **SMALL)
    generate_world(tmp_path / "b", family=family, seed=1, **SMALL)
    generate_world(tmp_path / "c", family=family, seed=2, **SMALL)
    assert _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "b")
    assert _tree_hash(tmp_path / "a") != _tree_hash(tmp_path / "c")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layout_classes_and_attributes(tmp_path: Path, family: str) -> None:
    out = tmp_path / family
    summary = generate_world(out, family=family, seed=0, image_size=32, **SMALL)
    classes = json.loads((out / "classes.json").read_text())
    assert 16 <= len(classes) <= 24 and len(set(classes)) == len(classes)
    assert summary["classes"] == classes and summary["num_classes"] == len(classes)
    assert all(len(name.split()) >= 3 for name in classes)  # readable multi-word names
    folders = sorted(p.name for p in (out / "train").iterdir())
    assert [class_folder(c) for c in classes] == folders  # label order = sorted folders
    assert sorted(p.name for p in (out / "test").iterdir()) == folders
    for folder in folders:
        assert sorted(p.name for p in (out / "train" / folder).iterdir()) == [
            "0000.png",
            "0001.png",
            "0002.png",
        ]
        assert [p.name for p in (out / "test" / folder).iterdir()] == ["0000.png"]
    image = Image.open(out / "train" / folders[0] / "0000.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    assert summary["counts"] == {"train": 3 * len(classes), "test": len(classes)}
    attributes = json.loads((out / "attributes.json").read_text())
    assert list(attributes) == classes
    spec = FAMILIES[family]
    for name, values in attributes.items():
        assert spec.class_name(values) == name  # the name states every attribute value
    assert len({tuple(v.values()) for v in attributes.values()}) == len(classes)


def test_images_vary_within_a_class(tmp_path: Path) -> None:
    generate_world(tmp_path / "w", family="shapes", seed=0, **SMALL)
    folder = tmp_path / "w" / "train" / "small_crimson_triangle"
    images = [(folder / f"{i:04d}.png").read_bytes() for i in range(3)]
    assert len(set(images)) == 3


def test_captions_and_instructions_reference_train_images(tmp_path: Path) -> None:
    out = tmp_path / "w"
    generate_world(out, family="creatures", seed=0, train_per_class=10, test_per_class=1)
    classes = json.loads((out / "classes.json").read_text())
    train_images = {str(p.relative_to(out)) for p in (out / "train").rglob("*.png")}
    captions = _jsonl(out / "captions.jsonl")
    assert {c["image"] for c in captions} == train_images
    missing_fine = 0
    for caption in captions:
        name = classes[[class_folder(c) for c in classes].index(caption["image"].split("/")[1])]
        assert name in caption["long"]  # the long caption states every attribute
        assert caption["short"]
        missing_fine += name not in caption["short"]
    assert 0 < missing_fine < len(captions)  # alt texts are often, not always, incomplete
    instructions = _jsonl(out / "instructions.jsonl")
    assert {r["image"] for r in instructions} == train_images
    assert len({r["id"] for r in instructions}) == len(instructions)
    multiple_choice = 0
    for record in instructions:
        turns = record["conversations"]
        assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        prompt = turns[0]["value"]
        if "Answer with the option's letter" not in prompt:
            continue
        multiple_choice += 1
        options = re.findall(r"^([A-E])\. (.+)$", prompt, flags=re.MULTILINE)
        assert [letter for letter, _ in options] == list("ABCDE")
        assert len({text for _, text in options}) == 5 and all(t in classes for _, t in options)
        truth = classes[[class_folder(c) for c in classes].index(record["image"].split("/")[1])]
        assert dict(options)[turns[1]["value"]] == truth  # answered with the correct letter
    assert multiple_choice >= 0.15 * len(instructions)


def test_unknown_family_names_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'birds'.*creatures.*patterns.*shapes"):
        generate_world(tmp_path / "x", family="birds", seed=0)
    assert not (tmp_path / "x").exists()


def test_default_world_counts(tmp_path: Path) -> None:
    summary = generate_world(tmp_path / "w", family="shapes", seed=0)
    assert summary["counts"] == {"train": 40 * 24, "test": 10 * 24}


def _decode(cell: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(cell)))
    image.load()
    return image


def _letters(row: pd.Series) -> list[str]:
    return [c for c in "ABCDEFGHI" if c in row and not pd.isna(row[c])]


@pytest.mark.parametrize("style", ["mmbench", "mmmu", "mmstar"])
def test_vqa_tsv_parses_and_is_deterministic(tmp_path: Path, style: str) -> None:
    path = tmp_path / f"{style}.tsv"
    write_vqa_tsv(path, seed=0, n_questions=60, style=style)
    again = tmp_path / "again.tsv"
    write_vqa_tsv(again, seed=0, n_questions=60, style=style)
    assert path.read_bytes() == again.read_bytes()
    write_vqa_tsv(again, seed=1, n_questions=60, style=style)
    assert path.read_bytes() != again.read_bytes()
    frame = pd.read_csv(path, sep="\t")  # how VLMEvalKit reads it
    assert len(frame) == 60 and frame["index"].is_unique
    assert len(pl.read_csv(path, separator="\t")) == 60
    expected = {
        "mmbench": ["index", "question", "hint", "A", "B", "C", "D", "answer", "category"],
        "mmmu": ["index", "question", *"ABCDEFGHI", "answer", "category", "image", "id", "split"],
        "mmstar": ["index", "question", "A", "B", "C", "D", "answer", "category", "l2_category"],
    }[style]
    assert set(expected) <= set(frame.columns)
    images = {str(i): str(cell) for i, cell in zip(frame["index"], frame["image"], strict=True)}
    for _, row in frame.iterrows():
        letters = _letters(row)
        if row.get("question_type") == "open":  # MMMU: no options, the answer is the text
            assert letters == [] and isinstance(row["answer"], str | int)
        else:
            assert 2 <= len(letters) <= 5 and letters == list("ABCDE"[: len(letters)])
            assert row["answer"] in letters
        cell = images[str(row["index"])]
        if len(cell) <= 64:  # VLMEvalKit: a short cell is the index of the row holding the image
            cell = images[cell]
        cells = ast.literal_eval(cell) if cell.startswith("[") else [cell]  # MMMU: several
        assert all(_decode(c).size == (32, 32) for c in cells)
    if style == "mmstar":
        assert all(len(_letters(row)) == 4 for _, row in frame.iterrows())


def test_vqa_tsv_style_quirks(tmp_path: Path) -> None:
    write_vqa_tsv(tmp_path / "mmbench.tsv", seed=0, n_questions=80, style="mmbench")
    bench = pd.read_csv(tmp_path / "mmbench.tsv", sep="\t")
    referenced = bench[bench["image"].astype(str).str.len() <= 64]
    assert len(referenced) > 0
    assert (bench["index"] >= 1_000_000).any()  # CircularEval copies
    assert bench["hint"].isna().sum() > len(bench) / 2  # hints mostly empty
    for _, row in bench[bench["index"] >= 1_000_000].iterrows():
        base = bench[bench["index"] == row["index"] % 1_000_000].iloc[0]
        assert row["question"] == base["question"]
        assert row[row["answer"]] == base[base["answer"]]  # same correct option, rotated letter
    write_vqa_tsv(tmp_path / "mmmu.tsv", seed=0, n_questions=70, style="mmmu")
    mmmu = pd.read_csv(tmp_path / "mmmu.tsv", sep="\t")
    assert set(mmmu["split"]) == {"dev", "validation"}
    assert mmmu["question"].str.startswith("<image 1>").all()
    open_rows = mmmu[mmmu["question_type"] == "open"]
    assert len(open_rows) > 0 and open_rows["A"].isna().all()
    pairs = mmmu[mmmu["image"].astype(str).str.startswith("[")]
    assert len(pairs) > 0 and pairs["question"].str.startswith("<image 1> <image 2> ").all()
    for _, row in pairs.iterrows():
        assert len(ast.literal_eval(row["image"])) == len(ast.literal_eval(row["image_path"])) == 2
    with pytest.raises(ValueError, match="'seed'.*mmbench, mmmu, mmstar"):
        write_vqa_tsv(tmp_path / "x.tsv", seed=0, style="seed")
