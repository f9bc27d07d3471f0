"""Training data sources as LLaVA conversation records, ready to be written as WebDataset shards.

Every reader returns an iterator of ``(record, image_source)`` pairs in a deterministic order
(the order of its annotation file), for ``fgvlm.data.shards.write_conversation_shards``:

- ``record``: LLaVA's conversation format {"id": str, "image": str (absent for text-only samples),
  "conversations": [{"from": "human" | "gpt", "value": str}, ...]}; "<image>" in a human turn
  marks the image. Captions (pretraining) become the `plain` template pair
  [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}].
- ``image_source``: the image file's path, a fetched image (``fgvlm.data.fetch.TarMember``, read
  with ``fetch.image_bytes``), or None for a text-only sample.

Sources (paper Appendix C) and where their files come from (the annotation files through
``download_training_data``, the images through ``fgvlm.data.archives`` and ``fgvlm.data.fetch``,
each by a job of its own):

- LLaVA-Pretrain (hub dataset ``liuhaotian/LLaVA-Pretrain``, or LLaVA-CC3M-Pretrain-595K):
  the caption file, and ``images.zip`` as the source's ``images`` archive.
- PixMo-Cap (hub dataset ``allenai/pixmo-cap``): parquet files of image URLs and captions; the
  URLs are one URL list (``pixmo_url_list``) whose fetched images the reader takes.
- LLaVA-1.5 finetuning mix (hub dataset ``liuhaotian/LLaVA-Instruct-150K``):
  ``llava_v1_5_mix665k.json``. Its images come one folder per leading part of the annotation's
  image paths: ``coco`` (holding ``train2017/``), ``gqa`` (``images/``), ``textvqa``
  (``train_images/``), ``vg/VG_100K`` and ``vg/VG_100K_2`` (the source's archives, or folders
  the user points ``image_roots`` at), and ``ocr_vqa/images`` (OCR-VQA's URL list, one
  ``<key>.jpg`` per book cover). An annotation path ``coco/train2017/x.jpg`` resolves to
  ``root_of["coco"] / "train2017/x.jpg"``, the longest matching prefix winning.
- The demo's synthetic worlds (``fgvlm.data.synthetic.generate_world``): ``captions.jsonl`` (a short
  web-like and a long detailed caption per image) and ``instructions.jsonl``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import polars as pl
from huggingface_hub import hf_hub_download

from fgvlm.data.download import ChecksumError
from fgvlm.data.fetch import TarMember, fetched_images, url_key
from fgvlm.hub_pins import (
    SOURCE_FILE,
    downloaded_commit,
    is_commit,
    lock_key,
    pinned_revision,
    record_pins,
)
from fgvlm.io import file_digest, write_json

log = logging.getLogger(__name__)

# the contract's image marker, same value as fgvlm.models.templates.IMAGE_PLACEHOLDER
IMAGE_PLACEHOLDER = "<image>"
ROLES = ("human", "gpt")
CAPTION_QUALITIES = ("short", "long")
PIXMO_URL_COLUMN = "image_url"

Sample = tuple[dict[str, Any], Path | TarMember | None]


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


def pixmo_url_list(parquet_path: Path | Sequence[Path]) -> list[tuple[str, str]]:
    """PixMo-Cap's distinct image URLs as (key, url), sorted by URL (``fetch.url_key`` keys)."""
    urls = set()
    for file in _parquet_files(parquet_path):
        frame = pl.read_parquet(file, columns=[PIXMO_URL_COLUMN])
        urls.update(u for u in frame[PIXMO_URL_COLUMN].to_list() if u)
    return [(url_key(url), url) for url in sorted(urls)]


def read_pixmo_cap(
    parquet_path: Path | Sequence[Path],
    images: dict[str, TarMember],
    *,
    field: str = "caption",
) -> Iterator[Sample]:
    """PixMo-Cap as plain-template caption pairs, with the images fetched from its URL list.

    ``parquet_path``: a PixMo-Cap parquet file, a list of them, or a folder of them (columns
    ``image_url``, ``caption``, ``transcripts``, ...); only ``field`` (the paper: "caption",
    never the audio transcripts) is used. ``images``: the fetched images by ``url_key``
    (``fetch.fetched_images``). Rows whose image was not kept (dead or undecodable URLs: the
    fetch report counts them) or that have no caption are left out. Returns (record {"id":
    "pixmo-<row>", "image": url, "conversations"}, fetched image) in row order.
    """
    rows = _read_pixmo_rows(parquet_path, field)
    samples: list[Sample] = []
    dropped: Counter[str] = Counter()
    for row, (url, caption) in enumerate(rows.iter_rows()):
        image = images.get(url_key(url)) if url else None
        if image is None or not caption:
            dropped["no_image" if image is None else "no_caption"] += 1
            continue
        record = {
            "id": f"pixmo-{row:07d}",
            "image": url,
            "conversations": caption_conversation(caption),
        }
        samples.append((record, image))
    log.info("PixMo-Cap: %d of %d rows kept, dropped %s", len(samples), rows.height, dict(dropped))
    return iter(samples)


# ---------------------------------------------------------------- OCR-VQA's URL list
def ocr_vqa_url_list(dataset_json: Path) -> list[tuple[str, str]]:
    """OCR-VQA's ``dataset.json`` ({key: {"imageURL", ...}}) as (key, url) sorted by key."""
    where = Path(dataset_json)
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object keyed by image id")
    items = []
    for key, entry in sorted(data.items()):
        url = entry.get("imageURL") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not url:
            raise ValueError(f"{where}: entry {key!r} has no 'imageURL'")
        items.append((str(key), url))
    return items


URL_LIST_FORMATS = {"ocr_vqa": ocr_vqa_url_list}


# ---------------------------------------------------------------- LLaVA-1.5 finetuning mix
def _image_under_root(image: PurePosixPath, roots: dict[PurePosixPath, Path]) -> Path | None:
    """``image`` with its longest prefix found in ``roots`` replaced by that root; else None."""
    for n in range(len(image.parts) - 1, 0, -1):
        root = roots.get(PurePosixPath(*image.parts[:n]))
        if root is not None:
            return root / PurePosixPath(*image.parts[n:])
    return None


def _fetched_image(image: PurePosixPath, fetched: dict[PurePosixPath, dict[str, TarMember]]):
    """(found, fetched image or None) for an image under a fetched URL list's prefix."""
    for n in range(len(image.parts) - 1, 0, -1):
        images = fetched.get(PurePosixPath(*image.parts[:n]))
        if images is not None:
            return True, images.get(PurePosixPath(*image.parts[n:]).stem)
    return False, None


def read_llava_instruct(
    annotations_json: Path,
    image_roots: dict[str, Path],
    *,
    fetched: dict[str, dict[str, TarMember]] | None = None,
    missing_images: str = "fail",
    report_path: Path | None = None,
) -> Iterator[Sample]:
    """LLaVA-1.5's ``llava_v1_5_mix665k.json`` (or any LLaVA-format instruction file).

    ``image_roots`` maps a leading part of the annotation's image paths to a folder that
    replaces it, the longest matching part winning: with {"coco": "/d/coco"} the path
    ``coco/train2017/x.jpg`` resolves to ``/d/coco/train2017/x.jpg``; with {"coco/train2017":
    "/d/train2017"} to ``/d/train2017/x.jpg``. ``fetched`` maps a prefix to a fetched URL list
    (key -> image): ``ocr_vqa/images/<key>.jpg`` is that list's image ``key``. Samples without
    "image" stay text-only (image source None). An image under no root is a ValueError. Images
    that could not be had (a missing file, a dead URL) are counted per source (the path's first
    part) into ``report_path`` and the log; with ``missing_images="fail"`` they are a
    FileNotFoundError naming the first, with "drop" their samples are left out. Returns an
    iterator of (record {"id", "image"?, "conversations"}, image source | None) in file order.
    """
    if missing_images not in ("fail", "drop"):
        raise ValueError(f"missing_images must be 'fail' or 'drop', not {missing_images!r}")
    where = Path(annotations_json)
    roots = {PurePosixPath(prefix): Path(root) for prefix, root in image_roots.items()}
    by_prefix = {PurePosixPath(prefix): images for prefix, images in (fetched or {}).items()}
    samples: list[Sample] = []
    missing: Counter[str] = Counter()
    first_missing = None
    for index, item in enumerate(_read_json_list(where)):
        sample_id = _sample_id(item, index, where)
        record: dict[str, Any] = {"id": sample_id}
        source = None
        if item.get("image") is not None:
            image = _relative_image(item["image"], sample_id, where)
            found, source = _fetched_image(image, by_prefix)
            if not found:
                source = _image_under_root(image, roots)
                if source is None:
                    raise ValueError(
                        f"{where}: sample {sample_id!r} image {str(image)!r} is under no image "
                        f"root (roots: {sorted(str(r) for r in [*roots, *by_prefix])})"
                    )
                source = source if source.is_file() else None
            if source is None:
                missing[image.parts[0]] += 1
                first_missing = first_missing or (sample_id, str(image))
                continue
            record["image"] = str(image)
        record["conversations"] = _check_conversations(item.get("conversations"), sample_id, where)
        samples.append((record, source))
    report = {"samples": len(samples), "missing": dict(sorted(missing.items()))}
    report["dropped"] = sum(missing.values()) if missing_images == "drop" else 0
    if report_path is not None:
        write_json(report, report_path)
    log.info("%s: %s", where.name, report)
    if missing and missing_images == "fail":
        sample_id, image = first_missing
        raise FileNotFoundError(
            f"{where}: sample {sample_id!r}: image {image} could not be had "
            f"({sum(missing.values())} missing: {dict(missing)}; missing_images: drop leaves "
            f"them out)"
        )
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
def _hub_file(source: dict[str, Any], filename: str, dest: Path) -> Path:
    """One file of a hub dataset at ``source["revision"]``, sha256-checked when the config pins
    one."""
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
        got = file_digest(path)
        if got != expected:
            path.unlink(missing_ok=True)  # never leave an unverified file for the next run
            raise ChecksumError(
                f"{path}: sha256 of {source['repo']}:{filename} is {got}, config pins {expected}"
            )
    return path


def download_training_data(source: dict[str, Any], dest: Path) -> dict[str, Any]:
    """The hub-hosted files of a training source (``train_data.<key>.source``) into ``dest``.

    - llava_pretrain, llava_instruct: ``annotations`` -> {"annotations": path}
    - pixmo_cap: ``files`` -> {"parquet": [paths]}
    Files land at ``dest/<filename>`` through ``huggingface_hub.hf_hub_download``, which skips
    files already there at the same revision; sha256-checked where ``sha256`` pins them. The
    revision is pinned as ``fgvlm.hub_pins`` says (the lock ``<dest>.lock.json``): the first
    file resolves a branch to its commit and the others are asked for at that commit.
    ``dest/fgvlm_source.json`` records the commit and each file's sha256. Images come from the
    source's archives and URL lists. Synthetic sources have nothing to download.
    """
    kind = source.get("type")
    if kind in ("llava_pretrain", "llava_instruct"):
        names = [source["annotations"]]
    elif kind == "pixmo_cap":
        names = list(source["files"])
    else:
        raise ValueError(f"training source type {kind!r} has nothing to download")
    dest, repo, revision = Path(dest), source["repo"], source.get("revision") or "main"
    asked = pinned_revision(repo, revision, dest)
    files = []
    for name in names:
        files.append(_hub_file({**source, "revision": asked}, name, dest))
        if not is_commit(asked):
            asked = downloaded_commit(dest, [name]) or asked
    commit = asked if is_commit(asked) else None
    if commit is None:
        log.warning("%s@%s: the commit it resolved to is unknown; not pinned", repo, revision)
    write_json(
        {
            "repo": repo,
            "revision": revision,
            "sha": commit,
            "files": {name: file_digest(path) for name, path in zip(names, files, strict=True)},
        },
        dest / SOURCE_FILE,
    )
    record_pins(dest, {lock_key(repo, revision): commit})
    if kind == "pixmo_cap":
        return {"parquet": files}
    return {"annotations": files[0]}


HUB_SOURCES = ("llava_pretrain", "pixmo_cap", "llava_instruct")


def _under(raw_dir: Path, folder: str) -> Path:
    """A configured folder: absolute, or relative to the source's raw folder."""
    return raw_dir / folder  # an absolute ``folder`` replaces ``raw_dir``


def read_training_source(
    source: dict[str, Any],
    raw_dir: Path,
    *,
    archives: dict[str, Path] | None = None,
    fetched: dict[str, Path] | None = None,
) -> Iterator[Sample]:
    """Download the annotations of a hub-hosted training source and read it with its images.

    ``source``: a ``train_data.<key>.source`` config (schema defaults filled); ``raw_dir``: its
    download folder; ``archives``: archive name -> extracted folder; ``fetched``: URL-list name
    -> its parts folder (``fetch.fetch_url_list``). A user's ``image_root`` / ``image_roots``
    (absolute, or relative to ``raw_dir``) take the place of the archives and lists they cover.
    """
    kind = source.get("type")
    if kind not in HUB_SOURCES:
        raise ValueError(f"training source type {kind!r} is not hub-hosted ({HUB_SOURCES})")
    raw_dir, archives, fetched = Path(raw_dir), archives or {}, fetched or {}
    files = download_training_data(source, raw_dir)
    if kind == "llava_pretrain":
        if source["image_root"]:
            root = _under(raw_dir, source["image_root"])
        else:
            root = Path(archives["images"]) / source["archives"]["images"]["subdir"]
        return read_llava_pretrain(files["annotations"], root)
    if kind == "pixmo_cap":
        images = fetched_images(fetched["images"])
        return read_pixmo_cap(files["parquet"], images, field=source["field"])
    roots = {prefix: _under(raw_dir, folder) for prefix, folder in source["image_roots"].items()}
    for name, spec in source["archives"].items():
        if spec["prefix"] not in roots:
            roots[spec["prefix"]] = Path(archives[name]) / spec["subdir"]
    lists = {
        spec["prefix"]: fetched_images(fetched[name])
        for name, spec in source["url_lists"].items()
        if spec["prefix"] not in roots
    }
    return read_llava_instruct(
        files["annotations"],
        roots,
        fetched=lists,
        missing_images=source["missing_images"],
        report_path=raw_dir / "images_report.json",
    )


def read_source(
    source: dict[str, Any],
    *,
    raw_dir: Path,
    world_dirs: Sequence[Path] = (),
    archives: dict[str, Path] | None = None,
    fetched: dict[str, Path] | None = None,
) -> Iterator[Sample]:
    """(record, image) pairs of one ``train_data.<key>.source``, in a fixed order: synthetic
    sources from their drawn ``world_dirs``, hub-hosted ones from ``raw_dir`` and their images'
    ``archives`` and ``fetched`` URL lists (``read_training_source``)."""
    if source["type"] == "synthetic_captions":
        for world in world_dirs:
            yield from read_synthetic_captions(Path(world), source["quality"])
    elif source["type"] == "synthetic_instructions":
        for world in world_dirs:
            yield from read_synthetic_instructions(Path(world))
    else:
        yield from read_training_source(source, Path(raw_dir), archives=archives, fetched=fetched)
