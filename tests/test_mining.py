"""Hard-negative mining and seeded multiple-choice questions."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from fgvlm.io import write_parquet
from fgvlm.mcq import FINE_GRAINED_QUESTION
from fgvlm.mining import (
    QUESTION_SCHEMA,
    build_questions,
    hard_negatives,
    mine_questions,
)
from fgvlm.models.clip import (
    encode_class_prompts,
    encode_images,
    load_clip,
)
from fgvlm.models.tiny import materialize_random_clip

TINY_CFG = Path(str(resources.files("fgvlm") / "resources" / "clip_configs" / "tiny-vit.json"))


def test_hard_negatives_picks_most_similar_wrong_classes():
    similarity = np.array(
        [
            [0.9, 0.1, 0.8, 0.3, 0.7, 0.2],  # label 0 (most similar itself): 2, 4, 3, 5
            [0.5, 0.9, 0.5, 0.1, 0.5, 0.2],  # label 1; three-way tie 0.5 -> 0, 2, 4 then 5
            [0.4, 0.4, 0.4, 0.4, 0.4, 0.4],  # all tied, label 2 -> lowest other indices
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 5 is the top score
        ]
    )
    labels = np.array([0, 1, 2, 5])
    got = hard_negatives(similarity, labels, k=4)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [[2, 4, 3, 5], [0, 2, 4, 5], [0, 1, 3, 4], [4, 3, 2, 1]])
    np.testing.assert_array_equal(hard_negatives(similarity, labels, k=1), got[:, :1])


def test_hard_negatives_when_the_label_ranks_low():
    # the correct class is least similar: negatives are simply the top k
    similarity = np.array([[0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])
    np.testing.assert_array_equal(hard_negatives(similarity, np.array([5]), k=4), [[0, 1, 2, 3]])


@pytest.mark.parametrize(
    ("similarity", "labels", "k", "message"),
    [
        (np.zeros((2, 5)), np.array([0, 1]), 5, "k=5"),
        (np.zeros((2, 5)), np.array([0, 1]), 0, "k=0"),
        (np.zeros((2, 5)), np.array([0, 5]), 4, "label 5"),
        (np.zeros((2, 5)), np.array([0, -1]), 4, "label -1"),
        (np.zeros((2, 5)), np.array([0, 1, 2]), 4, "shape"),
        (np.zeros(5), np.array([0]), 4, "2-D"),
        (np.array([[0.1, np.nan, 0.2]]), np.array([0]), 1, "NaN"),
    ],
)
def test_hard_negatives_rejects_bad_input(similarity, labels, k, message):
    with pytest.raises(ValueError, match=message):
        hard_negatives(similarity, labels, k=k)


def _inputs(n: int = 60, classes: int = 9, seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = [f"img{i:03d}" for i in range(n)]
    labels = rng.integers(0, classes, n)
    names = [f"class {c}" for c in range(classes)]
    return keys, labels, names, rng.random((n, classes))


def test_build_questions_follows_the_contract():
    keys, labels, names, similarity = _inputs()
    frame = build_questions(keys, labels, names, similarity, benchmark="flowers", seed=7)
    assert frame.schema == pl.Schema(QUESTION_SCHEMA)
    assert frame["qid"].to_list() == [f"flowers-{i:06d}" for i in range(len(keys))]
    assert frame["image"].to_list() == keys
    assert set(frame["question"]) == {FINE_GRAINED_QUESTION}
    negatives = hard_negatives(similarity, labels)
    for i, row in enumerate(frame.iter_rows(named=True)):
        assert row["label"] == labels[i] and row["classname"] == names[labels[i]]
        assert row["option_labels"].count(row["label"]) == 1
        assert len(row["options"]) == 5 and row["answer"] in "ABCDE"
        assert row["options"] == [names[j] for j in row["option_labels"]]
        assert row["option_labels"]["ABCDE".index(row["answer"])] == row["label"]
        assert sorted(row["option_labels"]) == sorted([labels[i], *negatives[i]])
    # shuffled: the correct answer is not always in the same place
    assert frame["answer"].n_unique() == 5


def test_build_questions_same_seed_same_bytes_other_seed_other_order(tmp_path):
    keys, labels, names, similarity = _inputs()
    first = build_questions(keys, labels, names, similarity, benchmark="pets", seed=3)
    again = build_questions(keys, labels, names, similarity, benchmark="pets", seed=3)
    other = build_questions(keys, labels, names, similarity, benchmark="pets", seed=4)
    assert first.equals(again)
    meta = {"seed": "3", "miner": "tiny-vit"}
    write_parquet(first, tmp_path / "a.parquet", metadata=meta)
    write_parquet(again, tmp_path / "b.parquet", metadata=meta)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert pl.read_parquet_metadata(tmp_path / "a.parquet")["seed"] == "3"
    assert pl.read_parquet(tmp_path / "a.parquet").equals(first)
    assert first["option_labels"].to_list() != other["option_labels"].to_list()
    # the seed changes the order, never the set of options
    assert [sorted(o) for o in first["option_labels"]] == [
        sorted(o) for o in other["option_labels"]
    ]


def test_build_questions_rejects_inconsistent_input():
    keys, labels, names, similarity = _inputs(n=4, classes=6)
    with pytest.raises(ValueError, match="shape"):
        build_questions(keys, labels, names[:5], similarity, benchmark="b", seed=0)
    with pytest.raises(ValueError, match="unique"):
        build_questions(["a", "a", "b", "c"], labels, names, similarity, benchmark="b", seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "tiny"
    materialize_random_clip(TINY_CFG, out, seed=0)
    return load_clip(out)


def _manifest(tmp_path: Path, names: list[str], n: int = 12) -> pl.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        path = tmp_path / f"im{i}.{'png' if i % 2 else 'jpg'}"
        # palette images check the RGB conversion
        image = Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8))
        (image.convert("P") if i % 2 else image).save(path)
        label = i % len(names)
        rows.append(
            {
                "key": f"im{i}",
                "path": str(path),
                "label": label,
                "classname": names[label],
                "split": "test",
            }
        )
    return pl.DataFrame(rows, schema_overrides={"label": pl.Int64})


def test_mine_questions_uses_clip_similarity(tmp_path, tiny):
    names = ["cat", "dog", "cow", "horse", "sheep", "goat", "pig"]
    templates = ["a photo of a {c}."]
    manifest = _manifest(tmp_path, names)
    got = mine_questions(
        manifest, tiny, benchmark="toy", classnames=names, templates=templates, seed=0, batch_size=5
    )
    images = [Image.open(p).convert("RGB") for p in manifest["path"]]
    similarity = (
        encode_images(tiny, images, 12, "cpu")
        @ encode_class_prompts(tiny, names, templates, "cpu").T
    )
    expected = build_questions(
        manifest["key"].to_list(),
        manifest["label"].to_numpy(),
        names,
        similarity,
        benchmark="toy",
        seed=0,
    )
    assert got.equals(expected)


def test_mine_questions_checks_manifest(tmp_path, tiny):
    names = ["cat", "dog", "cow", "horse", "sheep", "goat"]
    manifest = _manifest(tmp_path, names, n=6)
    shifted = manifest.with_columns(pl.col("classname").shift(1, fill_value="goat"))
    kwargs = {"benchmark": "toy", "templates": ["{c}"], "seed": 0}
    with pytest.raises(ValueError, match="im0.*'goat'.*'cat'"):
        mine_questions(shifted, tiny, classnames=names, **kwargs)
    missing = manifest.with_columns(pl.lit(str(tmp_path / "gone.jpg")).alias("path"))
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        mine_questions(missing, tiny, classnames=names, **kwargs)
    with pytest.raises(ValueError, match="path"):
        mine_questions(manifest.drop("path"), tiny, classnames=names, **kwargs)


def test_allowed_restricts_negatives_to_annotated_mistakes():
    # Row 0 (label 0): CLIP likes 1, 2, 3, 4 most, but only 5, 6, 3, 7 were annotated mistakes.
    similarity = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.2, 0.0]])
    allowed = np.zeros((1, 8), dtype=bool)
    allowed[0, [5, 6, 3, 7, 0]] = True  # the correct label is never a negative, even if listed
    got = hard_negatives(similarity, np.array([0]), k=4, allowed=allowed)
    assert got.tolist() == [[3, 6, 5, 7]]  # ranked by CLIP similarity among the allowed


def test_allowed_with_too_few_candidates_names_the_row():
    allowed = np.zeros((2, 6), dtype=bool)
    allowed[:, 1:] = True
    allowed[1, 1:4] = False
    with pytest.raises(ValueError, match="row 1 has 2 allowed negatives, fewer than k=4"):
        hard_negatives(np.random.default_rng(0).random((2, 6)), np.array([0, 0]), 4, allowed)
