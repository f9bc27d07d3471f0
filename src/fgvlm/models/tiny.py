"""The demo's tiny stand-ins for the paper's models, written in the layouts of the real ones.

- Tiny causal LMs (``materialize_tiny_llm``) stand in for the paper's 7B LLMs. Their tokenizer
  is a byte-level BPE trained on the demo corpus (``train_tokenizer``); on a small synthetic
  corpus every word becomes a single token (short sequences, as a word-level vocabulary) while
  any text stays encodable and decodes exactly. It holds the architecture's own special tokens
  (Llama: ``<s>``, ``</s>``, ``<unk>`` plus ``<pad>``; Qwen2: ``<|endoftext|>`` as end and
  padding token, no beginning token) and every token the chat templates use (``<|im_start|>``,
  ``<|im_end|>``, ``[INST]``, ``[/INST]``, ``<<SYS>>``, ``<</SYS>>``). The image placeholder is
  not a token: the templates replace it by a sentinel id before tokenizing. The model is then
  pre-trained briefly on the corpus as plain text (``pretrain_on_text``), since real LLMs
  arrive pre-trained and connector-only training through a random frozen LM learns nothing.
  ``fgvlm.models.llm``'s loaders read the saved folder as they read a fetched one.
- Tiny CLIPs (``materialize_random_clip``, then ``contrastive_pretrain`` on the synthetic
  worlds) in the weights-directory layout that ``fgvlm.models.clip.load_clip`` reads through
  open_clip, as it reads fetched weights.
- Tiny transformers-native LLaVA and Qwen2-VL models (``materialize_tiny_hub_vlm``: model,
  processor and chat template, ``save_pretrained``), so the demo evaluates them through exactly
  the code path a released model takes (``fgvlm.models.hub.load_hub_model``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

from fgvlm.io import atomic_path, read_json, write_json
from fgvlm.models.clip import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_clip,
    preprocess_entry,
    register_model_config,
    save_state_dict,
)
from fgvlm.models.llm import publish_modes
from fgvlm.models.templates import (
    CHATML_JINJA,
    IM_END,
    IM_START,
    IMAGE_PLACEHOLDER,
    LLAVA_CHAT_TEMPLATE,
    QWEN2_VL_CHAT_TEMPLATE,
    TEMPLATE_NAMES,
    TEMPLATE_TOKENS,
    check_template,
    render_conversation,
)

log = logging.getLogger(__name__)


# --- tiny causal LMs ---------------------------------------------------------------------------

ARCH_TOKENS: dict[str, dict[str, str]] = {
    "llama": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
    "qwen2": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}
LLM_ARCHS = tuple(ARCH_TOKENS)
SUMMARY_FILE = "pretraining.json"


def _check_arch(arch: str) -> None:
    if arch not in ARCH_TOKENS:
        raise ValueError(f"unknown LLM architecture {arch!r}; known: {list(LLM_ARCHS)}")


def special_tokens(arch: str, templates: tuple[str, ...]) -> list[str]:
    """The tokenizer's special tokens, in id order: the architecture's, then the templates'."""
    _check_arch(arch)
    tokens = list(dict.fromkeys(ARCH_TOKENS[arch].values()))
    for template in templates:
        check_template(template)
        tokens += [t for t in TEMPLATE_TOKENS[template] if t not in tokens]
    return tokens


def _scaffold_texts(arch: str, templates: tuple[str, ...], specials: list[str]) -> list[str]:
    """The templates' own text (system prompts, role names) between special tokens, so that
    it is tokenized as compactly as the corpus."""
    names = ARCH_TOKENS[arch]
    conversation = [
        {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nquestion"},
        {"from": "gpt", "value": "answer"},
        {"from": "human", "value": "question"},
        {"from": "gpt", "value": "answer"},
    ]
    texts = []
    for template in templates:
        turns = conversation[:2] if template == "plain" else conversation
        texts.append(
            render_conversation(
                template, turns, bos=names.get("bos_token"), eos=names.get("eos_token")
            )
        )
    # the trainer sees plain text: cut it at special tokens and image placeholders
    splitter = re.compile("|".join(re.escape(t) for t in [*specials, IMAGE_PLACEHOLDER]))
    return [chunk for text in texts for chunk in splitter.split(text) if chunk]


def corpus_texts(corpus: list[str]) -> list[str]:
    """Corpus lines as training text: image placeholders removed, blank lines dropped."""
    texts = (line.replace(IMAGE_PLACEHOLDER, "").strip() for line in corpus)
    return [text for text in texts if text]


def train_tokenizer(
    corpus: list[str],
    *,
    arch: str,
    templates: tuple[str, ...] = TEMPLATE_NAMES,
    vocab_size: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` (offline, deterministic).

    Out: a fast tokenizer with the architecture's special tokens (``ARCH_TOKENS``) and the
    templates' tokens; Llama tokenizers add ``<s>`` when asked for special tokens, as
    Llama's do. With ``"chatml"`` among the templates, Qwen2 tokenizers get Qwen's chat
    template.
    """
    specials = special_tokens(arch, templates)
    texts = corpus_texts(corpus) + _scaffold_texts(arch, templates, specials)
    if not texts:
        raise ValueError("train_tokenizer: the corpus has no text")
    names = ARCH_TOKENS[arch]
    backend = Tokenizer(models.BPE(unk_token=names.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if "bos_token" in names:
        bos = names["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, backend.token_to_id(bos))],
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **names)
    if arch == "qwen2" and "chatml" in templates:
        tokenizer.chat_template = CHATML_JINJA
    return tokenizer


def tiny_llm_config(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 96,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 2048,
) -> PretrainedConfig:
    """A small Llama or Qwen2 config matching ``tokenizer`` (vocabulary and special ids).

    Qwen2 ties input and output embeddings (as its small models do), Llama does not.
    """
    _check_arch(arch)
    if hidden_size % heads or heads % kv_heads:
        raise ValueError(
            f"hidden_size {hidden_size} must divide by heads {heads}, heads by kv_heads {kv_heads}"
        )
    # Llama's FFN width: 8/3 of the hidden size, rounded to a multiple of 32
    intermediate = intermediate_size or 32 * max(1, round(hidden_size * 8 / 3 / 32))
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_positions,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    return Qwen2Config(**common, tie_word_embeddings=True)


def _encode_lines(tokenizer: PreTrainedTokenizerFast, texts: list[str], max_tokens: int) -> list:
    """Each line as [bos] + tokens + [eos], cut to ``max_tokens``."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(bos + ids + [tokenizer.eos_token_id])[:max_tokens] for ids in encoded]


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of line indices: seeded epochs, every line once per epoch."""
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n - batch_size + 1, batch_size):  # drop the ragged tail
            yield order[start : start + batch_size]


def _pad(lines: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (padding ignored)."""
    width = max(len(ids) for ids in lines)
    input_ids = torch.full((len(lines), width), pad_id, dtype=torch.long)
    labels = torch.full((len(lines), width), -100, dtype=torch.long)
    mask = torch.zeros((len(lines), width), dtype=torch.long)
    for row, ids in enumerate(lines):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pretrain_on_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    *,
    steps: int,
    seed: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    max_tokens: int = 256,
) -> list[float]:
    """Causal-LM training on text lines (AdamW, 5% warmup then cosine to 10%).

    Seeded batch order; returns the loss of every step.
    """
    lines = _encode_lines(tokenizer, texts, max_tokens)
    if not lines:
        raise ValueError("pretrain_on_text: no text lines")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = _batches(len(lines), min(batch_size, len(lines)), generator)
    losses: list[float] = []
    model.train()
    with tqdm(total=steps, desc="pretrain tiny LLM", unit="step") as bar:
        for step in range(steps):
            batch = _pad([lines[i] for i in next(batches)], pad_id)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
            if step % 50 == 0 or step == steps - 1:
                log.info("tiny LLM step %d/%d: loss %.4f", step + 1, steps, losses[-1])
    model.eval()
    return losses


def _build_model(config: PretrainedConfig) -> PreTrainedModel:
    cls = LlamaForCausalLM if isinstance(config, LlamaConfig) else Qwen2ForCausalLM
    return cls(config)


def materialize_tiny_llm(
    out_dir: Path,
    *,
    arch: str,
    corpus: list[str],
    seed: int,
    hidden_size: int = 96,
    layers: int = 2,
    text_pretrain_steps: int = 300,
    templates: tuple[str, ...] = TEMPLATE_NAMES,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 2048,
    batch_size: int = 32,
    lr: float = 3e-3,
) -> dict[str, Any]:
    """Train a tokenizer on ``corpus``, build a tiny ``arch`` ("llama" | "qwen2") causal LM
    with seeded init, pre-train it on the corpus, and save it as a Hugging Face model dir.

    Out: ``out_dir`` (atomic) with ``config.json``, ``model.safetensors``, tokenizer files and
    ``pretraining.json`` (settings, parameter count, losses); same inputs, seed and thread
    count give the same bytes. Returns a summary: params, vocab size, first and final loss
    (mean of the last 10 steps), seconds.
    """
    start = time.perf_counter()
    tokenizer = train_tokenizer(
        corpus, arch=arch, templates=tuple(templates), vocab_size=vocab_size
    )
    config = tiny_llm_config(
        arch, tokenizer, hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads
    )
    # a private RNG state: materializing must not disturb the caller's random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(config)
        losses = pretrain_on_text(
            model,
            tokenizer,
            corpus_texts(corpus),
            steps=text_pretrain_steps,
            seed=seed,
            batch_size=batch_size,
            lr=lr,
        )
    params = sum(p.numel() for p in model.parameters())
    record = {
        "family": arch,
        "seed": seed,
        "hidden_size": hidden_size,
        "layers": layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "vocab_size": len(tokenizer),
        "params": params,
        "templates": list(templates),
        "corpus_lines": len(corpus_texts(corpus)),
        "steps": text_pretrain_steps,
        "batch_size": batch_size,
        "lr": lr,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "losses_every_10": losses[::10],
    }
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(record, tmp / SUMMARY_FILE)
        publish_modes(tmp)
    summary = {k: v for k, v in record.items() if k != "losses_every_10"}
    summary["seconds"] = round(time.perf_counter() - start, 2)
    log.info("tiny LLM %s: %s", out_dir, summary)
    return summary


# --- tiny CLIPs -------------------------------------------------------------------------------


def _read_model_config(model_cfg_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a plain open_clip model config, or an ``open_clip_config.json`` with
    ``model_cfg``/``preprocess_cfg``; return (model_cfg, preprocess overrides)."""
    if not model_cfg_path.is_file():
        raise FileNotFoundError(f"CLIP model config not found: {model_cfg_path}")
    data = read_json(model_cfg_path)
    if "model_cfg" in data:
        return data["model_cfg"], data.get("preprocess_cfg", {})
    return data, {}


def materialize_random_clip(model_cfg_path: Path, out_dir: Path, seed: int) -> None:
    """Build a randomly initialised CLIP from an open_clip JSON model config and save it.

    In: ``model_cfg_path`` (its file stem becomes the architecture name), ``seed``.
    Out: ``out_dir`` with ``open_clip_model.safetensors`` + ``clip.json``, written atomically;
    the same config and seed give the same bytes.
    """
    model_cfg_path = Path(model_cfg_path)
    arch = model_cfg_path.stem
    model_cfg, preprocess_overrides = _read_model_config(model_cfg_path)
    register_model_config(arch, model_cfg)
    # a private RNG state: materializing must not disturb the caller's random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None, pretrained_text=False)
    preprocess = {**model.visual.preprocess_cfg, **preprocess_overrides}
    entry = {
        "arch": arch,
        "pretrained": None,
        "model_cfg": model_cfg,
        "preprocess": preprocess_entry(preprocess),
        "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
    }
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_state_dict(model.state_dict(), tmp / WEIGHTS_FILE)
        write_json(entry, tmp / CONFIG_FILE)


def contrastive_pretrain(
    weights_dir: Path,
    out_dir: Path,
    pairs: list[tuple[Path, str]],
    *,
    steps: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 1e-3,
) -> dict[str, float]:
    """Train a CLIP on (image file, caption) pairs with the CLIP loss and save it to ``out_dir``.

    The demo's tiny CLIPs are pre-trained this way on the synthetic worlds, as released CLIPs
    arrive pre-trained: mining then finds real hard negatives, and baselines mean something.
    Loads ``weights_dir`` through ``load_clip`` and writes the same layout atomically.
    Deterministic for a seed (single-threaded CPU math aside). Returns first/last loss.
    """
    from open_clip.loss import ClipLoss

    if not pairs:
        raise ValueError("contrastive_pretrain: no (image, caption) pairs")
    clip = load_clip(weights_dir)
    model = clip.model.train()
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    images = [clip.preprocess(Image.open(path).convert("RGB")) for path, _ in pairs]
    texts = clip.tokenizer([text for _, text in pairs])
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in tqdm(range(steps), desc="CLIP pretraining", unit="step"):
            index = torch.randperm(len(pairs), generator=generator)[:batch_size]
            out = model(torch.stack([images[i] for i in index]), texts[index])
            if isinstance(out, dict):
                out = (out["image_features"], out["text_features"], out["logit_scale"])
            loss = loss_fn(*out[:3])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    entry = read_json(weights_dir / CONFIG_FILE)
    entry["pretraining"] = {"pairs": len(pairs), "steps": steps, "seed": seed, "lr": lr}
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_state_dict(model.state_dict(), tmp / WEIGHTS_FILE)
        write_json(entry, tmp / CONFIG_FILE)
    return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-10:]))}


# --- tiny transformers-native VLMs -------------------------------------------------------------


TINY_HUB_ARCHS = ("llava", "qwen2_vl")
TINY_IMAGE_SIZE = 32
TINY_PATCH = 8
CHAT_TOKENS = (IM_START, IM_END)
QWEN2_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _tiny_tokenizer(arch: str, tokenizer_dir: Path) -> Any:
    """The word-level tokenizer with the special tokens that ``arch``'s processor and chat
    template need."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    needed = list(CHAT_TOKENS) + (["<image>"] if arch == "llava" else list(QWEN2_VL_TOKENS))
    tokenizer.add_special_tokens(
        {"additional_special_tokens": needed}, replace_extra_special_tokens=False
    )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": "<|im_end|>"})
    return tokenizer


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of the rotary half-dimension into (time, height, width): [16, 24, 24]
    for head_dim 128, the same proportions for tiny heads."""
    half = head_dim // 2
    height = (half - half // 4) // 2
    return [half - 2 * height, height, height]


def _tiny_text_config(arch: str, text_model_dir: Path | None, tokenizer: Any) -> Any:
    """The language model's config: the given tiny LM's, or a small default."""
    if text_model_dir is not None:
        base = AutoConfig.from_pretrained(text_model_dir)
        if arch == "llava":
            return base
        if base.model_type != "qwen2":
            raise ValueError(
                f"{text_model_dir}: qwen2_vl needs a qwen2-family language model, "
                f"got {base.model_type!r}"
            )
        head_dim = base.hidden_size // base.num_attention_heads
        fields = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_act",
            "max_position_embeddings",
            "rms_norm_eps",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        )
        rope = dict(base.rope_parameters or {})
        return Qwen2VLTextConfig(
            **{f: getattr(base, f) for f in fields},
            rope_parameters={
                "rope_type": "default",
                "rope_theta": rope.get("rope_theta", 10000.0),
                "mrope_section": _mrope_section(head_dim),
            },
        )
    common = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
    }
    if arch == "llava":
        return LlamaConfig(**common)
    return Qwen2VLTextConfig(
        **common,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )


def _tiny_model_and_processor(
    arch: str, tokenizer: Any, text_config: Any
) -> tuple[PreTrainedModel, Any]:
    """A randomly initialised tiny VLM of ``arch`` and its processor (tiny vision tower:
    32 px images, 8 px patches)."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    if arch == "llava":
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TINY_IMAGE_SIZE,
            patch_size=TINY_PATCH,
            projection_dim=32,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text_config,
            image_token_index=ids["<image>"],
            image_seq_length=(TINY_IMAGE_SIZE // TINY_PATCH) ** 2,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": TINY_IMAGE_SIZE},
            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        )
        # CLIP adds a CLS token that the "default" feature strategy drops again
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=TINY_PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
        return model, processor
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": text_config.hidden_size,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": TINY_PATCH,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config)
    # sizes snap to multiples of patch x merge = 16 px; the default minimum (56 x 56 px) would
    # upscale 32 px images, so the pixel range is set around them (32 px -> 2 x 2 tokens)
    pixels = {
        "patch_size": TINY_PATCH,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "min_pixels": TINY_IMAGE_SIZE**2,
        "max_pixels": (2 * TINY_IMAGE_SIZE) ** 2,
    }
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    return model, processor


def _load_language_model(model: PreTrainedModel, text_model_dir: Path) -> None:
    """Copy a tiny causal LM's weights into the VLM's language model and LM head."""
    lm = AutoModelForCausalLM.from_pretrained(text_model_dir, use_safetensors=True, dtype="float32")
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(lm.lm_head.state_dict(), strict=True)


def build_tiny_hub_vlm(
    arch: str, *, tokenizer_dir: Path, seed: int, text_model_dir: Path | None = None
) -> tuple[PreTrainedModel, Any]:
    """The model and processor ``materialize_tiny_hub_vlm`` saves (in memory, eval mode)."""
    if arch not in TINY_HUB_ARCHS:
        raise ValueError(
            f"unknown tiny hub VLM architecture {arch!r}; choose one of {TINY_HUB_ARCHS}"
        )
    tokenizer = _tiny_tokenizer(arch, Path(tokenizer_dir))
    text_config = _tiny_text_config(
        arch, Path(text_model_dir) if text_model_dir else None, tokenizer
    )
    torch.manual_seed(seed)
    model, processor = _tiny_model_and_processor(arch, tokenizer, text_config)
    if text_model_dir is not None:
        _load_language_model(model, Path(text_model_dir))
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # rows for the added special tokens, drawn under the same seed
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    eos = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=sorted({i for i in eos if i is not None}),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model.eval(), processor


def materialize_tiny_hub_vlm(
    arch: str,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike,
    seed: int,
    text_model_dir: str | os.PathLike | None = None,
) -> None:
    """Save a tiny transformers-native VLM that ``fgvlm.models.hub.load_hub_model(out_dir)``
    loads like a released one.

    ``arch``: "llava" (LlavaForConditionalGeneration: CLIP vision tower, 32 px images, 8 px
    patches -> 16 image tokens) or "qwen2_vl" (Qwen2VLForConditionalGeneration: 32 px -> 4
    merged image tokens). ``tokenizer_dir``: a word-level tokenizer (``materialize_tiny_llm``'s);
    the special tokens the processor and chat template need are added. ``text_model_dir``: a
    tiny causal LM whose weights initialise the language model (qwen2 family for qwen2_vl);
    else a random 2-layer one. Same inputs and seed -> byte-identical files.
    """
    model, processor = build_tiny_hub_vlm(
        arch,
        tokenizer_dir=Path(tokenizer_dir),
        seed=seed,
        text_model_dir=Path(text_model_dir) if text_model_dir is not None else None,
    )
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
