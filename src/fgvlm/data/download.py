"""Checksummed downloads that never leave a partial or unverified file at the destination."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from torchvision.datasets.utils import check_integrity, download_url

log = logging.getLogger(__name__)


class ChecksumError(ValueError):
    """A downloaded or cached file does not have the md5 the config pins."""


def download_file(url: str, dest: Path, *, md5: str | None) -> Path:
    """Download ``url`` to ``dest`` (md5-checked when given); reuse ``dest`` if it already verifies.

    The file lands in a temporary folder next to ``dest`` and is renamed into place only after
    its checksum matched, so an interrupted or corrupt download leaves nothing at ``dest``.
    """
    dest = Path(dest)
    if dest.is_file() and (md5 is None or check_integrity(str(dest), md5)):
        log.info("%s: present%s", dest, " and verified" if md5 else "")
        return dest
    # a stale file with the wrong md5 must not survive a failed re-download
    dest.unlink(missing_ok=True)
    if md5 is None:
        log.warning("%s: no md5 pinned in the config; the download is not verified", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmp:
        try:
            download_url(url, tmp, filename=dest.name, md5=md5)
        except RuntimeError as err:
            # torchvision raises "File not found or corrupted." on a checksum mismatch.
            raise ChecksumError(
                f"{dest}: download of {url} failed its md5 check (expected {md5}): {err}"
            ) from err
        got = Path(tmp) / dest.name
        if md5 is not None and not check_integrity(str(got), md5):
            raise ChecksumError(f"{dest}: md5 of the download from {url} is not {md5}")
        shutil.move(str(got), dest)
    return dest
