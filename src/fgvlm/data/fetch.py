"""Images behind URL lists (PixMo-Cap, OCR-VQA), fetched in parallel into WebDataset parts.

The list of (key, url) pairs is cut into parts of ``part_size`` in its given order; each part is
fetched on ``threads`` threads (in one of ``processes`` processes) and written as
``part-NNNNNN.tar`` (``<key>.jpg|png|img`` members: the bytes as served) plus
``part-NNNNNN.json``: the part's keys, and for every key its status ("kept", "dead",
"undecodable") and reason. The json appears last, so it marks a complete part: a rerun after a
kill skips complete parts (nothing they kept is fetched again) and redoes only the unfinished
ones, like img2dataset's incremental mode. A URL's status is fixed once its part is complete, so
two runs train on the same samples (the dead-URL list is stable); ``report.json`` sums it all.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from fgvlm.io import atomic_path, write_json

log = logging.getLogger(__name__)

PART = "part-{:06d}"
USER_AGENT = "fgvlm-data/0.1 (research; image URL list fetch)"
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
MAX_EXAMPLES = 20

Fetch = Callable[[str, float], bytes]


class FetchFailed(Exception):
    """A URL that gave no body; ``reason`` is its report category (http_404, timeout, ...)."""

    def __init__(self, reason: str, detail: str, *, transient: bool) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.transient = reason, transient


def http_get(url: str, timeout: float) -> bytes:
    """The body of a GET of ``url``; failures are FetchFailed with a report reason."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        transient = err.code >= 500 or err.code in (408, 429)
        raise FetchFailed(f"http_{err.code}", str(err.reason), transient=transient) from err
    except TimeoutError as err:
        raise FetchFailed("timeout", str(err), transient=True) from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise FetchFailed("timeout", str(err.reason), transient=True) from err
        raise FetchFailed("connection", str(err.reason), transient=True) from err
    except (OSError, ValueError) as err:  # reset connections, truncated bodies, bad URLs
        raise FetchFailed("connection", f"{type(err).__name__}: {err}", transient=True) from err


def url_key(url: str) -> str:
    """A stable, tar-safe key for an image URL."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]


def _extension(data: bytes) -> str:
    return "jpg" if data.startswith(JPEG_MAGIC) else "png" if data.startswith(PNG_MAGIC) else "img"


def _undecodable(data: bytes) -> str | None:
    """None when PIL fully decodes ``data``, else the error."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as err:  # PIL raises many types on corrupt data
        return f"{type(err).__name__}: {err}"
    return None


@dataclass(frozen=True)
class FetchSettings:
    timeout: float
    retries: int
    backoff: float
    threads: int


def _fetch_one(url: str, fetch: Fetch, settings: FetchSettings) -> tuple[dict[str, str], bytes]:
    """({"status", "reason"?, "error"?}, body) of one URL, retrying transient failures."""
    for attempt in range(settings.retries + 1):
        try:
            data = fetch(url, settings.timeout)
            break
        except FetchFailed as err:
            if attempt == settings.retries or not err.transient:
                return {"status": "dead", "reason": err.reason, "error": str(err)[:300]}, b""
            time.sleep(settings.backoff * 2**attempt)
    error = _undecodable(data)
    if error is not None:
        return {"status": "undecodable", "reason": "undecodable", "error": error[:300]}, b""
    return {"status": "kept"}, data


def _fetch_part(
    items: Sequence[tuple[str, str]],
    out_dir: Path,
    index: int,
    fetch: Fetch,
    settings: FetchSettings,
) -> dict[str, Any]:
    """Fetch one part and write its tar, then its json (the completion mark); return the json."""
    name = PART.format(index)
    with ThreadPoolExecutor(max_workers=settings.threads) as pool:
        results = list(pool.map(lambda kv: _fetch_one(kv[1], fetch, settings), items))
    with atomic_path(out_dir / f"{name}.tar") as tmp, tarfile.open(tmp, "w") as tar:
        for (key, _), (status, data) in zip(items, results, strict=True):
            if status["status"] == "kept":
                info = tarfile.TarInfo(f"{key}.{_extension(data)}")
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    part = {
        "keys": [key for key, _ in items],
        "urls": [url for _, url in items],
        "status": [status for status, _ in results],
    }
    write_json(part, out_dir / f"{name}.json")
    return part


def _part_done(out_dir: Path, index: int, items: Sequence[tuple[str, str]]) -> dict | None:
    """The json of a complete part holding exactly ``items``, else None."""
    path = out_dir / f"{PART.format(index)}.json"
    if not path.is_file() or not (out_dir / f"{PART.format(index)}.tar").is_file():
        return None
    try:
        part = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    same = part.get("keys") == [k for k, _ in items] and part.get("urls") == [u for _, u in items]
    return part if same else None


def _worker(args: tuple) -> dict[str, Any]:
    items, out_dir, index, settings = args
    return _fetch_part(items, out_dir, index, http_get, settings)


def fetch_url_list(
    items: Sequence[tuple[str, str]],
    out_dir: Path,
    *,
    processes: int = 1,
    threads: int = 16,
    part_size: int = 1000,
    timeout: float = 20.0,
    retries: int = 2,
    backoff: float = 1.0,
    fetch: Fetch | None = None,
    name: str = "images",
) -> dict[str, Any]:
    """Fetch every (key, url) of ``items`` into parts under ``out_dir``; return the report.

    ``processes`` x ``threads`` fetches run at once (``processes`` > 1 needs the default
    ``fetch``, ``http_get``). Keys must be unique and tar-safe. The report {"source", "tried",
    "kept", "dead": {reason: n}, "undecodable", "kept_fraction", "fetched_now", "seconds",
    "examples"} is logged and written to ``out_dir/report.json``.
    """
    if processes < 1 or threads < 1 or part_size < 1 or retries < 0:
        raise ValueError("fetch_url_list: processes, threads, part_size >= 1 and retries >= 0")
    if processes > 1 and fetch is not None:
        raise ValueError("fetch_url_list: a custom fetch runs in one process only")
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{name}: the URL list repeats keys")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp-*"):  # what a killed run was writing
        stale.unlink(missing_ok=True)
    settings = FetchSettings(timeout=timeout, retries=retries, backoff=backoff, threads=threads)
    chunks = [items[i : i + part_size] for i in range(0, len(items), part_size)]
    parts: dict[int, dict] = {}
    todo = []
    for index, chunk in enumerate(chunks):
        done = _part_done(out_dir, index, chunk)
        if done is None:
            todo.append(index)
        else:
            parts[index] = done
    log.info("%s: %d URLs in %d parts, %d complete", name, len(items), len(chunks), len(parts))
    start = time.monotonic()
    bar = tqdm(total=sum(len(chunks[i]) for i in todo), desc=f"fetch {name}", unit="url")
    fetched_bytes = 0

    def finished(index: int, part: dict) -> None:
        nonlocal fetched_bytes
        parts[index] = part
        fetched_bytes += (out_dir / f"{PART.format(index)}.tar").stat().st_size
        bar.update(len(chunks[index]))
        bar.set_postfix(parts=len(parts), MB=f"{fetched_bytes / 1e6:.1f}", refresh=False)

    with bar:
        if processes == 1:
            for index in todo:
                finished(
                    index, _fetch_part(chunks[index], out_dir, index, fetch or http_get, settings)
                )
        else:
            jobs = [(chunks[i], out_dir, i, settings) for i in todo]
            with ProcessPoolExecutor(max_workers=processes) as pool:
                for index, part in zip(todo, pool.map(_worker, jobs), strict=True):
                    finished(index, part)
    seconds = time.monotonic() - start
    report = _report(name, [parts[i] for i in range(len(chunks))], seconds)
    report["fetched_now"] = sum(len(chunks[i]) for i in todo)
    write_json(report, out_dir / "report.json")
    log.info("%s: %s", name, {k: v for k, v in report.items() if k != "examples"})
    return report


def _report(name: str, parts: list[dict], seconds: float) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    dead: Counter[str] = Counter()
    examples = []
    for part in parts:
        for url, status in zip(part["urls"], part["status"], strict=True):
            counts[status["status"]] += 1
            if status["status"] == "dead":
                dead[status["reason"]] += 1
            if status["status"] != "kept" and len(examples) < MAX_EXAMPLES:
                examples.append({"url": url, **status})
    tried = sum(counts.values())
    return {
        "source": name,
        "tried": tried,
        "kept": counts["kept"],
        "dead": dict(sorted(dead.items())),
        "undecodable": counts["undecodable"],
        "kept_fraction": round(counts["kept"] / tried, 6) if tried else 0.0,
        "seconds": round(seconds, 3),
        "examples": examples,
    }


@dataclass(frozen=True)
class TarMember:
    """An image inside a fetched part: read lazily, so a whole source never sits in memory."""

    tar: Path
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.tar, "rb") as stream:
            stream.seek(self.offset)
            return stream.read(self.size)


def fetched_images(out_dir: Path) -> dict[str, TarMember]:
    """Every kept image of a fetched URL list: key -> its place in a part tar."""
    out_dir = Path(out_dir)
    found: dict[str, TarMember] = {}
    for tar_path in sorted(out_dir.glob("part-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key = member.name.rsplit(".", 1)[0]
                found[key] = TarMember(tar_path, member.offset_data, member.size)
    return found


def image_bytes(source: Any) -> Any:
    """A sample's image source with fetched images read into bytes (paths and None unchanged)."""
    return source.read() if isinstance(source, TarMember) else source
