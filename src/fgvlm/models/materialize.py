"""Every model the DAG needs, by its config ``source``: released weights are fetched (safetensors
only), the demo's tiny stand-ins are built locally. Either way the folder written is loaded later
through the same real loading code (``from_pretrained(dir)``, open_clip ``pretrained=<file>``)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from fgvlm.models import clip, hub, llm, tiny

log = logging.getLogger(__name__)


def materialize_clip(source: dict, out_dir: Path, *, world_dirs: list[Path]) -> None:
    """Released CLIP weights (``open_clip``), or a tiny CLIP (``random_init``) optionally
    pre-trained contrastively on the drawn worlds' train images."""
    if source["type"] == "open_clip":
        clip.fetch_pretrained_clip(
            source["arch"], source["pretrained"], out_dir, revision=source.get("revision")
        )
        return
    from fgvlm.data.synthetic import caption_pairs

    model_config = Path(source["model_config"])
    if "pretrain" not in source:
        tiny.materialize_random_clip(model_config, out_dir, source["seed"])
        return
    pretrain = source["pretrain"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        init = Path(tmp) / "init"
        tiny.materialize_random_clip(model_config, init, source["seed"])
        summary = tiny.contrastive_pretrain(
            init,
            out_dir,
            caption_pairs(world_dirs),
            steps=pretrain["steps"],
            seed=source["seed"],
            lr=pretrain["lr"],
        )
    log.info("CLIP pretraining %s: %s", out_dir, summary)


def materialize_llm(source: dict, out_dir: Path, *, world_dirs: list[Path]) -> None:
    """A released LLM (``hub``), or a tiny one (``tiny``) pre-trained on the worlds' text."""
    if source["type"] == "hub":
        llm.fetch_llm(source["repo"], source["revision"], out_dir)
        return
    from fgvlm.data.synthetic import text_corpus

    summary = tiny.materialize_tiny_llm(
        out_dir,
        arch=source["arch"],
        corpus=text_corpus(world_dirs),
        seed=source["seed"],
        hidden_size=source["hidden_size"],
        layers=source["layers"],
        text_pretrain_steps=source["text_pretrain_steps"],
    )
    log.info("tiny LLM %s: %s", out_dir, summary)


def materialize_base_vlm(source: dict, out_dir: Path, *, text_model_dir: Path | None) -> None:
    """A base VLM finetuned whole (Qwen2-VL base, ``hub``), or the demo's tiny one."""
    if source["type"] == "hub":
        hub.fetch_hub_vlm(source["repo"], source["revision"], out_dir)
        return
    tiny.materialize_tiny_hub_vlm(
        "qwen2_vl",
        out_dir,
        tokenizer_dir=text_model_dir,
        seed=source["seed"],
        text_model_dir=text_model_dir,
    )


def materialize_hub_vlm(vlm: dict, out_dir: Path, *, text_model_dir: Path | None) -> None:
    """A released VLM (``repo``; remote code only where ``trust_remote_code`` opts in), or a
    tiny transformers-native stand-in (``tiny``)."""
    if "tiny" in vlm:
        tiny.materialize_tiny_hub_vlm(
            vlm["tiny"]["arch"],
            out_dir,
            tokenizer_dir=text_model_dir,
            seed=vlm["tiny"]["seed"],
            text_model_dir=text_model_dir,
        )
        return
    hub.fetch_hub_vlm(
        vlm["repo"],
        vlm["revision"],
        out_dir,
        trust_remote_code=vlm["trust_remote_code"],
        tokenizer=vlm.get("tokenizer"),
    )
