"""Atomic file output: a killed job never leaves a file that looks complete.

Every writer here writes to a temporary sibling and renames it into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        # mkdtemp makes 0700 folders; published outputs get the usual umask-based mode
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
        if is_dir and target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(
    frame: pl.DataFrame, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a Parquet file atomically (no statistics timestamps: same frame, same bytes).

    ``metadata``: optional key-value pairs stored in the file footer (e.g. the mining seed).
    """
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, compression="zstd", statistics=True, metadata=metadata)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks (an image archive can be tens of GB)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:  # hashlib.file_digest needs Python 3.11; we support 3.10
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
