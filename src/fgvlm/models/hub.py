"""Released VLMs through transformers (``AutoModelForImageTextToText`` + ``AutoProcessor``).

``fetch_hub_vlm`` downloads a hub repository (safetensors only); ``load_hub_model`` loads a
local model folder (a fetched one, or ``fgvlm.models.tiny.materialize_tiny_hub_vlm``'s) into its
model and processor. ``fgvlm.evaluate.hub_runner`` asks them questions.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from fgvlm.io import atomic_path, write_json

# what a model folder needs: configs, weights, tokenizer and processor files, chat templates
HUB_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")
# pickled weights are never downloaded (arbitrary code on load); remote code only on opt-in
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.h5")
REMOTE_CODE_PATTERNS = ("*.py",)
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "*.model", "added_tokens.json")
SOURCE_FILE = "fgvlm_source.json"


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
) -> tuple[PreTrainedModel, Any]:
    """The model (``AutoModelForImageTextToText``) and processor of a local model folder.

    Weights must be safetensors. ``trust_remote_code`` runs the folder's own Python code: only
    set it for models the config opts in. ``dtype``: e.g. "bfloat16"; None keeps the
    checkpoint's dtype.
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
    processor = AutoProcessor.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
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
    uses Vicuna's). ``out_dir/fgvlm_source.json`` records the sources.
    """
    patterns = list(HUB_PATTERNS) + (list(REMOTE_CODE_PATTERNS) if trust_remote_code else [])
    with atomic_path(out_dir, is_dir=True) as tmp:
        snapshot_download(
            repo_id=repo,
            revision=revision,
            local_dir=tmp,
            allow_patterns=patterns,
            ignore_patterns=list(PICKLE_PATTERNS),
        )
        if tokenizer:
            snapshot_download(
                repo_id=tokenizer["repo"],
                revision=tokenizer.get("revision", "main"),
                local_dir=tmp / "tokenizer",
                allow_patterns=list(TOKENIZER_PATTERNS),
                ignore_patterns=list(PICKLE_PATTERNS),
            )
            shutil.rmtree(tmp / "tokenizer" / ".cache", ignore_errors=True)
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
        if not any(tmp.rglob("*.safetensors")):
            raise FileNotFoundError(
                f"hub repo {repo!r} ({revision=}) has no *.safetensors weights; "
                "pickled weights are not loaded"
            )
        write_json(
            {
                "repo": repo,
                "revision": revision,
                "trust_remote_code": trust_remote_code,
                **({"tokenizer": tokenizer} if tokenizer else {}),
            },
            tmp / SOURCE_FILE,
        )
