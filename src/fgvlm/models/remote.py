"""Released VLMs that ship their own modelling code (``trust_remote_code``): loading.

InternVL2, Phi-3/3.5-vision, Molmo and CogVLM-chat do not load through
``AutoModelForImageTextToText``; ``load_remote_model`` loads each family's model with the
tokenizer or processor its API needs, as VLMEvalKit (github.com/open-compass/VLMEvalKit,
``vlmeval/vlm/``) does. ``fgvlm.evaluate.remote_runners`` asks them questions.

Loading runs code from the model folder, so ``load_remote_model`` refuses unless the caller
opts in (the config's ``trust_remote_code`` for that model); weights are safetensors only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

from fgvlm.models.hub import torch_dtype

FAMILIES = ("internvl2", "phi3_vision", "molmo", "cogvlm")
COGVLM_TOKENIZER_DIR = "tokenizer"  # Vicuna's tokenizer: cogvlm-chat-hf ships none of its own


def _model_kwargs(device: str, dtype: str | torch.dtype | None) -> dict[str, Any]:
    return {
        "trust_remote_code": True,
        "use_safetensors": True,  # pickled weights would run arbitrary code on load
        "dtype": torch_dtype(dtype),
        "device_map": device,
    }


def load_remote_model(
    local_dir: str | os.PathLike,
    family: str | None,
    *,
    trust_remote_code: bool = False,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    processor_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer or processor) of a model folder whose code ships with it.

    In: the folder (``fetch_hub_vlm(..., trust_remote_code=True)`` output: config.json with an
    ``auto_map``, the *.py files, safetensors weights), one of ``FAMILIES``,
    ``trust_remote_code`` (must be True: the config opts this model in), the device and a dtype
    name (None: the checkpoint's). ``processor_kwargs`` go to ``AutoProcessor.from_pretrained``
    (e.g. Phi-3.5's ``num_crops``). Out: InternVL2 and CogVLM with their tokenizer (CogVLM reads
    Vicuna's from ``<folder>/tokenizer`` when present), Phi-3-vision and Molmo with their
    processor.
    """
    local_dir = Path(local_dir)
    if family not in FAMILIES:
        raise ValueError(
            f"{local_dir}: remote-code model family {family!r} is not one of {', '.join(FAMILIES)}"
        )
    if not trust_remote_code:
        raise ValueError(
            f"{local_dir}: the {family} model runs its own Python code; set "
            "trust_remote_code: true for it in the config to load it"
        )
    if not (local_dir / "config.json").is_file():
        raise FileNotFoundError(f"{local_dir}: no config.json (not a transformers model folder)")
    if not any(local_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{local_dir}: no *.safetensors weights; pickles are not loaded")
    kwargs = _model_kwargs(device, dtype)
    if family == "internvl2":
        model = AutoModel.from_pretrained(local_dir, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(local_dir, trust_remote_code=True, use_fast=False)
        return model, tokenizer
    if family == "cogvlm":
        model = AutoModelForCausalLM.from_pretrained(local_dir, **kwargs)
        tokenizer_dir = local_dir / COGVLM_TOKENIZER_DIR
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_dir if tokenizer_dir.is_dir() else local_dir
        )
        return model, tokenizer
    if family == "phi3_vision" and importlib.util.find_spec("flash_attn") is None:
        # Phi-3.5-vision's config asks for flash attention; its code also has an eager path
        kwargs["attn_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(local_dir, **kwargs)
    processor = AutoProcessor.from_pretrained(
        local_dir, trust_remote_code=True, **(processor_kwargs or {})
    )
    return model, processor
