"""WebDataset shards of question sets: write deterministic tars, read them back split by rank.

A shard directory holds ``shard-000000.tar`` ... and ``index.json`` {"shards": [{"name", "count"}],
"total"}. Each sample has ``__key__`` = qid, the raw image bytes under "jpg" or "png", and the
question record (every question column) under "json".
"""

from __future__ import annotations

import functools
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from fgvlm.io import atomic_path, read_json, write_json

INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-{:06d}.tar"
IMAGE_EXTS = ("jpg", "png")
RAW_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


def _image_entry(path: Path, qid: str) -> tuple[str, bytes]:
    """(extension, bytes) of an image file: JPEG and PNG raw, anything else re-encoded as PNG."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file of question {qid!r} not found")
    ext = RAW_SUFFIXES.get(path.suffix.lower())
    if ext is not None:
        return ext, path.read_bytes()
    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").save(buffer, format="PNG")
    return "png", buffer.getvalue()


def _image_paths(questions: pl.DataFrame, manifest: pl.DataFrame) -> dict[str, str]:
    """Map each question's image key to its manifest path, naming the first unknown key."""
    for column, frame, name in (("image", questions, "questions"), ("key", manifest, "manifest")):
        if column not in frame.columns:
            raise ValueError(f"{name} frame has no column {column!r} (columns: {frame.columns})")
    if "path" not in manifest.columns:
        raise ValueError(f"manifest frame has no column 'path' (columns: {manifest.columns})")
    duplicated = manifest.filter(pl.col("key").is_duplicated())["key"]
    if len(duplicated):
        raise ValueError(f"manifest key {duplicated[0]!r} is not unique")
    paths = dict(zip(manifest["key"].to_list(), manifest["path"].to_list(), strict=True))
    missing = questions.filter(~pl.col("image").is_in(list(paths)))
    if len(missing):
        qid, key = missing["qid"][0], missing["image"][0]
        raise ValueError(f"question {qid!r}: image key {key!r} is not in the manifest")
    return paths


def _check_qids(questions: pl.DataFrame) -> None:
    """qids must be unique tar keys: no '.', no '/' (webdataset splits keys at the first dot)."""
    if "qid" not in questions.columns:
        raise ValueError(f"questions frame has no column 'qid' (columns: {questions.columns})")
    duplicated = questions.filter(pl.col("qid").is_duplicated())["qid"]
    if len(duplicated):
        raise ValueError(f"question qid {duplicated[0]!r} is not unique")
    bad = questions.filter(pl.col("qid").str.contains(r"[./]"))["qid"]
    if len(bad):
        raise ValueError(f"question qid {bad[0]!r} contains '.' or '/', unusable as a shard key")


def write_question_shards(
    questions: pl.DataFrame,
    manifest: pl.DataFrame,
    out_dir: Path,
    *,
    samples_per_shard: int = 1000,
) -> dict[str, Any]:
    """Write questions with their images as WebDataset tars, atomically.

    ``questions`` has ``qid`` and ``image`` (a manifest key) plus any other columns; ``manifest``
    has ``key`` and ``path``. Samples are sorted by qid and every tar member has mtime 0, so the
    same input gives byte-identical shards. Returns the index written to ``out_dir/index.json``.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1 (got {samples_per_shard})")
    _check_qids(questions)
    if questions.height == 0:
        raise ValueError(f"no questions to shard into {out_dir}")
    paths = _image_paths(questions, manifest)
    records = questions.sort("qid").to_dicts()
    shards = []
    with atomic_path(out_dir, is_dir=True) as tmp:
        starts = range(0, len(records), samples_per_shard)
        for start in tqdm(starts, desc=f"shards {Path(out_dir).name}", unit="shard"):
            chunk = records[start : start + samples_per_shard]
            name = SHARD_PATTERN.format(len(shards))
            with open(tmp / name, "wb") as stream, wds.TarWriter(stream, mtime=0) as sink:
                for record in chunk:
                    ext, data = _image_entry(Path(paths[record["image"]]), record["qid"])
                    payload = json.dumps(record, sort_keys=True, ensure_ascii=False)
                    sink.write({"__key__": record["qid"], ext: data, "json": payload.encode()})
            shards.append({"name": name, "count": len(chunk)})
        index = {"shards": shards, "total": len(records)}
        write_json(index, tmp / INDEX_NAME)
    return index


def read_index(shard_dir: Path) -> dict[str, Any]:
    """Read and check ``shard_dir/index.json``; errors name the file."""
    path = Path(shard_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard index not found")
    index = read_json(path)
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("count"), int)
        for s in shards
    ):
        raise ValueError(f"{path}: expected {{'shards': [{{'name', 'count'}}], 'total'}}")
    if index.get("total") != sum(s["count"] for s in shards):
        raise ValueError(f"{path}: total {index.get('total')!r} is not the sum of shard counts")
    return index


def shard_urls(shard_dir: Path) -> list[str]:
    """Absolute paths of a directory's shards, in index order; a missing shard is an error."""
    root = Path(shard_dir).resolve()
    urls = [root / s["name"] for s in read_index(shard_dir)["shards"]]
    for url in urls:
        if not url.is_file():
            raise FileNotFoundError(f"{url}: shard listed in {root / INDEX_NAME} not found")
    return [str(url) for url in urls]


def decode_sample(sample: dict[str, Any]) -> tuple[dict[str, Any], Image.Image]:
    """(question record, RGB image) from a raw sample {"__key__", "json", "jpg"|"png"}."""
    key = sample["__key__"]
    record = json.loads(sample["json"])
    data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    if data is None:
        where = sample.get("__url__", "shard")
        raise ValueError(f"{where}: sample {key!r} has no image (expected one of {IMAGE_EXTS})")
    with Image.open(io.BytesIO(data)) as image:
        return record, image.convert("RGB")


def _tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar: consecutive members sharing a key up to the first dot."""
    sample: dict[str, Any] = {}
    with tarfile.open(url, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if sample and key != sample["__key__"]:
                yield sample
                sample = {}
            sample.setdefault("__key__", key)
            sample["__url__"] = url
            sample[ext] = tar.extractfile(member).read()
    if sample:
        yield sample


def _check_rank(rank: int, world_size: int) -> None:
    """Reject impossible rank / world size pairs."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size (got rank {rank}, world_size {world_size})")


def iter_question_samples(
    shard_dir: Path, *, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[dict[str, Any], Image.Image]]:
    """Yield (question record, RGB image) of the shards of ``rank``: shard i goes to rank i % size.

    Single-process and in shard order, for evaluation jobs that split a benchmark by shard; a rank
    with no shard yields nothing, so the ranks together still see every sample exactly once.
    """
    _check_rank(rank, world_size)
    for url in shard_urls(shard_dir)[rank::world_size]:
        for sample in _tar_samples(url):
            yield decode_sample(sample)


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit rank/world size, else torch.distributed's when initialised, else (0, 1)."""
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is not None and world_size is not None:
        _check_rank(rank, world_size)
        return rank, world_size
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _split_by_rank(
    src: Iterable[dict], *, rank: int, world_size: int, shard_dir: str
) -> Iterator[dict]:
    """webdataset node splitter: shard i -> rank i % world_size; an empty share is an error."""
    mine = list(src)[rank::world_size]
    if not mine:
        raise ValueError(f"{shard_dir}: rank {rank} of {world_size} gets no shard")
    yield from mine


def _split_by_worker(src: Iterable[dict], *, rank: int, shard_dir: str) -> Iterator[dict]:
    """webdataset worker splitter: a rank's shards round-robin over its DataLoader workers.

    Raises instead of webdataset's default of leaving a worker empty (or duplicating data).
    """
    info = torch.utils.data.get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    shards = list(src)
    mine = shards[worker::num_workers]
    if not mine:
        raise ValueError(
            f"{shard_dir}: DataLoader worker {worker} of {num_workers} on rank {rank} gets no "
            f"shard (the rank has {len(shards)}); use at most {len(shards)} workers per rank "
            f"or write smaller shards"
        )
    yield from mine


def question_dataset(
    shard_dir: Path, *, rank: int | None = None, world_size: int | None = None
) -> torch.utils.data.IterableDataset:
    """A webdataset pipeline of (question record, RGB image), split by rank and DataLoader worker.

    Shards go round-robin to ranks (explicit ``rank``/``world_size``, else torch.distributed when
    initialised), then round-robin to the rank's DataLoader workers. Every rank/worker must get at
    least one shard: #shards >= ranks x workers, else iteration raises ValueError. Samples hold PIL
    images: use ``batch_size=None`` or a collate function that accepts them.
    """
    urls = shard_urls(shard_dir)
    rank, world_size = _resolve_rank(rank, world_size)
    if len(urls) < world_size:
        raise ValueError(f"{shard_dir}: {len(urls)} shards cannot feed {world_size} ranks")
    dataset = wds.WebDataset(
        urls,
        shardshuffle=False,
        nodesplitter=functools.partial(
            _split_by_rank, rank=rank, world_size=world_size, shard_dir=str(shard_dir)
        ),
        workersplitter=functools.partial(_split_by_worker, rank=rank, shard_dir=str(shard_dir)),
        empty_check=False,
    )
    return dataset.map(decode_sample)
