"""GPU benchmark: training tokens/s and MFU, batched vs batch-1 evaluation, 7B-like layer shapes.

    python bench/gpu_bench.py [--layers 4] [--out result.json]      (needs a CUDA GPU)
    python bench/gpu_bench.py --dry-run-cpu                         (tiny shapes, CPU, no GPU)

One prepared run, three parts; random weights, no network, nothing but this repository.

(a) Training. A ``LlavaVLM``: a frozen open_clip ViT-L/14-336 tower (24 layers, 576 patch
    tokens, random init, ``materialize_random_clip``), the ``mlp2x_gelu`` connector, and a
    Llama with Vicuna-7B's layer shapes (hidden 4096, 32 heads, FFN 11008, vocabulary 32000)
    but only ``--layers`` decoder layers. Connector + LLM train through ``fgvlm.training.loop.train``
    (AdamW, accelerate), on sequences of 576 image tokens + ``--text-tokens`` text tokens,
    in every combination of precision (``amp``: fp32 weights with bf16 autocast, as
    ``run_training`` trains on GPU; ``bf16``: bf16 weights) and gradient checkpointing
    (off/on). Reported: tokens/s (LM positions, image tokens included), samples/s, peak
    memory, and MFU = 6 x trainable matmul params x tokens/s / peak bf16 FLOP/s (params:
    connector + decoder layers + LM head, not the embedding lookup; the frozen tower's forward
    and attention score FLOPs are left out, so MFU is a slight underestimate).
(a2) Length grouping. Micro-batches drawn from a synthetic length distribution shaped like
    llava_v1_5_mix665k's (``mix665k_like_lengths``: ~6% text-only conversations, long-tailed
    text, capped at ``max_length`` 2048 LM positions), in random order against grouped by
    ``fgvlm.data.shards``' own length grouping (windows of ``--group-batches`` batches): per
    order, the padding fraction of LM positions, s/step, real (unpadded) LM positions/s and MFU
    on them, trained through ``fgvlm.training.loop.train`` as in (a).
(b) Evaluation. A transformers ``LlavaForConditionalGeneration`` from config (the same
    tower and LM shapes, random init, bf16) behind ``HubVLM``: ``score(..., mode="generate")``
    with batch ``--eval-batch`` (left padding) against batch 1 (VLMEvalKit's way):
    questions/s of each, their ratio, and the agreement of answers and raw outputs.

(c) Trained-row evaluation. ``LlavaRunner`` on a ``LlavaVLM`` of (a)'s shapes (random
    weights), in float32 (TF32 allowed, as ``load_runner`` sets on CUDA) and then bfloat16
    (``evaluation.dtype: auto`` on GPU): batch ``--eval-batch`` vs 1 (speed, answers),
    ``option_likelihood`` with the shared prompt pass vs one full sequence per option (speed,
    largest score difference), length-sorted vs item-order batches on prompts half of which
    carry a hint (speed, padding fraction, differing outputs by qid), and the agreement of fp32
    and bf16 answers in both modes.

Peak bf16 FLOP/s come from ``PEAK_BF16_TFLOPS`` by device name (dense, without sparsity;
vendor data sheets), or ``--peak-tflops``. Prints JSON (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from _assets import TINY_CLIP_CONFIG, machine, mcq_options, world_test_images
from PIL import Image

from fgvlm.data.synthetic import generate_world, text_corpus
from fgvlm.evaluate.hub_runner import HubVLM
from fgvlm.evaluate.prompts import mcq_prompt
from fgvlm.evaluate.runners import LlavaRunner
from fgvlm.evaluate.scoring import agreement, score
from fgvlm.mcq import FINE_GRAINED_QUESTION, MCQItem
from fgvlm.models.templates import IGNORE_INDEX, IMAGE_TOKEN_ID, LLAVA_CHAT_TEMPLATE
from fgvlm.models.tiny import CHAT_TOKENS, materialize_random_clip, train_tokenizer
from fgvlm.models.vlm import Connector, LlavaVLM, VisionTower
from fgvlm.training.loop import train
from fgvlm.training.recipe import Recipe, make_plan

# dense bf16 tensor-core peak, TFLOP/s (NVIDIA data sheets; SXM unless the name says PCIe).
# Checked in order: the first fragment found in torch.cuda.get_device_name() wins.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A6000", 155.0),
    ("L4", 121.0),
    ("A10", 125.0),
)

# open_clip ViT-L/14-336's vision tower; a one-layer text tower (never used by the VLM)
VIT_L_336 = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
# Vicuna-7B / Llama-2-7B layer shapes
LLAMA_7B = {
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
}
TINY_LLM = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 32000,
}


class _Measured(Exception):
    """Raised from ``on_step`` after the last measured step: skips the final checkpoint save."""


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """Peak dense bf16 TFLOP/s of the device (``override`` wins; None when unknown)."""
    if override:
        return override
    for fragment, value in PEAK_BF16_TFLOPS:
        if fragment in device_name:
            return value
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clip_dir_for(workdir: Path, dry_run: bool) -> Path:
    """A random CLIP weights dir: ViT-L/14-336 shapes, or the tiny test tower."""
    out = workdir / "clip"
    if dry_run:
        config = TINY_CLIP_CONFIG
    else:
        config = workdir / "bench-vit-l-14-336.json"
        config.write_text(json.dumps(VIT_L_336))
    materialize_random_clip(config, out, seed=0)
    return out


def llama_config(shapes: dict, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        **shapes,
        num_hidden_layers=layers,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def build_train_vlm(
    clip_dir: Path, shapes: dict, layers: int, device: torch.device, dtype: torch.dtype
) -> LlavaVLM:
    """LlavaVLM: the frozen tower, a new connector and a random Llama, built on ``device``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    vision = VisionTower(clip_dir)
    with torch.device(device):
        llm = LlamaForCausalLM(llama_config(shapes, layers))
        connector = Connector("mlp2x_gelu", vision.hidden_size, shapes["hidden_size"])
    # the trainer only calls forward(): the tokenizer is needed for padding ids alone
    tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=2)
    vlm = LlavaVLM(vision, connector, llm, tokenizer, "vicuna_v1")
    vlm.to(device)
    if dtype != torch.float32:
        vlm.to(dtype)
    return vlm


def train_batch(
    vlm: LlavaVLM, batch: int, text_tokens: int, device: torch.device, dtype: torch.dtype
) -> dict:
    """One micro-batch: <bos> <image> text..., loss on the text; random pixels and ids."""
    generator = torch.Generator().manual_seed(0)
    vocab = vlm.llm.config.vocab_size
    text = torch.randint(3, vocab, (batch, text_tokens), generator=generator)
    bos = torch.ones(batch, 1, dtype=torch.long)
    image = torch.full((batch, 1), IMAGE_TOKEN_ID, dtype=torch.long)
    input_ids = torch.cat([bos, image, text], dim=1)
    labels = input_ids.clone()
    labels[:, :2] = IGNORE_INDEX
    size = vlm.vision.image_size
    pixels = torch.randn(batch, 3, *size, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
        "pixel_values": pixels.to(device, dtype),
    }


def set_checkpointing(llm, on: bool) -> None:
    """Activation checkpointing of every decoder layer on or off (transformers 5 names first)."""
    if hasattr(llm, "activation_checkpointing_enable"):
        if on:
            llm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            llm.activation_checkpointing_disable()
    elif on:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_disable()


def matmul_params(vlm: LlavaVLM) -> dict[str, int]:
    """Parameter counts: trainable matmul params (connector + decoder layers + LM head), etc."""
    llm = vlm.llm
    embedding = llm.get_input_embeddings().weight.numel()
    llm_total = sum(p.numel() for p in llm.parameters())
    connector = sum(p.numel() for p in vlm.connector.parameters())
    return {
        "vision_frozen": sum(p.numel() for p in vlm.vision.parameters()),
        "connector": connector,
        "llm": llm_total,
        "llm_input_embedding": embedding,
        "trainable_matmul": connector + llm_total - embedding,
    }


def train_row(
    vlm: LlavaVLM,
    batch: dict,
    *,
    checkpointing: bool,
    amp: bool,
    warmup: int,
    steps: int,
    peak: float | None,
    workdir: Path,
) -> dict:
    """Time ``steps`` optimizer steps of ``fgvlm.training.loop.train`` after ``warmup`` steps."""
    from accelerate import Accelerator

    device = vlm.device
    size = int(batch["input_ids"].shape[0])
    recipe = Recipe(
        stage="finetune",
        updating="full",
        global_batch=size,
        per_device_batch=size,
        connector_lr=2e-5,
        llm_lr=2e-5,
        max_steps=warmup + steps + 1,
    )
    plan = make_plan(recipe, 1, n_samples=size * (warmup + steps + 1))
    set_checkpointing(vlm.llm, checkpointing)
    params = matmul_params(vlm)
    flops_per_token = 6 * params["trainable_matmul"]
    stamps: dict[int, float] = {}

    def on_step(step: int, model) -> None:  # noqa: ARG001
        sync(device)
        stamps[step] = time.perf_counter()
        if step == warmup + steps:
            raise _Measured

    def batches(epoch: int, skip: int):  # noqa: ARG001
        for _ in range(plan.steps_per_epoch * plan.grad_accum - skip):
            yield batch

    # bf16 autocast for every row (accelerate's state is process-wide, as run_training sets it
    # on GPU); with bf16 weights it changes nothing but the few ops autocast keeps in fp32
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision="bf16",
        gradient_accumulation_steps=plan.grad_accum,
    )
    state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=workdir))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        train(
            vlm,
            batches,
            recipe,
            plan,
            state_dir,
            seed=0,
            checkpoint_every=10**9,
            accelerator=accelerator,
            log_path=state_dir / "train_log.jsonl",
            flops_per_token=flops_per_token,
            peak_flops=peak * 1e12 if peak else None,
            on_step=on_step,
        )
    except _Measured:
        pass
    seconds = stamps[warmup + steps] - stamps[warmup]
    positions = size * (batch["input_ids"].shape[1] - 1 + vlm.vision.num_patches)
    tokens_per_s = positions * steps / seconds
    logged = json.loads((state_dir / "train_log.jsonl").read_text().splitlines()[-1])
    row = {
        "precision": "amp (fp32 weights, bf16 autocast)" if amp else "bf16 weights",
        "gradient_checkpointing": checkpointing,
        "s_per_step": round(seconds / steps, 4),
        "samples_per_s": round(size * steps / seconds, 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(flops_per_token * tokens_per_s / (peak * 1e12), 4) if peak else None,
        "trainer_logged_tokens_per_s": logged["tokens_per_s"],
        "trainer_logged_mfu": logged["mfu"],
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def part_training(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict:
    """(a): every precision x checkpointing row on one model shape."""
    workdir.mkdir(parents=True, exist_ok=True)
    clip_dir = clip_dir_for(workdir, args.dry_run_cpu)
    shapes = TINY_LLM if args.dry_run_cpu else LLAMA_7B
    peak = args.peak
    rows = []
    for precision in args.precisions:
        amp = precision == "amp"
        dtype = torch.float32 if amp else torch.bfloat16
        vlm = build_train_vlm(clip_dir, shapes, args.layers, device, dtype)
        params, num_patches = matmul_params(vlm), vlm.vision.num_patches
        batch = train_batch(vlm, args.batch, args.text_tokens, device, dtype)
        for checkpointing in (False, True):
            try:
                row = train_row(
                    vlm,
                    batch,
                    checkpointing=checkpointing,
                    amp=amp,
                    warmup=args.warmup,
                    steps=args.steps,
                    peak=peak,
                    workdir=workdir,
                )
            except torch.cuda.OutOfMemoryError as err:
                row = {"precision": precision, "gradient_checkpointing": checkpointing}
                row["error"] = f"out of memory: {str(err)[:200]}"
            rows.append(row)
            print(f"train {precision} ckpt={checkpointing}: {row}", file=sys.stderr)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del vlm, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "llm_shapes": {**shapes, "num_hidden_layers": args.layers},
        "vision": "ViT-L/14-336 shapes (24 layers, 576 patches)"
        if not args.dry_run_cpu
        else "tiny",
        "params": params,
        "micro_batch": args.batch,
        "lm_positions_per_sample": args.text_tokens + 1 + num_patches,
        "measured_steps": args.steps,
        "warmup_steps": args.warmup,
        "rows": rows,
    }


# --- (a2) length grouping --------------------------------------------------------------------


def mix665k_like_lengths(n: int, num_patches: int, max_length: int, seed: int = 0) -> list:
    """(has image, text tokens) of ``n`` samples: 6% text-only (ShareGPT-like, median ~400
    tokens), the rest one image + a median ~120-token conversation, both log-normal (a long
    tail); text cut so that a sample's LM positions stay within ``max_length``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = rng.random() >= 0.06
        text = rng.lognormal(np.log(120 if image else 400), 0.9)
        room = max_length - (num_patches if image else 0) - 1
        out.append((bool(image), int(max(4, min(text, room)))))
    return out


def ordered_batches(lengths: list, batch: int, group_batches: int, grouped: bool) -> list:
    """Micro-batches of (has image, text tokens): consecutive in the given (random) order, or
    through the trainer's length grouping (``fgvlm.data.shards._grouped``) of the same order."""
    if not grouped:
        return [lengths[i : i + batch] for i in range(0, len(lengths), batch)]
    from fgvlm.data.shards import _grouped

    raw = [
        {
            "json": json.dumps({"conversations": [{"value": " ".join(["w"] * text)}]}),
            **({"jpg": b""} if image else {}),
            "sample": (image, text),
        }
        for image, text in lengths
    ]
    rng = np.random.default_rng(1)
    order = [
        r["sample"]
        for r in _grouped(
            iter(raw), window=group_batches * batch, batch_size=batch, rng_of=lambda k: rng
        )
    ]
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def padded_batch(vlm: LlavaVLM, rows: list, device: torch.device, dtype: torch.dtype) -> tuple:
    """A right-padded micro-batch of the given rows; (batch, real LM positions, padded ones)."""
    generator = torch.Generator().manual_seed(len(rows))
    patches = vlm.vision.num_patches
    lm_lengths = [1 + text + (patches if image else 0) for image, text in rows]
    width = max(1 + text + int(image) for image, text in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    vocab = vlm.llm.config.vocab_size
    for b, (image, text) in enumerate(rows):
        ids = [1] + ([IMAGE_TOKEN_ID] if image else [])
        ids += torch.randint(3, vocab, (text,), generator=generator).tolist()
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
    labels = input_ids.masked_fill(~mask.bool() | (input_ids == IMAGE_TOKEN_ID), IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    pixels = torch.randn(len(rows), 3, *vlm.vision.image_size, generator=generator)
    batch = {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
        "pixel_values": pixels.to(device, dtype),
    }
    return batch, sum(lm_lengths), max(lm_lengths) * len(rows)


def part_grouping(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict:
    """(a2): random vs length-grouped micro-batches, same samples, same model."""
    from accelerate import Accelerator

    workdir.mkdir(parents=True, exist_ok=True)
    clip_dir = clip_dir_for(workdir, args.dry_run_cpu)
    shapes = TINY_LLM if args.dry_run_cpu else LLAMA_7B
    vlm = build_train_vlm(clip_dir, shapes, args.layers, device, torch.float32)
    set_checkpointing(vlm.llm, args.group_checkpointing)
    flops = 6 * matmul_params(vlm)["trainable_matmul"]
    n_batches = args.warmup + args.steps
    window = args.group_batches
    total = max(n_batches, window) * args.batch
    lengths = mix665k_like_lengths(total, vlm.vision.num_patches, args.max_length)
    rows = []
    for grouped in (False, True):
        order = ordered_batches(lengths, args.batch, window, grouped)
        made = [padded_batch(vlm, r, device, torch.float32) for r in order[:n_batches]]
        real = sum(m[1] for m in made[args.warmup :])
        padded = sum(m[2] for m in made[args.warmup :])
        recipe = Recipe(
            stage="finetune",
            updating="full",
            global_batch=args.batch,
            per_device_batch=args.batch,
            connector_lr=2e-5,
            llm_lr=2e-5,
            max_steps=n_batches + 1,
        )
        plan = make_plan(recipe, 1, n_samples=args.batch * (n_batches + 1))
        stamps: dict[int, float] = {}

        def on_step(step: int, model, stamps=stamps) -> None:  # noqa: ARG001
            sync(device)
            stamps[step] = time.perf_counter()
            if step == n_batches:
                raise _Measured

        def batches(epoch: int, skip: int, made=made):  # noqa: ARG001
            for batch, _, _ in made[skip:]:
                yield batch

        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16")
        state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=workdir))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            train(
                vlm,
                batches,
                recipe,
                plan,
                state_dir,
                seed=0,
                checkpoint_every=10**9,
                accelerator=accelerator,
                on_step=on_step,
            )
        except _Measured:
            pass
        seconds = stamps[n_batches] - stamps[args.warmup]
        row = {
            "order": "grouped" if grouped else "random",
            "padding_fraction": round(1 - real / padded, 4),
            "s_per_step": round(seconds / args.steps, 4),
            "real_lm_positions_per_s": round(real / seconds, 1),
            "mfu_real_positions": round(flops * real / seconds / (args.peak * 1e12), 4)
            if args.peak
            else None,
        }
        if device.type == "cuda":
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        rows.append(row)
        print(f"grouping {row}", file=sys.stderr)
    del vlm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    speedup = rows[0]["s_per_step"] / rows[1]["s_per_step"] if rows[1]["s_per_step"] else None
    return {
        "distribution": "mix665k-like: 6% text-only, log-normal text, capped at max_length",
        "max_length": args.max_length,
        "group_batches": window,
        "gradient_checkpointing": args.group_checkpointing,
        "micro_batch": args.batch,
        "rows": rows,
        "grouped_speedup": round(speedup, 3) if speedup else None,
    }


# --- (b) evaluation ----------------------------------------------------------------------------


def eval_model(
    workdir: Path, layers: int, vision_layers: int, device: torch.device, dry_run: bool
) -> tuple[HubVLM, list[MCQItem]]:
    """A random LLaVA-1.5-shaped ``LlavaForConditionalGeneration`` behind ``HubVLM``, and
    5-option questions on a small synthetic world's test images."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    world = workdir / "world"
    shapes = dict(TINY_LLM if dry_run else LLAMA_7B)
    tokenizer = bench_tokenizer(world, shapes["vocab_size"])
    shapes["vocab_size"] = len(tokenizer)
    image_size, patch = (32, 8) if dry_run else (336, 14)
    vision = CLIPVisionConfig(
        hidden_size=64 if dry_run else 1024,
        intermediate_size=128 if dry_run else 4096,
        num_hidden_layers=vision_layers,
        num_attention_heads=4 if dry_run else 16,
        image_size=image_size,
        patch_size=patch,
        projection_dim=64 if dry_run else 768,
    )
    text = llama_config(shapes, layers)
    text.bos_token_id, text.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    text.pad_token_id = tokenizer.pad_token_id
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.to(torch.float32 if dry_run else torch.bfloat16)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=sorted(set(eos)),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return HubVLM(model, processor, name="llava-7b-shape-random"), bench_items(world, 0)


def bench_tokenizer(world: Path, vocab_size: int):
    """A small world's test images (written once) and a tokenizer trained on its text, with
    the chat and image tokens and filler tokens up to ``vocab_size`` (so every id a random
    model can emit decodes to text)."""
    if not world.exists():
        generate_world(
            world, family="shapes", seed=0, image_size=32, train_per_class=2, test_per_class=2
        )
    tokenizer = train_tokenizer(text_corpus([world]), arch="llama")
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [*CHAT_TOKENS, "<image>"]}, replace_extra_special_tokens=False
    )
    tokenizer.add_tokens([f"<x{i}>" for i in range(vocab_size - len(tokenizer))])
    return tokenizer


def bench_items(world: Path, n: int) -> list[MCQItem]:
    """5-option questions on the world's test images, repeated up to ``n`` (0: each once)."""
    rng = np.random.default_rng(0)
    names = json.loads((world / "classes.json").read_text())
    items = []
    for i, (path, label, _) in enumerate(world_test_images(world, per_class=2)):
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        options = mcq_options(names, label, rng)
        prompt = mcq_prompt(FINE_GRAINED_QUESTION, options, style="llava")
        items.append(MCQItem(f"shapes-{i:04d}", rgb, prompt, options))
    if n:
        items = (items * (n // len(items) + 1))[:n]
        items = [
            MCQItem(f"q{i:05d}", it.image, it.prompt, it.options) for i, it in enumerate(items)
        ]
    return items


def part_trained_eval(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict:
    """(c): the trained-row runner (``LlavaRunner`` on a ``LlavaVLM``: the ViT-L/14-336-shaped
    tower, the connector, a random Llama of Vicuna-7B's shapes) in float32 (TF32 allowed, as
    ``load_runner`` sets it) against bfloat16: batch 16 vs 1, option_likelihood with the shared
    prefix vs full sequences, length-sorted vs item-order batches, and fp32 vs bf16 answers."""
    from eval_batching import compare, compare_speedups, with_hints
    from transformers import LlamaForCausalLM

    world = workdir / "world"
    tokenizer = bench_tokenizer(world, (TINY_LLM if args.dry_run_cpu else LLAMA_7B)["vocab_size"])
    items = bench_items(world, args.questions)
    shapes = dict(TINY_LLM if args.dry_run_cpu else LLAMA_7B, vocab_size=len(tokenizer))
    clip_dir = clip_dir_for(workdir, args.dry_run_cpu)
    torch.manual_seed(0)
    vision = VisionTower(clip_dir)
    config = llama_config(shapes, args.layers)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device(device):
        llm = LlamaForCausalLM(config)
        connector = Connector("mlp2x_gelu", vision.hidden_size, shapes["hidden_size"])
    vlm = LlavaVLM(vision, connector, llm, tokenizer, "vicuna_v1").to(device).eval()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batch, max_new = args.eval_batch, args.max_new_tokens
    out: dict = {"model": f"LlavaVLM, random init, {args.layers} LM layers (Vicuna-7B shapes)"}
    answers: dict[str, dict[str, list]] = {}
    for dtype in ("float32", "bfloat16"):
        vlm.connector.to(getattr(torch, dtype))
        vlm.llm.to(getattr(torch, dtype))
        runner = LlavaRunner(vlm, f"trained-{dtype}")
        row = {
            f"batch{batch}_vs_1": compare(
                runner, items, batch=batch, rounds=args.rounds, max_new=max_new
            )
        }
        sync(device)
        row["speed_items"] = compare_speedups(
            vlm, with_hints(items, seed=1), batch=batch, rounds=args.rounds, max_new=max_new
        )
        answers[dtype] = {
            mode: [
                r["pred"]
                for r in score(runner, items, mode=mode, batch_size=batch, max_new_tokens=max_new)
            ]
            for mode in ("generate", "option_likelihood")
        }
        out[dtype] = row
        print(f"trained-row eval {dtype}: done", file=sys.stderr)
        if device.type == "cuda":
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    out["fp32_vs_bf16_answer_agreement"] = {
        mode: agreement(answers["float32"][mode], answers["bfloat16"][mode])
        for mode in ("generate", "option_likelihood")
    }
    return out


def part_eval(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict:
    """(b): batched vs batch-1 greedy generation, alternating order over rounds."""
    hub, items = eval_model(workdir, args.layers, args.vision_layers, device, args.dry_run_cpu)
    items = (items * (args.questions // len(items) + 1))[: args.questions]
    items = [MCQItem(f"q{i:05d}", it.image, it.prompt, it.options) for i, it in enumerate(items)]
    batch, max_new = args.eval_batch, args.max_new_tokens
    score(hub, items[:batch], mode="generate", batch_size=batch, max_new_tokens=max_new)  # warm
    speeds: dict[int, list[float]] = {batch: [], 1: []}
    outputs: dict[int, list[dict]] = {}
    for r in range(args.rounds):
        for size in (batch, 1) if r % 2 == 0 else (1, batch):
            sync(device)
            start = time.perf_counter()
            rows = score(hub, items, mode="generate", batch_size=size, max_new_tokens=max_new)
            sync(device)
            speeds[size].append(len(items) / (time.perf_counter() - start))
            outputs[size] = rows
    batched, single = outputs[batch], outputs[1]
    differ = [
        {"qid": b["qid"], "batched": b["output"], "batch1": s["output"]}
        for b, s in zip(batched, single, strict=True)
        if b["output"] != s["output"] or b["pred"] != s["pred"]
    ]
    return {
        "model": "LlavaForConditionalGeneration, random init, "
        f"{'float32' if args.dry_run_cpu else 'bf16'}, {args.layers} LM layers, "
        f"{args.vision_layers} tower layers",
        "questions": len(items),
        "max_new_tokens": max_new,
        f"batch{batch}_questions_per_s": round(statistics.median(speeds[batch]), 2),
        "batch1_questions_per_s": round(statistics.median(speeds[1]), 2),
        "speedup": round(
            statistics.median(b / s for b, s in zip(speeds[batch], speeds[1], strict=True)), 2
        ),
        "answer_agreement": agreement([r["pred"] for r in batched], [r["pred"] for r in single]),
        "output_agreement": agreement(
            [r["output"] for r in batched], [r["output"] for r in single]
        ),
        "disagreements": differ[:20],
        "n_disagreements": len(differ),
        "distinct_outputs": len({row["output"] for row in single}),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes on CPU")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (7B: 32)")
    parser.add_argument("--vision-layers", type=int, default=24, help="eval tower layers")
    parser.add_argument("--batch", type=int, default=8, help="training micro-batch")
    parser.add_argument("--text-tokens", type=int, default=100, help="text tokens per sample")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps not timed")
    parser.add_argument("--precisions", nargs="+", default=["amp", "bf16"], choices=["amp", "bf16"])
    parser.add_argument("--questions", type=int, default=128)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8, help="paper config: 8")
    parser.add_argument("--rounds", type=int, default=2, help="eval rounds (order alternates)")
    parser.add_argument("--peak-tflops", type=float, help="override the device's bf16 peak")
    parser.add_argument("--max-length", type=int, default=2048, help="(a2) LM position cap")
    parser.add_argument("--group-batches", type=int, default=64, help="(a2) grouping window")
    parser.add_argument(
        "--group-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="(a2) activation checkpointing (the paper finetune recipe's)",
    )
    parser.add_argument("--skip-grouping", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.dry_run_cpu:
        # tiny everything: the code paths run in seconds on a laptop
        args.layers, args.vision_layers, args.batch, args.text_tokens = 2, 2, 2, 20
        args.steps, args.warmup, args.questions, args.eval_batch = 2, 1, 8, 4
        args.max_length, args.group_batches = 64, 4
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        sys.exit(
            "gpu_bench.py needs a CUDA GPU (torch.cuda.is_available() is False). "
            "Run it on a GPU machine with this repository installed, or pass --dry-run-cpu "
            "to exercise the code path with tiny shapes on CPU."
        )
    device = torch.device("cpu" if args.dry_run_cpu else "cuda")
    name = "cpu (dry run)" if args.dry_run_cpu else torch.cuda.get_device_name(device)
    args.peak = peak_tflops(name, args.peak_tflops)
    info = machine()
    info["device"] = name
    info["peak_bf16_tflops"] = args.peak
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    summary: dict = {"benchmark": "gpu_bench", "dry_run_cpu": args.dry_run_cpu, "machine": info}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fgvlm-gpu-bench-") as tmp:
        workdir = Path(tmp)
        if not args.skip_train:
            summary["training"] = part_training(args, device, workdir / "train")
        if not args.skip_grouping:
            summary["length_grouping"] = part_grouping(args, device, workdir / "grouping")
        if not args.skip_eval:
            (workdir / "eval").mkdir()
            summary["evaluation"] = part_eval(args, device, workdir / "eval")
            (workdir / "trained-eval").mkdir()
            summary["trained_row_evaluation"] = part_trained_eval(
                args, device, workdir / "trained-eval"
            )
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
