"""Released VLMs through transformers (``AutoModelForImageTextToText`` + ``AutoProcessor``).

``fetch_hub_vlm`` downloads a hub repository (safetensors only); ``load_hub_model`` loads a
local model folder (a fetched one, or ``fgvlm.models.tiny.materialize_tiny_hub_vlm``'s) into its
model and processor. ``fgvlm.evaluate.hub_runner`` asks them questions.

Pinning (``fgvlm.hub_pins``): a branch or tag is resolved once, at the first fetch, to its
commit, recorded in the folder's ``fgvlm_source.json`` (with each file's sha256) and in the lock
beside the folder, which later fetches ask for; a revision given as a commit sha is used as is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from fgvlm.hub_pins import (
    SOURCE_FILE,
    downloaded_commit,
    file_digests,
    is_commit,
    lock_key,
    pinned_revision,
    record_pins,
)
from fgvlm.io import atomic_path, write_json

# what a model folder needs: configs, weights, tokenizer and processor files, chat templates
HUB_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")
# pickled weights are never downloaded (arbitrary code on load); remote code only on opt-in
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.h5")
REMOTE_CODE_PATTERNS = ("*.py",)
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "*.model", "added_tokens.json")


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
