"""Causal LMs as Hugging Face model directories, fetched from the hub.

The result is a directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load: ``config.json``, ``*.safetensors`` and tokenizer files.
The demo's tiny LMs (``fgvlm.models.tiny.materialize_tiny_llm``) write the same layout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from huggingface_hub import snapshot_download

from fgvlm.io import atomic_path

# what a model repo may contribute: configs, safetensors weights, tokenizer files; never pickles
LLM_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def publish_modes(folder: Path) -> None:
    """Give the files in ``folder`` the usual umask-based mode (some writers make them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def fetch_llm(repo: str, revision: str, out_dir: Path) -> None:
    """Download a causal LM from the Hugging Face hub into ``out_dir`` (atomic).

    Only configs, safetensors weights and tokenizer files (``LLM_FILE_PATTERNS``); raises
    FileNotFoundError when the repo has no safetensors weights (pickles are never loaded) or
    no ``config.json``. Pin ``revision`` to a commit for reproducibility.
    """
    with atomic_path(out_dir, is_dir=True) as tmp:
        snapshot_download(
            repo_id=repo, revision=revision, local_dir=tmp, allow_patterns=LLM_FILE_PATTERNS
        )
        # snapshot_download's bookkeeping folder is not part of the model
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp / ".cache")
        if not any(tmp.glob("*.safetensors")):
            raise FileNotFoundError(
                f"hub repo {repo!r} at {revision!r} has no *.safetensors weights "
                f"(pickled weights are never loaded)"
            )
        if not (tmp / "config.json").is_file():
            raise FileNotFoundError(f"hub repo {repo!r} at {revision!r} has no config.json")
