"""Checked downloads that never leave a partial or unverified file at the destination.

One streaming GET (``http``, ``https`` or ``file`` URLs, the last for mirrors on a cluster's
shared disk) into a hidden ``.<name>.part`` sibling, with a tqdm bar (bytes, rate, ETA), then
the size and md5 checks, then one rename. A partial left by a killed run is removed by the next.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

SCHEMES = ("http", "https", "file")
CHUNK = 1 << 20
USER_AGENT = "fgvlm-data/0.1 (research dataset download)"


class ChecksumError(ValueError):
    """A downloaded or cached file does not have the md5 or size the config pins."""


class DownloadError(OSError):
    """A URL could not be fetched (unsupported scheme, HTTP error, unreachable host)."""


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: Path, *, md5: str | None, size: int | None) -> str | None:
    """None when ``path`` has ``size`` bytes and the ``md5`` (each when given), else why not."""
    got = path.stat().st_size
    if size is not None and got != size:
        return f"size check ({got} bytes, expected {size})"
    if md5 is not None and (digest := md5sum(path)) != md5:
        return f"md5 check ({digest}, expected {md5})"
    return None


def partial_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.part")


def clean_partials(dest: Path) -> list[Path]:
    """Remove what a killed download of ``dest`` left: its ``.part`` file and hidden temp folders."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    stale = [p for p in dest.parent.glob(f".{dest.name}.*") if p.name != dest.name]
    for path in stale:
        log.info("%s: removing a partial download left by an earlier run", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def open_url(url: str, *, timeout: float):
    """A response for ``url``; only http(s) and file URLs, with a readable error otherwise."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise DownloadError(f"{url}: unsupported URL scheme {scheme!r} (supported: {SCHEMES})")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise DownloadError(f"{url}: {err.reason}") from err


def download_file(
    url: str, dest: Path, *, md5: str | None, size: int | None = None, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dest``, checked against ``md5`` and ``size`` when given; a ``dest``
    that already passes the checks is reused. Nothing unverified is ever left at ``dest``."""
    dest = Path(dest)
    if dest.is_file():
        why = check_file(dest, md5=md5, size=size)
        if why is None:
            log.info("%s: present%s", dest, " and verified" if md5 or size else "")
            return dest
        log.warning("%s: failed its %s; downloading again", dest, why)
        dest.unlink()
    clean_partials(dest)
    if md5 is None:
        log.warning("%s: no md5 pinned; %s", dest, "size checked" if size else "not checked")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(dest)
    try:
        with open_url(url, timeout=timeout) as response, open(part, "wb") as out:
            total = response.headers.get("Content-Length")
            bar = tqdm(
                total=int(total) if total else size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"download {dest.name}",
            )
            with bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        why = check_file(part, md5=md5, size=size)
        if why is not None:
            raise ChecksumError(f"{dest}: download of {url} failed its {why}")
        part.replace(dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return dest
