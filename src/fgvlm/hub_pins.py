"""Hub revisions pinned to commits, for models (``fgvlm.models.hub``) and data (``fgvlm.data``).

A branch or tag (``main``) is resolved once, at the first fetch, to the commit the download came
from. The commit goes into a lock file beside the fetched folder (``<folder>.lock.json``), which
outlives a refetch: a later fetch of the same repo and revision asks for the locked commit, not
the branch. A revision given as a commit sha is used as is. Each fetched folder also records its
source, commit and files' sha256 in ``fgvlm_source.json`` (read by ``fgvlm.provenance``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from fgvlm.io import file_digest, read_json, write_json

SOURCE_FILE = "fgvlm_source.json"
LOCK_SUFFIX = ".lock.json"
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_commit(revision: str | None) -> bool:
    """Whether ``revision`` is a full commit sha (used as is, never resolved)."""
    return bool(revision) and _COMMIT.fullmatch(str(revision)) is not None


def lock_path(out_dir: str | os.PathLike) -> Path:
    """The lock file of a fetched folder: ``<folder>.lock.json`` beside it."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + LOCK_SUFFIX)


def lock_key(repo: str, revision: str | None) -> str:
    return f"{repo}@{revision or 'main'}"


def pinned_revision(repo: str, revision: str | None, out_dir: str | os.PathLike) -> str:
    """The revision to ask the hub for: a commit as is, else the commit locked beside
    ``out_dir`` for (repo, revision), else ``revision`` itself (first fetch)."""
    revision = revision or "main"
    if is_commit(revision):
        return revision
    lock = lock_path(out_dir)
    locked = read_json(lock).get(lock_key(repo, revision)) if lock.is_file() else None
    return locked or revision


def record_pins(out_dir: str | os.PathLike, pins: dict[str, str | None]) -> None:
    """Add {"repo@revision": commit} entries to the lock beside ``out_dir`` (unknown commits
    are skipped)."""
    lock = lock_path(out_dir)
    entries = read_json(lock) if lock.is_file() else {}
    entries.update({key: sha for key, sha in pins.items() if sha})
    write_json(entries, lock)


def downloaded_commit(local_dir: Path, files: Iterable[str] | None = None) -> str | None:
    """The commit a download into ``local_dir`` (``snapshot_download`` / ``hf_hub_download``
    with ``local_dir``) came from, read from huggingface_hub's per-file download metadata (first
    line: the commit hash); only ``files`` (repo paths) when given; None when none is recorded."""
    download = Path(local_dir) / ".cache" / "huggingface" / "download"
    if files is None:
        metas = list(download.rglob("*.metadata"))
    else:
        metas = [download / f"{name}.metadata" for name in files]
    commits = set()
    for meta in metas:
        first = meta.read_text().split("\n", 1)[0].strip() if meta.is_file() else ""
        if is_commit(first):
            commits.add(first)
    if len(commits) > 1:
        raise ValueError(f"{local_dir}: files from several commits {sorted(commits)}")
    return commits.pop() if commits else None


def file_digests(folder: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative posix path -> hex), ``skip`` names
    excluded."""
    return {
        path.relative_to(folder).as_posix(): file_digest(path)
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file() and path.name not in skip
    }
