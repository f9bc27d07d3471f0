"""Causal LMs as Hugging Face model directories: tiny ones trained here, real ones fetched.

Either way the result is a directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load: ``config.json``, ``*.safetensors`` and tokenizer files.

Tiny models (``materialize_tiny_llm``) stand in for the paper's 7B LLMs in the demo. Their
tokenizer is a byte-level BPE trained on the demo corpus; on a small synthetic corpus every
word becomes a single token (short sequences, as a word-level vocabulary) while any text stays
encodable and decodes exactly. It holds the family's own special tokens (Llama: ``<s>``,
``</s>``, ``<unk>`` plus ``<pad>``; Qwen2: ``<|endoftext|>`` as end and padding token, no
beginning token) and every token the chat templates use (``<|im_start|>``, ``<|im_end|>``,
``[INST]``, ``[/INST]``, ``<<SYS>>``, ``<</SYS>>``). The image placeholder is not a token: the
templates replace it by a sentinel id before tokenizing. The model is then pre-trained briefly
on the corpus as plain text, since real LLMs arrive pre-trained and connector-only training
through a random frozen LM learns nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fgvlm.io import atomic_path, write_json
from fgvlm.models.templates import (
    IMAGE_PLACEHOLDER,
    TEMPLATE_NAMES,
    TEMPLATE_TOKENS,
    check_template,
    render_conversation,
)

log = logging.getLogger(__name__)

# what a model repo may contribute: configs, safetensors weights, tokenizer files; never pickles
LLM_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
FAMILY_TOKENS: dict[str, dict[str, str]] = {
    "llama": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
    "qwen2": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}
FAMILIES = tuple(FAMILY_TOKENS)
SUMMARY_FILE = "pretraining.json"
CHATML_JINJA = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _check_family(family: str) -> None:
    if family not in FAMILY_TOKENS:
        raise ValueError(f"unknown LLM family {family!r}; known: {list(FAMILIES)}")


def special_tokens(family: str, templates: tuple[str, ...]) -> list[str]:
    """The tokenizer's special tokens, in id order: the family's, then the templates'."""
    _check_family(family)
    tokens = list(dict.fromkeys(FAMILY_TOKENS[family].values()))
    for template in templates:
        check_template(template)
        tokens += [t for t in TEMPLATE_TOKENS[template] if t not in tokens]
    return tokens


def _scaffold_texts(family: str, templates: tuple[str, ...], specials: list[str]) -> list[str]:
    """The templates' own text (system prompts, role names) between special tokens, so that
    it is tokenized as compactly as the corpus."""
    names = FAMILY_TOKENS[family]
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
    family: str,
    templates: tuple[str, ...] = TEMPLATE_NAMES,
    vocab_size: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` (offline, deterministic).

    Out: a fast tokenizer with the family's special tokens (``FAMILY_TOKENS``) and the
    templates' tokens; Llama-family tokenizers add ``<s>`` when asked for special tokens, as
    Llama's do. With ``"chatml"`` among the templates, Qwen2-family tokenizers get Qwen's chat
    template.
    """
    specials = special_tokens(family, templates)
    texts = corpus_texts(corpus) + _scaffold_texts(family, templates, specials)
    if not texts:
        raise ValueError("train_tokenizer: the corpus has no text")
    names = FAMILY_TOKENS[family]
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
    if family == "qwen2" and "chatml" in templates:
        tokenizer.chat_template = CHATML_JINJA
    return tokenizer


def tiny_llm_config(
    family: str,
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
    _check_family(family)
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
    if family == "llama":
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


def publish_modes(folder: Path) -> None:
    """Give the files in ``folder`` the usual umask-based mode (some writers make them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _build_model(config: PretrainedConfig) -> PreTrainedModel:
    cls = LlamaForCausalLM if isinstance(config, LlamaConfig) else Qwen2ForCausalLM
    return cls(config)


def materialize_tiny_llm(
    out_dir: Path,
    *,
    family: str,
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
    """Train a tokenizer on ``corpus``, build a tiny ``family`` ("llama" | "qwen2") causal LM
    with seeded init, pre-train it on the corpus, and save it as a Hugging Face model dir.

    Out: ``out_dir`` (atomic) with ``config.json``, ``model.safetensors``, tokenizer files and
    ``pretraining.json`` (settings, parameter count, losses); same inputs, seed and thread
    count give the same bytes. Returns a summary: params, vocab size, first and final loss
    (mean of the last 10 steps), seconds.
    """
    start = time.perf_counter()
    tokenizer = train_tokenizer(
        corpus, family=family, templates=tuple(templates), vocab_size=vocab_size
    )
    config = tiny_llm_config(
        family, tokenizer, hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads
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
        "family": family,
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
