"""WebDataset question shards: determinism, index, rank/worker splitting, round trip, atomicity;
the training split at the paper's scale (counts only)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from fgvlm.data.shards import (
    _n_batches,
    _resume_plan,
    check_coverage,
    epoch_coverage,
    iter_question_samples,
    read_index,
    shard_urls,
    stream_ranges,
    write_question_shards,
)

N_IMAGES = 10
SUFFIXES = (".png", ".jpg", ".bmp")  # raw PNG, raw JPEG, re-encoded to PNG


def _images(root: Path) -> pl.DataFrame:
    """A manifest of small random images in three file formats."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        path = root / "images" / f"img{i}{SUFFIXES[i % 3]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
        rows.append({"key": f"img{i}", "path": str(path), "label": i % 4, "classname": f"c{i % 4}"})
    return pl.DataFrame(rows).with_columns(split=pl.lit("test"))


def _questions(n: int = N_IMAGES) -> pl.DataFrame:
    """Questions in the project's contract layout, one per image."""
    return pl.DataFrame(
        {
            "qid": [f"bench-{i:06d}" for i in range(n)],
            "image": [f"img{i}" for i in range(n)],
            "question": ["What type of object is in this photo?"] * n,
            "options": [[f"c{(i + k) % 5}" for k in range(5)] for i in range(n)],
            "option_labels": [[(i + k) % 5 for k in range(5)] for i in range(n)],
            "answer": ["A"] * n,
            "label": list(range(n)),
            "classname": [f"c{i % 5}" for i in range(n)],
        },
        schema_overrides={"option_labels": pl.List(pl.Int64), "label": pl.Int64},
    )


@pytest.fixture()
def manifest(tmp_path: Path) -> pl.DataFrame:
    return _images(tmp_path)


def test_index_counts_and_byte_identical_rewrite(tmp_path: Path, manifest: pl.DataFrame) -> None:
    index = write_question_shards(_questions(), manifest, tmp_path / "a", samples_per_shard=4)
    assert index == {
        "shards": [
            {"name": "shard-000000.tar", "count": 4},
            {"name": "shard-000001.tar", "count": 4},
            {"name": "shard-000002.tar", "count": 2},
        ],
        "total": N_IMAGES,
    }
    assert read_index(tmp_path / "a") == index
    # same questions in another row order: identical bytes (sorted samples, mtime 0)
    shuffled = _questions().sample(fraction=1.0, shuffle=True, seed=3)
    write_question_shards(shuffled, manifest, tmp_path / "b", samples_per_shard=4)
    for entry in index["shards"]:
        a = (tmp_path / "a" / entry["name"]).read_bytes()
        assert a == (tmp_path / "b" / entry["name"]).read_bytes()
    assert [Path(u).name for u in shard_urls(tmp_path / "a")] == [
        s["name"] for s in index["shards"]
    ]


def test_round_trip_records_and_image_bytes(tmp_path: Path, manifest: pl.DataFrame) -> None:
    questions = _questions()
    out = tmp_path / "shards"
    write_question_shards(questions, manifest, out, samples_per_shard=3)
    expected = {r["qid"]: r for r in questions.to_dicts()}
    paths = dict(zip(manifest["key"], manifest["path"], strict=True))
    seen = {}
    for record, image in iter_question_samples(out):
        assert record == expected[record["qid"]]  # every column, lists as lists
        assert image.mode == "RGB"
        source = Image.open(paths[record["image"]]).convert("RGB")
        if not paths[record["image"]].endswith(".jpg"):  # lossless formats: same pixels
            assert np.array_equal(np.asarray(image), np.asarray(source))
        seen[record["qid"]] = record
    assert seen.keys() == expected.keys()
    members = {}
    for url in shard_urls(out):
        with tarfile.open(url) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})
            assert {m.mtime for m in tar} == {0}
    assert members["bench-000000.png"] == Path(paths["img0"]).read_bytes()  # raw PNG bytes
    assert members["bench-000001.jpg"] == Path(paths["img1"]).read_bytes()  # raw JPEG bytes
    bmp = Image.open(io.BytesIO(members["bench-000002.png"]))  # BMP re-encoded as PNG
    assert bmp.format == "PNG"


def test_missing_image_key_names_qid_and_key(tmp_path: Path, manifest: pl.DataFrame) -> None:
    questions = _questions().with_columns(
        image=pl.when(pl.col("qid") == "bench-000004")
        .then(pl.lit("nope"))
        .otherwise(pl.col("image"))
    )
    with pytest.raises(ValueError, match=r"bench-000004.*'nope'"):
        write_question_shards(questions, manifest, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_failure_mid_write_leaves_no_output(tmp_path: Path, manifest: pl.DataFrame) -> None:
    Path(manifest.filter(pl.col("key") == "img7")["path"][0]).unlink()  # fails in the 2nd shard
    out = tmp_path / "shards"
    with pytest.raises(FileNotFoundError, match="img7.*bench-000007"):
        write_question_shards(_questions(), manifest, out, samples_per_shard=4)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shards")]  # temp removed


def test_ranks_see_every_question_once(tmp_path: Path, manifest: pl.DataFrame) -> None:
    out = tmp_path / "shards"
    write_question_shards(_questions(), manifest, out, samples_per_shard=2)  # 5 shards
    seen = [
        r["qid"]
        for rank in range(2)
        for r, image in iter_question_samples(out, rank=rank, world_size=2)
        if isinstance(image, Image.Image) and image.mode == "RGB"
    ]
    assert sorted(seen) == [f"bench-{i:06d}" for i in range(N_IMAGES)]


def test_read_index_errors_name_the_file(tmp_path: Path, manifest: pl.DataFrame) -> None:
    with pytest.raises(FileNotFoundError, match="index.json"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text('{"shards": [{"name": "x.tar", "count": 2}], "total": 3}')
    with pytest.raises(ValueError, match=r"index\.json.*total"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text('{"shards": [{"name": "x.tar", "count": 2}], "total": 2}')
    with pytest.raises(FileNotFoundError, match="x.tar"):
        shard_urls(tmp_path)


# LCS-558K (LLaVA-Pretrain) and llava_v1_5_mix665k: 16 ranks (4 nodes x 4 GPUs) x 8 workers,
# per-device batches of the paper's global batches (256 -> 16, 128 -> 8), one accumulation step
PAPER_SCALE = [(558_128, 16), (665_298, 8)]


@pytest.mark.parametrize(("total", "batch"), PAPER_SCALE)
def test_paper_scale_every_sample_once_per_epoch(total: int, batch: int) -> None:
    ranks, workers = 16, 8
    micro, seen = epoch_coverage(total, world_size=ranks, num_workers=workers, batch_size=batch)
    owner = np.zeros(total, dtype=np.int8)  # how often each sample is read in one epoch
    stepped = np.zeros(total, dtype=np.int8)  # ... within the micro-batches every rank steps
    for rank in range(ranks):
        ranges = stream_ranges(
            total, rank=rank, world_size=ranks, num_workers=workers, batch_size=batch
        )
        sizes = [end - start for start, end in ranges]
        consumed, _ = _resume_plan([_n_batches(n, batch, False) for n in sizes], micro)
        rank_samples = sum(sizes)
        rank_seen = 0
        for (start, end), used in zip(ranges, consumed, strict=True):
            owner[start:end] += 1
            stop = min(end, start + used * batch)
            stepped[start:stop] += 1
            rank_seen += stop - start
        assert rank_samples - rank_seen <= 0.01 * rank_samples  # no rank drops over 1%
    assert (owner == 1).all()  # the ranges partition the epoch
    assert stepped.max() == 1 and int(stepped.sum()) == seen
    assert total - seen <= 0.01 * total


def test_coverage_check_names_the_numbers() -> None:
    assert check_coverage(558_128, world_size=16, num_workers=8, batch_size=16)[1] > 558_000
    with pytest.raises(ValueError, match=r"1000 samples over 16 ranks x 8 loader workers.*% > 1%"):
        check_coverage(1000, world_size=16, num_workers=8, batch_size=16, grad_accum=3)
    with pytest.raises(ValueError, match="not one optimizer step"):
        check_coverage(100, world_size=16, num_workers=8, batch_size=16, grad_accum=2)
