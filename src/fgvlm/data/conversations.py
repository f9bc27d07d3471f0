"""Training data sources as LLaVA conversation records, ready to be written as WebDataset shards.

Every reader returns an iterator of ``(record, image_source)`` pairs in a deterministic order
(the order of its annotation file), for ``fgvlm.data.shards.write_conversation_shards``:

- ``record``: LLaVA's conversation format {"id": str, "image": str (absent for text-only samples),
  "conversations": [{"from": "human" | "gpt", "value": str}, ...]}; "<image>" in a human turn
  marks the image. Captions (pretraining) become the `plain` template pair
  [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}].
- ``image_source``: the image file's path, or None for a text-only sample.

Sources (paper Appendix C) and where their files come from:

- LLaVA-Pretrain (hub dataset ``liuhaotian/LLaVA-Pretrain``): ``blip_laion_cc_sbu_558k.json`` and
  ``images.zip``, both fetched by ``download_training_data``; ``extract_zip`` unpacks the images.
- PixMo-Cap (hub dataset ``allenai/pixmo-cap``): parquet files of image URLs and captions, fetched by
  ``download_training_data``; ``read_pixmo_cap`` fetches the images from their URLs into a cache.
- LLaVA-1.5 finetuning mix (hub dataset ``liuhaotian/LLaVA-Instruct-150K``):
  ``llava_v1_5_mix665k.json``, fetched by ``download_training_data``. Its images are not on the hub
  and must be provided by the user, one root per first path component of the annotation's image
  paths (LLaVA's README lists the downloads): ``coco`` (a folder holding COCO ``train2017/``),
  ``gqa`` (holding ``images/``), ``ocr_vqa`` (holding ``images/``, converted to .jpg as LLaVA
  does), ``textvqa`` (holding ``train_images/``), ``vg`` (holding ``VG_100K/`` and
  ``VG_100K_2/``). An annotation path ``coco/train2017/x.jpg`` resolves to
  ``image_roots["coco"] / "train2017/x.jpg"``; a longer key such as ``coco/train2017`` may
  point at the train2017 folder itself.
- The demo's synthetic worlds (``fgvlm.data.synthetic.generate_world``): ``captions.jsonl`` (a short
  web-like and a long detailed caption per image) and ``instructions.jsonl``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path, PurePosixPath
from typing import Any

import polars as pl
from huggingface_hub import hf_hub_download
from PIL import Image
from tqdm import tqdm

from fgvlm.data.download import ChecksumError
from fgvlm.io import atomic_path, write_json

log = logging.getLogger(__name__)

# the contract's image marker, same value as fgvlm.models.templates.IMAGE_PLACEHOLDER
IMAGE_PLACEHOLDER = "<image>"
ROLES = ("human", "gpt")
CAPTION_QUALITIES = ("short", "long")
# allenai/pixmo-cap's parquet release (the hub's "data/" folder).
PIXMO_CAP_FILES = tuple(f"data/train-{i:05d}-of-00004.parquet" for i in range(4))
PIXMO_URL_COLUMN = "image_url"
MAX_FAILURE_EXAMPLES = 20
USER_AGENT = "fgvlm-data/0.1 (research; PixMo-Cap image fetch)"
HASH_CHUNK = 1 << 20

Sample = tuple[dict[str, Any], Path | None]
Fetch = Callable[[str], bytes]


# ---------------------------------------------------------------- shared checks
def _read_json_list(path: Path) -> list[Any]:
    """A JSON file holding a list; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per non-empty line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
    return records


def _sample_id(item: Any, index: int, where: Path) -> str:
    """The sample's id as a string (some LLaVA files store ints); a missing id is an error."""
    if not isinstance(item, dict) or item.get("id") in (None, ""):
        raise ValueError(f"{where}: sample #{index} has no 'id'")
    return str(item["id"])


def _check_conversations(turns: Any, sample_id: str, where: Path) -> list[dict[str, str]]:
    """LLaVA turns [{"from": "human"|"gpt", "value": str}], copied; errors name the sample."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: sample {sample_id!r} has no 'conversations' list")
    checked = []
    for i, turn in enumerate(turns):
        ok = isinstance(turn, dict) and turn.get("from") in ROLES
        if not ok or not isinstance(turn.get("value"), str):
            raise ValueError(
                f"{where}: sample {sample_id!r} turn {i} is not "
                f"{{'from': 'human'|'gpt', 'value': str}}: {turn!r}"
            )
        checked.append({"from": turn["from"], "value": turn["value"]})
    return checked


def caption_conversation(caption: str) -> list[dict[str, str]]:
    """The `plain`-template pretraining pair of a caption: the image, then the caption."""
    return [
        {"from": "human", "value": IMAGE_PLACEHOLDER},
        {"from": "gpt", "value": caption},
    ]


def _relative_image(image: Any, sample_id: str, where: Path) -> PurePosixPath:
    """An annotation's relative image path; absolute paths and '..' are refused."""
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: sample {sample_id!r} has an invalid 'image' {image!r}")
    path = PurePosixPath(image)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{where}: sample {sample_id!r} image path {image!r} leaves its root")
    return path


def _require_images(samples: list[Sample], where: Path) -> None:
    """Every image file exists; else name the first missing one (checked before any real work)."""
    missing = [(r["id"], p) for r, p in samples if p is not None and not p.is_file()]
    if missing:
        sample_id, path = missing[0]
        raise FileNotFoundError(
            f"{where}: sample {sample_id!r}: image {path} not found "
            f"({len(missing)} of {len(samples)} images missing)"
        )


# ---------------------------------------------------------------- LLaVA-Pretrain
def _zip_member_unsafe(name: str) -> bool:
    """True for a member that would land outside the extraction folder (zip-slip)."""
    path = PurePosixPath(name.replace("\\", "/"))
    drive = re.match(r"^[A-Za-z]:", name) is not None
    return path.is_absolute() or drive or ".." in path.parts


def extract_zip(zip_path: Path, dest: Path) -> Path:
    """Unpack ``zip_path`` into ``dest`` atomically; return ``dest``.

    Every member is checked before anything is written: an absolute path, a drive letter or a
    '..' component (zip-slip, the zip analogue of tarfile's "data" filter) is a ValueError naming
    the member. ``dest`` appears only once every member is extracted (an existing ``dest`` is
    replaced).
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if not zip_path.is_file():
        raise FileNotFoundError(f"{zip_path}: zip archive not found")
    with zipfile.ZipFile(zip_path) as archive:
        members = archive.infolist()
        for member in members:
            if _zip_member_unsafe(member.filename):
                raise ValueError(
                    f"{zip_path}: member {member.filename!r} would be extracted outside {dest}"
                )
        with atomic_path(dest, is_dir=True) as tmp:
            for member in tqdm(members, desc=f"unzip {zip_path.name}", unit="file"):
                archive.extract(member, tmp)
    return dest


def read_llava_pretrain(annotations_json: Path, images_root: Path) -> Iterator[Sample]:
    """LLaVA-Pretrain (``blip_laion_cc_sbu_558k.json``) as plain-template caption pairs.

    ``annotations_json``: [{"id", "image": "00453/004539375.jpg", "conversations": [human
    "<image>\\n<instruction>", gpt caption]}]; only the caption (the gpt turn) is kept.
    ``images_root``: the folder ``images.zip`` was extracted to. Yields (record, image path) in
    file order; every image is checked to exist first (FileNotFoundError naming sample and path).
    """
    where = Path(annotations_json)
    samples: list[Sample] = []
    for index, item in enumerate(_read_json_list(where)):
        sample_id = _sample_id(item, index, where)
        turns = _check_conversations(item.get("conversations"), sample_id, where)
        captions = [t["value"] for t in turns if t["from"] == "gpt"]
        if not captions:
            raise ValueError(f"{where}: sample {sample_id!r} has no gpt turn (the caption)")
        image = _relative_image(item.get("image"), sample_id, where)
        record = {
            "id": sample_id,
            "image": str(image),
            "conversations": caption_conversation(captions[0]),
        }
        samples.append((record, Path(images_root) / image))
    _require_images(samples, where)
    return iter(samples)


# ---------------------------------------------------------------- PixMo-Cap
def fetch_url(url: str, *, timeout: float = 30.0) -> bytes:
    """The body of an HTTP(S) GET of ``url`` (urllib); HTTP errors raise ``HTTPError``."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _permanent(err: Exception) -> bool:
    """A client error other than timeout / rate limit: retrying cannot help."""
    return (
        isinstance(err, urllib.error.HTTPError)
        and 400 <= err.code < 500
        and err.code
        not in (
            408,
            429,
        )
    )


def _fetch_with_retries(url: str, fetch: Fetch, retries: int, backoff: float) -> bytes:
    """``fetch(url)``, retried up to ``retries`` more times with exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return fetch(url)
        except Exception as err:
            if attempt == retries or _permanent(err):
                raise
            time.sleep(backoff * 2**attempt)  # back off: transient failures and rate limits
    raise AssertionError("unreachable")


def _decodable(data: bytes) -> str | None:
    """None when PIL fully decodes ``data``, else the error message."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as err:  # PIL raises many types on corrupt data
        return f"{type(err).__name__}: {err}"
    return None


def url_cache_path(cache_dir: Path, url: str) -> Path:
    """Where the image of ``url`` is cached: ``cache_dir/<h[:2]>/<h>``, h = sha256(url)."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
    return Path(cache_dir) / digest[:2] / digest


def _cached_fetch(
    url: str, cache_dir: Path, fetch: Fetch, retries: int, backoff: float, retry_failed: bool
) -> dict[str, Any]:
    """Fetch one URL through the cache: {"status": "kept"|"dead"|"undecodable", "error"?}.

    Images are written to the cache only once decodable; failures leave a ``.failed`` marker
    so a rerun neither refetches nor miscounts them (``retry_failed`` ignores the markers).
    """
    path = url_cache_path(cache_dir, url)
    marker = path.with_name(path.name + ".failed")
    if path.is_file():
        return {"status": "kept"}
    if marker.is_file() and not retry_failed:
        return json.loads(marker.read_text())
    try:
        data = _fetch_with_retries(url, fetch, retries, backoff)
        error = _decodable(data)
        result = {"status": "kept"} if error is None else {"status": "undecodable", "error": error}
    except Exception as err:
        data, result = b"", {"status": "dead", "error": f"{type(err).__name__}: {err}"}
    if result["status"] == "kept":
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        marker.unlink(missing_ok=True)
    else:
        with atomic_path(marker) as tmp:
            tmp.write_text(json.dumps(result, sort_keys=True))
    return result


def _parquet_files(parquet_path: Path | Sequence[Path]) -> list[Path]:
    """A parquet file, a list of them, or every ``*.parquet`` under a folder in sorted order."""
    if isinstance(parquet_path, (list, tuple)):
        return [file for path in parquet_path for file in _parquet_files(path)]
    path = Path(parquet_path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path}: no .parquet files in this folder")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: parquet file not found")
    return [path]


def _read_pixmo_rows(parquet_path: Path | Sequence[Path], field: str) -> pl.DataFrame:
    """(image_url, caption) rows of every parquet file, in file then row order."""
    frames = []
    for file in _parquet_files(parquet_path):
        columns = pl.read_parquet_schema(file)
        for column in (PIXMO_URL_COLUMN, field):
            if column not in columns:
                raise ValueError(f"{file}: no column {column!r} (columns: {list(columns)})")
        frames.append(pl.read_parquet(file, columns=[PIXMO_URL_COLUMN, field]))
    return pl.concat(frames).rename({field: "caption"})


def read_pixmo_cap(
    parquet_path: Path | Sequence[Path],
    cache_dir: Path,
    report_path: Path,
    *,
    fetch: Fetch | None = None,
    retries: int = 3,
    workers: int = 8,
    backoff: float = 1.0,
    field: str = "caption",
    retry_failed: bool = False,
) -> Iterator[Sample]:
    """PixMo-Cap as plain-template caption pairs, images fetched from their URLs into a cache.

    ``parquet_path``: a PixMo-Cap parquet file, a list of them, or a folder of them (columns
    ``image_url``, ``caption``, ``transcripts``, ...); only ``field`` (the paper: "caption",
    never the audio transcripts) is used. Each distinct URL is fetched once with
    ``fetch(url) -> bytes`` (default ``fetch_url``) on ``workers`` threads, retried ``retries``
    times with exponential backoff from ``backoff`` s, and cached under ``cache_dir`` by
    sha256(url) (``url_cache_path``); a cached image or failure marker is reused without
    network (``retry_failed=True`` refetches the failures). Rows whose URL is dead or whose bytes PIL cannot decode are dropped, rows
    without a caption too. Writes ``report_path`` (JSON): {"total", "kept", "dead", "undecodable",
    "no_caption", "examples": [{"row", "url", "status", "error"}]} and returns an iterator of
    (record {"id": "pixmo-<row>", "image": url, "conversations"}, cached image path) in row order.
    """
    if retries < 0 or workers < 1:
        raise ValueError(f"read_pixmo_cap: need retries >= 0, workers >= 1 ({retries}, {workers})")
    fetch = fetch or fetch_url  # looked up at call time: tests and callers may swap it
    rows = _read_pixmo_rows(parquet_path, field)
    urls = sorted({u for u in rows[PIXMO_URL_COLUMN].to_list() if u})
    results: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(_cached_fetch, url, cache_dir, fetch, retries, backoff, retry_failed): url
            for url in urls
        }
        for future in tqdm(as_completed(futures), total=len(futures), desc="PixMo-Cap images"):
            results[futures[future]] = future.result()
    samples: list[Sample] = []
    counts = {"kept": 0, "dead": 0, "undecodable": 0, "no_caption": 0}
    examples = []
    for row, (url, caption) in enumerate(rows.iter_rows()):
        result = results.get(url, {"status": "dead", "error": "empty image_url"})
        status = result["status"] if caption else "no_caption"
        counts[status] += 1
        if status != "kept":
            if len(examples) < MAX_FAILURE_EXAMPLES:
                error = result.get("error", "no caption")
                examples.append({"row": row, "url": url, "status": status, "error": error})
            continue
        record = {
            "id": f"pixmo-{row:07d}",
            "image": url,
            "conversations": caption_conversation(caption),
        }
        samples.append((record, url_cache_path(cache_dir, url)))
    report = {"total": rows.height, **counts, "examples": examples}
    write_json(report, report_path)
    log.info("PixMo-Cap: %s", {k: v for k, v in report.items() if k != "examples"})
    return iter(samples)


# ---------------------------------------------------------------- LLaVA-1.5 finetuning mix
def _image_under_root(image: PurePosixPath, roots: dict[PurePosixPath, Path]) -> Path | None:
    """``image`` with its longest prefix found in ``roots`` replaced by that root; else None."""
    for n in range(len(image.parts) - 1, 0, -1):
        root = roots.get(PurePosixPath(*image.parts[:n]))
        if root is not None:
            return root / PurePosixPath(*image.parts[n:])
    return None


def read_llava_instruct(annotations_json: Path, image_roots: dict[str, Path]) -> Iterator[Sample]:
    """LLaVA-1.5's ``llava_v1_5_mix665k.json`` (or any LLaVA-format instruction file).

    ``image_roots`` maps a leading part of the annotation's image paths to a folder that
    replaces it, the longest matching part winning: with {"coco": "/d/coco"} the path
    ``coco/train2017/x.jpg`` resolves to ``/d/coco/train2017/x.jpg``; with {"coco/train2017":
    "/d/train2017"} to ``/d/train2017/x.jpg``. Samples without "image" stay text-only (image
    source None). Every image is checked before anything is returned: an image under no root is
    a ValueError, a missing file a FileNotFoundError, both naming sample and path. Returns an
    iterator of (record {"id", "image"?, "conversations"}, path | None) in file order.
    """
    where = Path(annotations_json)
    roots = {PurePosixPath(prefix): Path(root) for prefix, root in image_roots.items()}
    samples: list[Sample] = []
    for index, item in enumerate(_read_json_list(where)):
        sample_id = _sample_id(item, index, where)
        record: dict[str, Any] = {"id": sample_id}
        source = None
        if item.get("image") is not None:
            image = _relative_image(item["image"], sample_id, where)
            source = _image_under_root(image, roots)
            if source is None:
                raise ValueError(
                    f"{where}: sample {sample_id!r} image {str(image)!r} is under no image root "
                    f"(image_roots: {sorted(str(r) for r in roots)})"
                )
            record["image"] = str(image)
        record["conversations"] = _check_conversations(item.get("conversations"), sample_id, where)
        samples.append((record, source))
    _require_images(samples, where)
    return iter(samples)


# ---------------------------------------------------------------- the demo's synthetic worlds
def read_synthetic_captions(world_dir: Path, quality: str) -> Iterator[Sample]:
    """A synthetic world's captions (``captions.jsonl``) as plain-template caption pairs.

    ``quality``: "short" (web-like alt text, standing in for LLaVA-Pretrain) or "long" (detailed,
    standing in for PixMo-Cap). Ids are ``<world folder>-<quality>-<line>``; image paths are
    relative to ``world_dir``. Yields (record, image path) in file order.
    """
    if quality not in CAPTION_QUALITIES:
        raise ValueError(f"unknown caption quality {quality!r}; valid: {CAPTION_QUALITIES}")
    world_dir = Path(world_dir)
    where = world_dir / "captions.jsonl"
    samples: list[Sample] = []
    for index, item in enumerate(_read_jsonl(where)):
        sample_id = f"{world_dir.name}-{quality}-{index:06d}"
        caption = item.get(quality) if isinstance(item, dict) else None
        if not isinstance(caption, str) or not caption:
            raise ValueError(f"{where}: line {index + 1} has no {quality!r} caption")
        image = _relative_image(item.get("image"), sample_id, where)
        record = {
            "id": sample_id,
            "image": str(image),
            "conversations": caption_conversation(caption),
        }
        samples.append((record, world_dir / image))
    _require_images(samples, where)
    return iter(samples)


def read_synthetic_instructions(world_dir: Path) -> Iterator[Sample]:
    """A synthetic world's ``instructions.jsonl`` (LLaVA records; images relative to the world)."""
    world_dir = Path(world_dir)
    where = world_dir / "instructions.jsonl"
    samples: list[Sample] = []
    for index, item in enumerate(_read_jsonl(where)):
        sample_id = _sample_id(item, index, where)
        record: dict[str, Any] = {"id": sample_id}
        source = None
        if item.get("image") is not None:
            image = _relative_image(item["image"], sample_id, where)
            record["image"] = str(image)
            source = world_dir / image
        record["conversations"] = _check_conversations(item.get("conversations"), sample_id, where)
        samples.append((record, source))
    _require_images(samples, where)
    return iter(samples)


# ---------------------------------------------------------------- downloads
def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (images.zip is ~27 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_file(source: dict[str, Any], filename: str, dest: Path) -> Path:
    """One file of a hub dataset at the pinned revision, sha256-checked when the config pins one."""
    path = Path(
        hf_hub_download(
            repo_id=source["repo"],
            filename=filename,
            repo_type="dataset",
            revision=source.get("revision"),
            local_dir=dest,
        )
    )
    expected = (source.get("sha256") or {}).get(filename)
    if expected is not None:
        got = _sha256(path)
        if got != expected:
            path.unlink(missing_ok=True)  # never leave an unverified file for the next run
            raise ChecksumError(
                f"{path}: sha256 of {source['repo']}:{filename} is {got}, config pins {expected}"
            )
    elif source.get("revision") in (None, "main"):
        log.warning("%s:%s: neither a revision nor a sha256 pinned", source["repo"], filename)
    return path


def download_training_data(source: dict[str, Any], dest: Path) -> dict[str, Any]:
    """Download a hub-hosted training source (a ``train_data.<key>.source`` config) into ``dest``.

    ``source``: {"type", "repo", "revision", ...} plus optional {"sha256": {filename: hex}}.
    - llava_pretrain: ``annotations`` and ``images`` (the zip) -> {"annotations", "images"} paths
    - pixmo_cap: ``files`` (default ``PIXMO_CAP_FILES``) -> {"parquet": [paths]}
    - llava_instruct: ``annotations`` -> {"annotations": path}; the images are user-provided
      roots (see the module docstring).
    Files land at ``dest/<filename>`` through ``huggingface_hub.hf_hub_download``, which skips
    files already there at the same revision. Synthetic sources have nothing to download.
    """
    kind = source.get("type")
    dest = Path(dest)
    if kind == "llava_pretrain":
        return {
            "annotations": _hub_file(source, source["annotations"], dest),
            "images": _hub_file(source, source["images"], dest),
        }
    if kind == "pixmo_cap":
        files = source.get("files", PIXMO_CAP_FILES)
        return {"parquet": [_hub_file(source, name, dest) for name in files]}
    if kind == "llava_instruct":
        return {"annotations": _hub_file(source, source["annotations"], dest)}
    raise ValueError(f"training source type {kind!r} has nothing to download")


HUB_SOURCES = ("llava_pretrain", "pixmo_cap", "llava_instruct")


def read_training_source(source: dict[str, Any], raw_dir: Path) -> Iterator[Sample]:
    """Download (``download_training_data``) and read one hub-hosted training source.

    ``source``: a ``train_data.<key>.source`` config; ``raw_dir``: its download folder. Returns
    the reader's (record, image source) iterator:
    - llava_pretrain: images.zip is extracted to ``raw_dir/images`` (an existing folder is
      reused: extraction is atomic, so it is complete);
    - pixmo_cap: images are cached in ``raw_dir/images``, the fetch report is
      ``raw_dir/fetch_report.json``; optional source keys ``field``, ``workers``, ``retries``;
    - llava_instruct: ``image_roots`` values that are relative paths are taken relative to
      ``raw_dir`` (see ``read_llava_instruct`` for how keys match image paths).
    Synthetic sources need their world folders: use ``read_synthetic_*``.
    """
    kind = source.get("type")
    if kind not in HUB_SOURCES:
        raise ValueError(f"training source type {kind!r} is not hub-hosted ({HUB_SOURCES})")
    raw_dir = Path(raw_dir)
    files = download_training_data(source, raw_dir)
    if kind == "llava_pretrain":
        images = raw_dir / "images"
        if not images.is_dir():
            extract_zip(files["images"], images)
        return read_llava_pretrain(files["annotations"], images)
    if kind == "pixmo_cap":
        return read_pixmo_cap(
            files["parquet"],
            raw_dir / "images",
            raw_dir / "fetch_report.json",
            field=source.get("field", "caption"),
            workers=source.get("workers", 8),
            retries=source.get("retries", 3),
        )
    if "image_roots" not in source:
        raise ValueError(f"llava_instruct source {source.get('repo')!r} has no 'image_roots'")
    roots = {prefix: raw_dir / root for prefix, root in source["image_roots"].items()}
    return read_llava_instruct(files["annotations"], roots)


def read_source(
    source: dict[str, Any], *, raw_dir: Path, world_dirs: Sequence[Path] = ()
) -> Iterator[Sample]:
    """(record, image) pairs of one ``train_data.<key>.source``, in a fixed order: synthetic
    sources from their drawn ``world_dirs``, hub-hosted ones downloaded into ``raw_dir``."""
    if source["type"] == "synthetic_captions":
        for world in world_dirs:
            yield from read_synthetic_captions(Path(world), source["quality"])
    elif source["type"] == "synthetic_instructions":
        for world in world_dirs:
            yield from read_synthetic_instructions(Path(world))
    else:
        yield from read_training_source(source, Path(raw_dir))
