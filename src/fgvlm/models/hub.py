"""Released VLMs through transformers (``AutoModelForImageTextToText`` + ``AutoProcessor``).

``fetch_hub_vlm`` downloads a hub repository (safetensors only); ``load_hub_model`` loads a
local model folder (a fetched one, or ``fgvlm.models.tiny.materialize_tiny_hub_vlm``'s) into its
model and processor. ``fgvlm.evaluate.hub_runner`` asks them questions.

Pinning: a branch or tag (``main``) is resolved once, at the first fetch, to the commit the
download came from. The commit goes into the folder's ``fgvlm_source.json`` (with each file's
sha256) and into a lock file beside the folder (``<folder>.lock.json``), which outlives a
refetch: a later fetch of the same repo and revision asks for the locked commit, not the branch.
A revision given as a commit sha is used as is.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from fgvlm.io import atomic_path, read_json, write_json

# what a model folder needs: configs, weights, tokenizer and processor files, chat templates
HUB_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")
# pickled weights are never downloaded (arbitrary code on load); remote code only on opt-in
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.h5")
REMOTE_CODE_PATTERNS = ("*.py",)
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "*.model", "added_tokens.json")
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


def downloaded_commit(local_dir: Path) -> str | None:
    """The commit a ``snapshot_download(local_dir=...)`` came from, read from huggingface_hub's
    per-file download metadata (first line: the commit hash); None when it holds none."""
    commits = set()
    for meta in (Path(local_dir) / ".cache" / "huggingface" / "download").rglob("*.metadata"):
        first = meta.read_text().split("\n", 1)[0].strip()
        if is_commit(first):
            commits.add(first)
    if len(commits) > 1:
        raise ValueError(f"{local_dir}: files from several commits {sorted(commits)}")
    return commits.pop() if commits else None


def file_digests(folder: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative posix path -> hex), ``skip`` names
    excluded."""
    digests = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.name not in skip:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            digests[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return digests


def pinned_snapshot(
    repo: str, revision: str | None, local_dir: Path, out_dir: Path, **kwargs: Any
) -> str | None:
    """``snapshot_download`` of ``repo`` at its pinned revision (``pinned_revision``) into
    ``local_dir``; returns the commit it came from (None when unknown), the bookkeeping
    folder removed."""
    asked = pinned_revision(repo, revision, out_dir)
    snapshot_download(repo_id=repo, revision=asked, local_dir=local_dir, **kwargs)
    sha = asked if is_commit(asked) else downloaded_commit(local_dir)
    shutil.rmtree(local_dir / ".cache", ignore_errors=True)  # huggingface_hub's metadata
    return sha


def torch_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    """A torch dtype from its name; None means the checkpoint's own dtype ("auto")."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return value


def load_hub_model(
    local_dir: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    processor_kwargs: dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, Any]:
    """The model (``AutoModelForImageTextToText``) and processor of a local model folder.

    Weights must be safetensors. ``trust_remote_code`` runs the folder's own Python code: only
    set it for models the config opts in. ``dtype``: e.g. "bfloat16"; None keeps the
    checkpoint's dtype. ``processor_kwargs`` go to ``AutoProcessor.from_pretrained``.
    """
    local_dir = Path(local_dir)
    if not (local_dir / "config.json").is_file():
        raise FileNotFoundError(f"{local_dir}: no config.json (not a transformers model folder)")
    model = AutoModelForImageTextToText.from_pretrained(
        local_dir,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        dtype=torch_dtype(dtype),
        device_map=device,
    )
    processor = AutoProcessor.from_pretrained(
        local_dir, trust_remote_code=trust_remote_code, **(processor_kwargs or {})
    )
    return model, processor


def fetch_hub_vlm(
    repo: str,
    revision: str,
    out_dir: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    tokenizer: dict[str, str] | None = None,
) -> None:
    """Download hub repository ``repo`` at ``revision`` into ``out_dir`` (atomically).

    Only configs, safetensors weights, tokenizer/processor files and chat templates are fetched,
    plus the repository's Python files when ``trust_remote_code``; never pickled weights. A repo
    without safetensors weights is an error. ``tokenizer`` ({"repo", "revision"}): a separate
    repository whose tokenizer files go to ``out_dir/tokenizer/`` (CogVLM-chat ships none and
    uses Vicuna's). ``out_dir/fgvlm_source.json`` records the sources, the commits and each
    file's sha256; revisions are pinned as the module docstring says.
    """
    out_dir = Path(out_dir)
    patterns = list(HUB_PATTERNS) + (list(REMOTE_CODE_PATTERNS) if trust_remote_code else [])
    pins: dict[str, str | None] = {}
    with atomic_path(out_dir, is_dir=True) as tmp:
        pins[lock_key(repo, revision)] = sha = pinned_snapshot(
            repo,
            revision,
            tmp,
            out_dir,
            allow_patterns=patterns,
            ignore_patterns=list(PICKLE_PATTERNS),
        )
        tokenizer_sha = None
        if tokenizer:
            tokenizer_revision = tokenizer.get("revision", "main")
            tokenizer_sha = pinned_snapshot(
                tokenizer["repo"],
                tokenizer_revision,
                tmp / "tokenizer",
                out_dir,
                allow_patterns=list(TOKENIZER_PATTERNS),
                ignore_patterns=list(PICKLE_PATTERNS),
            )
            pins[lock_key(tokenizer["repo"], tokenizer_revision)] = tokenizer_sha
        if not any(tmp.rglob("*.safetensors")):
            raise FileNotFoundError(
                f"hub repo {repo!r} ({revision=}) has no *.safetensors weights; "
                "pickled weights are not loaded"
            )
        write_json(
            {
                "repo": repo,
                "revision": revision,
                "sha": sha,
                "trust_remote_code": trust_remote_code,
                **({"tokenizer": {**tokenizer, "sha": tokenizer_sha}} if tokenizer else {}),
                "files": file_digests(tmp),
            },
            tmp / SOURCE_FILE,
        )
    record_pins(out_dir, pins)
