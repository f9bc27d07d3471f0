"""WebDataset shards of question sets and training conversations: deterministic tars, split reads.

A shard directory holds ``shard-000000.tar`` ... and ``index.json`` {"shards": [{"name", "count"}],
"total"}. A question sample has ``__key__`` = qid, the raw image bytes under "jpg" or "png", and
the question record (every question column) under "json". A conversation (training) sample has
``__key__`` = its sanitized id, the LLaVA conversation record under "json" and, unless it is
text-only, the image bytes under "jpg" or "png".
"""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
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
    shard_dir: Path, *, rank: int = 0, world_size: int = 1, decode: bool = True
) -> Iterator[Any]:
    """Yield (question record, RGB image) of the shards of ``rank``: shard i goes to rank i % size.

    Single-process and in shard order, for evaluation jobs that split a benchmark by shard; a rank
    with no shard yields nothing, so the ranks together still see every sample exactly once.
    ``decode=False`` yields the raw samples instead (``decode_sample`` decodes one), for
    decoding in loader workers.
    """
    _check_rank(rank, world_size)
    for url in shard_urls(shard_dir)[rank::world_size]:
        for sample in _tar_samples(url):
            yield decode_sample(sample) if decode else sample


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


# ---------------------------------------------------------------- conversation (training) shards
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")

ImageSource = Path | str | bytes | None


def conversation_key(sample_id: str) -> str:
    """A tar-safe shard key for a sample id: every character outside [A-Za-z0-9_-] becomes '_'."""
    key = _UNSAFE_KEY_CHARS.sub("_", str(sample_id))
    if not key:
        raise ValueError("a sample has an empty id: cannot make a shard key")
    return key


def _unique_key(sample_id: str, used: set[str]) -> str:
    """``conversation_key``, suffixed -1, -2, ... when taken (LLaVA files repeat ids)."""
    base = key = conversation_key(sample_id)
    n = 0
    while key in used:
        n += 1
        key = f"{base}-{n}"
    used.add(key)
    return key


def _conversation_image(source: ImageSource, sample_id: str) -> tuple[str, bytes] | None:
    """(extension, bytes) of a sample's image by content: JPEG and PNG raw, others re-encoded PNG.

    ``source``: a file path, the image bytes, or None (text-only sample -> None).
    """
    if source is None:
        return None
    if isinstance(source, (bytes, bytearray)):
        data, where = bytes(source), "image bytes"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image of sample {sample_id!r} not found")
        data, where = path.read_bytes(), str(path)
    # the content decides, not the suffix (OCR-VQA ships GIFs and PNGs named .jpg)
    if data.startswith(JPEG_MAGIC):
        return "jpg", data
    if data.startswith(PNG_MAGIC):
        return "png", data
    buffer = io.BytesIO()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB").save(buffer, format="PNG")
    except Exception as err:  # PIL raises many types on corrupt data
        raise ValueError(
            f"{where}: image of sample {sample_id!r} is not decodable ({err})"
        ) from err
    return "png", buffer.getvalue()


def _check_record(record: Any, source: ImageSource) -> str:
    """The record's id; a record must have "id" and "conversations", and "image" iff a source."""
    if not isinstance(record, dict) or record.get("id") in (None, ""):
        raise ValueError(f"conversation record without an 'id': {str(record)[:200]}")
    sample_id = str(record["id"])
    if not isinstance(record.get("conversations"), list):
        raise ValueError(f"sample {sample_id!r} has no 'conversations' list")
    if ("image" in record) != (source is not None):
        has = "has" if "image" in record else "has no"
        raise ValueError(
            f"sample {sample_id!r} {has} 'image' but its image source is {source!r}: "
            f"text-only samples have neither"
        )
    return sample_id


def write_conversation_shards(
    samples: Iterable[tuple[dict[str, Any], ImageSource]],
    out_dir: Path,
    *,
    samples_per_shard: int,
) -> dict[str, Any]:
    """Write (conversation record, image source) pairs as WebDataset tars, atomically.

    ``samples``: an iterable (streamed, never held in memory whole) of LLaVA records {"id",
    "image"?, "conversations"} with their image as a path, bytes, or None for text-only samples.
    Each sample becomes ``__key__`` = the id made tar-safe and unique (``conversation_key``, then
    -1, -2, ... on repeats), "json" = the record, and "jpg"/"png" = the image by content (other
    formats re-encoded as PNG; text-only samples have no image). Input order is kept and tar
    members have mtime 0, so the same input gives byte-identical shards. Returns the index
    written to ``out_dir/index.json`` (format of ``read_index``).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1 (got {samples_per_shard})")
    total = len(samples) if hasattr(samples, "__len__") else None
    stream = iter(tqdm(samples, total=total, desc=f"shards {Path(out_dir).name}", unit="sample"))
    used: set[str] = set()
    shards = []
    with atomic_path(out_dir, is_dir=True) as tmp:
        while chunk := list(itertools.islice(stream, samples_per_shard)):
            name = SHARD_PATTERN.format(len(shards))
            with open(tmp / name, "wb") as tar_stream, wds.TarWriter(tar_stream, mtime=0) as sink:
                for record, source in chunk:
                    sample_id = _check_record(record, source)
                    payload = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
                    sample = {"__key__": _unique_key(sample_id, used), "json": payload}
                    image = _conversation_image(source, sample_id)
                    if image is not None:
                        sample[image[0]] = image[1]
                    sink.write(sample)
            shards.append({"name": name, "count": len(chunk)})
        if not shards:
            raise ValueError(f"no samples to shard into {out_dir}")
        index = {"shards": shards, "total": sum(s["count"] for s in shards)}
        write_json(index, tmp / INDEX_NAME)
    return index


def count_samples(shard_dir: Path) -> int:
    """Number of samples in a shard directory, from its index (for steps per epoch)."""
    return read_index(shard_dir)["total"]


def decode_conversation(sample: dict[str, Any]) -> tuple[dict[str, Any], Image.Image | None]:
    """(conversation record, RGB image or None for a text-only sample) from a raw tar sample."""
    record = json.loads(sample["json"])
    data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    if data is None:
        if "image" in record:
            where = sample.get("__url__", "shard")
            raise ValueError(f"{where}: sample {sample['__key__']!r} names an image but has none")
        return record, None
    with Image.open(io.BytesIO(data)) as image:
        return record, image.convert("RGB")


def _check_epoch(seed: int, epoch: int) -> None:
    """Seeds feed numpy's SeedSequence, which takes non-negative integers only."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0 (got seed {seed}, epoch {epoch})")


def shard_order(n_shards: int, *, seed: int, epoch: int) -> list[int]:
    """The epoch's seeded permutation of the shards: the global sample order reads them so."""
    _check_epoch(seed, epoch)
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n_shards)]


def rank_range(total: int, *, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s contiguous slice of an epoch of ``total`` samples.

    The slices partition the epoch and differ in size by at most one sample."""
    _check_rank(rank, world_size)
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def stream_ranges(
    total: int, *, rank: int, world_size: int, num_workers: int, batch_size: int
) -> list[tuple[int, int]]:
    """[start, end) of each DataLoader worker stream of ``rank`` in the epoch's sample order.

    The rank's slice is cut into near-equal runs of whole batches (only the last stream may end
    in a partial batch), so ranks x workers read disjoint slices that cover the epoch; a worker
    with nothing to read gets an empty range.
    """
    start, end = rank_range(total, rank=rank, world_size=world_size)
    workers = max(num_workers, 1)  # num_workers=0 reads in the main process: one stream
    n_batches = -(-(end - start) // batch_size)
    cuts = [
        start + min(end - start, (w * n_batches // workers) * batch_size) for w in range(workers)
    ]
    return list(zip(cuts, [*cuts[1:], end], strict=True))


def _n_batches(n_samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches a DataLoader worker makes of ``n_samples`` (it batches its own stream)."""
    return n_samples // batch_size if drop_last else -(-n_samples // batch_size)


def _resume_plan(batches: list[int], skip: int) -> tuple[list[int], list[int]]:
    """(batches consumed per worker stream, stream order for the physical workers) after ``skip``.

    A DataLoader yields its workers' batches round-robin from worker 0, dropping a worker from
    the rotation once it is exhausted. After ``skip`` batches, each stream resumes past its
    consumed batches, and the streams are handed to physical workers 0, 1, ... in the order the
    rotation would continue, so that a fresh DataLoader continues the original sequence exactly.
    """
    if skip > sum(batches):
        raise ValueError(f"cannot skip {skip} batches: the epoch has {sum(batches)}")
    workers = len(batches)
    consumed = [0] * workers
    turn = 0
    for _ in range(skip):
        while consumed[turn] >= batches[turn]:
            turn = (turn + 1) % workers
        consumed[turn] += 1
        turn = (turn + 1) % workers
    rotation = [(turn + i) % workers for i in range(workers)]
    return consumed, [w for w in rotation if consumed[w] < batches[w]]


def _shuffled(samples: Iterator[dict], buffer: int, rng: np.random.Generator) -> Iterator[dict]:
    """A seeded shuffle buffer of ``buffer`` samples (buffer <= 1: the samples unchanged)."""
    if buffer <= 1:
        yield from samples
        return
    pool: list[dict] = []
    for sample in samples:
        if len(pool) < buffer:
            pool.append(sample)
            continue
        i = int(rng.integers(len(pool)))
        yield pool[i]
        pool[i] = sample
    while pool:
        i = int(rng.integers(len(pool)))
        pool[i], pool[-1] = pool[-1], pool[i]
        yield pool.pop()


def sample_length(sample: dict[str, Any]) -> tuple[bool, int]:
    """(has an image, words of its conversation) of a raw sample: the key length grouping sorts by.

    Words, as LLaVA's ``modality_lengths``: tokenizing in the reader would cost more than the
    padding it saves, and the order only needs to be roughly right."""
    record = json.loads(sample["json"])
    words = sum(len(str(turn.get("value", "")).split()) for turn in record["conversations"])
    return any(ext in sample for ext in IMAGE_EXTS), words


def _grouped(
    samples: Iterator[dict], *, window: int, batch_size: int, rng_of: Any
) -> Iterator[dict]:
    """Length grouping: each window of ``window`` samples sorted by (modality, length), cut into
    batches of ``batch_size``, and those batches yielded in a seeded random order
    (``rng_of(k)`` for window k). Windows start on batch boundaries, so a DataLoader worker
    batching this stream gets batches of one modality and similar lengths."""
    for k in itertools.count():
        chunk = list(itertools.islice(samples, window))
        if not chunk:
            return
        chunk.sort(key=sample_length)
        full = len(chunk) // batch_size
        for i in rng_of(k).permutation(full):
            yield from chunk[int(i) * batch_size : (int(i) + 1) * batch_size]
        yield from chunk[full * batch_size :]  # a partial batch stays last (the stream's end)


class ConversationShards(torch.utils.data.IterableDataset):
    """Training shards as an IterableDataset of (conversation record, RGB image or None).

    Each epoch has one global sample order: the shards in a seeded permutation (``shard_order``),
    each shuffled within through a buffer of ``shuffle_buffer`` samples seeded by (seed, epoch,
    shard). Ranks read contiguous, near-equal slices of that order, and each rank's DataLoader
    workers near-equal runs of whole batches of its slice (``stream_ranges``): ranks x workers
    see every sample exactly once per epoch, whatever the number of shards, and ranks differ by
    at most one sample. Shards are only storage: a stream opens the shards its range overlaps.
    The stream is a function of (seed, epoch, rank, world_size, num_workers, batch_size,
    group_batches) only.

    ``group_batches`` > 0 groups by length (``_grouped``): each worker sorts windows of that many
    batches by (modality, length) and yields their batches in a seeded order, so that
    right-padding is a small part of each batch.

    Resuming: with ``skip_batches`` = batches the rank's DataLoader already yielded this epoch,
    and that loader's ``batch_size`` (per worker; 1 when it yields single samples) and
    ``drop_last``, a fresh DataLoader with the same ``num_workers`` yields exactly the rest of
    the original sequence; shards holding only consumed samples are not even opened. Samples hold
    PIL images: use a ``collate_fn`` that accepts them.

    ``set_epoch`` moves to another epoch (and resume point) without rebuilding; a DataLoader
    picks it up when its iterator is created, so do not combine it with
    ``persistent_workers=True``.
    """

    def __init__(
        self,
        shard_dir: Path,
        *,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int = 0,
        shuffle_buffer: int = 0,
        skip_batches: int = 0,
        batch_size: int = 1,
        drop_last: bool = False,
        group_batches: int = 0,
    ) -> None:
        super().__init__()
        _check_rank(rank, world_size)
        if batch_size < 1 or shuffle_buffer < 0 or group_batches < 0:
            raise ValueError(
                f"need batch_size >= 1, shuffle_buffer >= 0 and group_batches >= 0 (got "
                f"{batch_size}, {shuffle_buffer}, {group_batches})"
            )
        self.shard_dir = str(shard_dir)
        self.urls = shard_urls(shard_dir)
        self.counts = [s["count"] for s in read_index(shard_dir)["shards"]]
        if sum(self.counts) < world_size:
            raise ValueError(
                f"{shard_dir}: {sum(self.counts)} samples cannot feed {world_size} ranks"
            )
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.batch_size, self.drop_last = shuffle_buffer, batch_size, drop_last
        self.group_batches = group_batches
        self.set_epoch(epoch, skip_batches=skip_batches)

    def set_epoch(self, epoch: int, *, skip_batches: int = 0) -> None:
        """Read ``epoch`` next, skipping the first ``skip_batches`` batches of its loader."""
        _check_epoch(self.seed, epoch)
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0 (got {skip_batches})")
        self.epoch, self.skip_batches = epoch, skip_batches

    def worker_ranges(self, num_workers: int) -> list[tuple[int, int]]:
        """The rank's worker streams this epoch: [start, end) in the epoch's sample order."""
        return stream_ranges(
            sum(self.counts),
            rank=self.rank,
            world_size=self.world_size,
            num_workers=num_workers,
            batch_size=self.batch_size,
        )

    def _raw(self, start: int, end: int) -> Iterator[dict]:
        """Raw samples at positions [start, end) of the epoch's order; other shards unopened."""
        offset = 0
        for shard in shard_order(len(self.counts), seed=self.seed, epoch=self.epoch):
            count = self.counts[shard]
            lo, hi = max(start, offset), min(end, offset + count)
            if lo < hi:
                # one generator per shard: the in-shard order depends on the shard alone
                rng = np.random.default_rng([self.seed, self.epoch, shard, 1])
                raw = _shuffled(_tar_samples(self.urls[shard]), self.shuffle_buffer, rng)
                yield from itertools.islice(raw, lo - offset, hi - offset)
            offset += count
            if offset >= end:
                return

    def _stream(self, start: int, end: int, skip: int) -> Iterator[tuple[dict, Any]]:
        """Decoded samples of the stream [start, end), grouped by length if asked, the first
        ``skip`` skipped (whole consumed windows without reading them)."""
        if not self.group_batches:
            raw = self._raw(start + skip, end)
        else:
            window = self.group_batches * self.batch_size
            first, skip = divmod(skip, window)

            def rng_of(k: int) -> np.random.Generator:
                return np.random.default_rng([self.seed, self.epoch, start, first + k, 2])

            raw = _grouped(
                self._raw(start + first * window, end),
                window=window,
                batch_size=self.batch_size,
                rng_of=rng_of,
            )
            raw = itertools.islice(raw, skip, None)
        for sample in raw:
            yield decode_conversation(sample)

    def __iter__(self) -> Iterator[tuple[dict[str, Any], Image.Image | None]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        ranges = self.worker_ranges(num_workers)
        batches = [
            _n_batches(end - start, self.batch_size, self.drop_last) for start, end in ranges
        ]
        consumed, order = _resume_plan(batches, self.skip_batches)
        if worker >= len(order):
            return  # every stream this worker could take is exhausted
        stream = order[worker]
        start, end = ranges[stream]
        yield from self._stream(start, end, consumed[stream] * self.batch_size)


# The public name of the training stream (one class, documented there).
conversation_dataset = ConversationShards


def rank_batches(
    total: int, *, world_size: int, num_workers: int, batch_size: int, drop_last: bool = False
) -> list[int]:
    """Batches each rank's DataLoader yields per epoch of ``total`` samples (workers batch their
    own streams). Distributed training must step every rank the same number of times: the
    plan takes the minimum."""
    return [
        sum(
            _n_batches(end - start, batch_size, drop_last)
            for start, end in stream_ranges(
                total,
                rank=r,
                world_size=world_size,
                num_workers=num_workers,
                batch_size=batch_size,
            )
        )
        for r in range(world_size)
    ]


def epoch_coverage(
    total: int,
    *,
    world_size: int,
    num_workers: int,
    batch_size: int,
    grad_accum: int = 1,
    drop_last: bool = False,
) -> tuple[int, int]:
    """(micro-batches every rank steps per epoch, samples those batches hold, all ranks).

    Every rank steps the minimum over ranks of its batches, rounded down to whole optimizer
    steps; the batches a rank yields past that, in the DataLoader's round-robin order over its
    workers, are never seen."""
    per_rank = rank_batches(
        total,
        world_size=world_size,
        num_workers=num_workers,
        batch_size=batch_size,
        drop_last=drop_last,
    )
    micro = min(per_rank) // grad_accum * grad_accum
    seen = 0
    for r in range(world_size):
        ranges = stream_ranges(
            total, rank=r, world_size=world_size, num_workers=num_workers, batch_size=batch_size
        )
        sizes = [end - start for start, end in ranges]
        batches = [_n_batches(n, batch_size, drop_last) for n in sizes]
        consumed, _ = _resume_plan(batches, micro)
        seen += sum(min(c * batch_size, n) for c, n in zip(consumed, sizes, strict=True))
    return micro, seen


def check_coverage(
    total: int,
    *,
    world_size: int,
    num_workers: int,
    batch_size: int,
    grad_accum: int = 1,
    max_dropped: float = 0.01,
    where: str = "training data",
) -> tuple[int, int]:
    """``epoch_coverage``, raising when an epoch would leave more than ``max_dropped`` of the
    samples unseen (or no full optimizer step); the message names every number."""
    micro, seen = epoch_coverage(
        total,
        world_size=world_size,
        num_workers=num_workers,
        batch_size=batch_size,
        grad_accum=grad_accum,
    )
    setup = (
        f"{where}: {total} samples over {world_size} ranks x {max(num_workers, 1)} loader "
        f"workers, micro-batches of {batch_size} x {grad_accum} accumulation"
    )
    if micro < grad_accum or micro == 0:
        raise ValueError(f"{setup}: not one optimizer step per epoch (too few samples)")
    if total - seen > max_dropped * total:
        raise ValueError(
            f"{setup}: an epoch would see {seen} samples, dropping {total - seen} "
            f"({(total - seen) / total:.1%} > {max_dropped:.0%}); use fewer ranks or a "
            "smaller global batch"
        )
    return micro, seen
