"""Causal LMs as Hugging Face model directories, fetched from the hub.

The result is a directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load: ``config.json``, ``*.safetensors`` and tokenizer files.
The demo's tiny LMs (``fgvlm.models.tiny.materialize_tiny_llm``) write the same layout.
"""

from __future__ import annotations

import os
from pathlib import Path

from fgvlm.hub_pins import SOURCE_FILE, file_digests, lock_key, record_pins
from fgvlm.io import atomic_path, write_json
from fgvlm.models.hub import pinned_snapshot

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
    no ``config.json``. A branch ``revision`` is pinned to its commit at the first fetch
    (``fgvlm.models.hub`` docstring); ``fgvlm_source.json`` records the commit and file hashes.
    """
    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        sha = pinned_snapshot(repo, revision, tmp, out_dir, allow_patterns=LLM_FILE_PATTERNS)
        if not any(tmp.glob("*.safetensors")):
            raise FileNotFoundError(
                f"hub repo {repo!r} at {revision!r} has no *.safetensors weights "
                f"(pickled weights are never loaded)"
            )
        if not (tmp / "config.json").is_file():
            raise FileNotFoundError(f"hub repo {repo!r} at {revision!r} has no config.json")
        source = {"repo": repo, "revision": revision, "sha": sha, "files": file_digests(tmp)}
        write_json(source, tmp / SOURCE_FILE)
    record_pins(out_dir, {lock_key(repo, revision): sha})
