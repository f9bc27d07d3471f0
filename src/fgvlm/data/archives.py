"""Image archives (COCO train2017, GQA, TextVQA, Visual Genome, LLaVA-Pretrain): downloaded once,
checked, extracted once, safely.

An archive spec (``train_data.<d>.source.archives.<a>``) is {"url", "md5", "size", ...}; the
archive lands in a download folder (``fgvlm.data.download.download_file``: md5 and size checked
where the config pins them), then is extracted atomically into its own folder. Zip members that
would land outside it (absolute paths, drive letters, '..') are refused before anything is
written; tar archives are extracted with tarfile's "data" filter. A truncated archive fails the
job with a readable error and leaves nothing behind.
"""

from __future__ import annotations

import logging
import re
import tarfile
import urllib.parse
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from fgvlm.data.download import ChecksumError, clean_partials, download_file
from fgvlm.io import atomic_path, write_json

log = logging.getLogger(__name__)

RECORD = ".fgvlm-archive.json"  # what was extracted: url, checks, files, bytes


def _zip_member_unsafe(name: str) -> bool:
    """True for a member that would land outside the extraction folder (zip-slip)."""
    path = PurePosixPath(name.replace("\\", "/"))
    drive = re.match(r"^[A-Za-z]:", name) is not None
    return path.is_absolute() or drive or ".." in path.parts


def _bar(desc: str, total: int) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)


def extract_zip(zip_path: Path, dest: Path) -> Path:
    """Unpack ``zip_path`` into ``dest`` atomically; return ``dest``.

    Every member is checked before anything is written: an absolute path, a drive letter or a
    '..' component (zip-slip, the zip analogue of tarfile's "data" filter) is a ValueError naming
    the member. ``dest`` appears only once every member is extracted (an existing ``dest`` is
    replaced); a truncated archive is a ChecksumError.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if not zip_path.is_file():
        raise FileNotFoundError(f"{zip_path}: zip archive not found")
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as err:
        raise ChecksumError(f"{zip_path}: truncated or not a zip archive ({err})") from err
    with archive:
        members = archive.infolist()
        for member in members:
            if _zip_member_unsafe(member.filename):
                raise ValueError(
                    f"{zip_path}: member {member.filename!r} would be extracted outside {dest}"
                )
        clean_partials(dest)
        total = sum(m.file_size for m in members)
        with atomic_path(dest, is_dir=True) as tmp, _bar(f"unzip {zip_path.name}", total) as bar:
            for n, member in enumerate(members, start=1):
                try:
                    archive.extract(member, tmp)
                except (zipfile.BadZipFile, EOFError, zlib.error) as err:
                    raise ChecksumError(f"{zip_path}: {member.filename}: {err}") from err
                bar.update(member.file_size)
                bar.set_postfix(files=n, refresh=False)
    return dest


def extract_tar(tar_path: Path, dest: Path) -> Path:
    """Unpack a tar archive into ``dest`` atomically with tarfile's "data" filter."""
    tar_path, dest = Path(tar_path), Path(dest)
    clean_partials(dest)
    try:
        with tarfile.open(tar_path) as archive, atomic_path(dest, is_dir=True) as tmp:
            members = archive.getmembers()
            with _bar(f"untar {tar_path.name}", sum(m.size for m in members)) as bar:
                for member in members:
                    archive.extract(member, tmp, filter="data")
                    bar.update(member.size)
    except (tarfile.ReadError, EOFError) as err:
        raise ChecksumError(f"{tar_path}: truncated or not a tar archive ({err})") from err
    return dest


def archive_filename(url: str) -> str:
    name = PurePosixPath(urllib.parse.urlsplit(url).path).name
    if not name:
        raise ValueError(f"{url}: no file name in the URL")
    return name


def fetch_archive(spec: dict[str, Any], out: Path, *, download_dir: Path) -> dict[str, Any]:
    """Download one archive (``spec``: {"url", "md5", "size", "keep_archive"}) into
    ``download_dir`` and extract it into ``out``; return the record written into ``out``."""
    out, download_dir = Path(out), Path(download_dir)
    path = download_file(
        spec["url"],
        download_dir / archive_filename(spec["url"]),
        md5=spec["md5"],
        size=spec["size"],
    )
    try:
        if path.suffix == ".zip" or zipfile.is_zipfile(path):
            extract_zip(path, out)
        else:
            extract_tar(path, out)
    except ChecksumError:
        path.unlink()  # a truncated archive must not be reused by the next run
        raise
    files = [p for p in out.rglob("*") if p.is_file()]
    record = {
        "url": spec["url"],
        "md5": spec["md5"],
        "size": path.stat().st_size,
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
    }
    write_json(record, out / RECORD)
    if not spec["keep_archive"]:
        path.unlink()
    log.info("%s: %d files, %.2f GB extracted", out, record["files"], record["bytes"] / 1e9)
    return record
