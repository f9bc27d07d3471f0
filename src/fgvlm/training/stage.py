"""One training stage end to end (``run_training``), as the numbered steps of the recipe.

``fgvlm.stages.train_stage`` calls it in every process of a launched stage
(``fgvlm.training.launch``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fgvlm.training.checkpoint import (
    CHECKPOINT_PREFIX,
    FINAL_DIR,
    FINAL_RECORD,
    check_saveable,
    prepare_state_dir,
    record_final,
    reemit_final,
    save_model,
)
from fgvlm.training.loop import TrainResult, train
from fgvlm.training.recipe import Plan, Recipe, group_schedules, make_plan, per_device_batch

log = logging.getLogger(__name__)


def initial_model(
    spec: dict,
    *,
    clip_dir: Path | None,
    llm_dir: Path | None,
    init_dir: Path | None,
    base_dir: Path | None,
    device: str,
):
    """The model a stage starts from, and the chat template its data is rendered with.

    Pretraining: a fresh connector on the frozen tower and the LLM, plain captions.
    Finetuning: the pretraining checkpoint (or a fresh connector when the row skips
    pretraining), rendered in the LLM's chat template. The Qwen2-VL row: the whole base VLM.
    """
    from fgvlm.models import vlm as vlm_lib

    if base_dir is not None:
        from fgvlm.models.hub_train import load_trainable_hub_vlm

        return load_trainable_hub_vlm(base_dir, device=device)
    template = spec.get("template", "plain")
    if init_dir is not None:
        model = vlm_lib.load_vlm(init_dir, device=device)
        model.template = template
        return model
    if clip_dir is None or llm_dir is None:
        raise ValueError("a LLaVA-style stage needs clip_dir and llm_dir (or init_dir)")
    model = vlm_lib.build_vlm(
        clip_dir, llm_dir, template=template, image_aspect=spec["image_aspect"], seed=spec["seed"]
    )
    return model.to(device)


def micro_batches_per_epoch(
    data_dir: Path, recipe: Recipe, *, world_size: int, workers: int
) -> tuple[int, int, int]:
    """(micro-batches every rank steps per epoch, samples they hold, samples that exist).

    Checked before the model is loaded: raises, naming the numbers, when ranks x loader workers
    would leave more than 1% of an epoch unseen."""
    from fgvlm.data.shards import check_coverage, count_samples

    per_device = per_device_batch(recipe, world_size)
    total = count_samples(data_dir)
    micro, seen = check_coverage(
        total,
        world_size=world_size,
        num_workers=workers,
        batch_size=per_device,
        grad_accum=max(1, recipe.global_batch // (world_size * per_device)),
        where=str(data_dir),
    )
    return micro, seen, total


def job_identity(spec: dict, inputs: dict[str, Path | None], world_size: int) -> dict:
    """What a rerun shares with the run that left a state folder, to resume it or re-emit its
    output: the spec, the world size (checkpoints are sharded by it), and a hash of every input
    file's path, size and modification time (an input Snakemake made again, e.g. the
    pretraining under a finetuning, is another job)."""
    listing = {
        key: [
            (p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))
            if p.is_file()
        ]
        for key, root in sorted(inputs.items())
        if root is not None
    }
    digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    return {"spec": spec, "world_size": world_size, "inputs": digest}


def run_training(
    spec: dict,
    out_dir: Path,
    *,
    state_dir: Path,
    data_dir: Path,
    clip_dir: Path | None = None,
    llm_dir: Path | None = None,
    init_dir: Path | None = None,
    base_dir: Path | None = None,
    device: str = "cpu",
    checkpoint_every: int = 500,
    dataloader_workers: int = 0,
    shuffle_buffer: int = 1000,
    log_every: int = 1,
    peak_tflops: float | None = None,
) -> dict:
    """Train one stage and save the model to ``out_dir`` (see ``fgvlm.stages.train_stage``).

    Samples are shuffled within each shard through a seeded buffer of ``shuffle_buffer``; the
    train log gets a line every ``log_every`` steps, with MFU against ``peak_tflops`` per GPU
    (None: the GPU's datasheet value, when known). A job that finished before but whose output
    is gone (Snakemake died while it ran, and ``--rerun-incomplete`` deleted it) writes the
    output again from ``state_dir``, untrained."""
    from accelerate import Accelerator, PartialState

    seed = spec["seed"]
    state = PartialState(cpu=device == "cpu")
    # 0. The state to resume from, only a run of this very job; its output if it finished.
    inputs = {
        "data": data_dir,
        "clip": clip_dir,
        "llm": llm_dir,
        "init": init_dir,
        "base": base_dir,
    }
    identity = job_identity(spec, inputs, state.num_processes)
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    if state.is_main_process:
        prepare_state_dir(state_dir, identity)
        reemit_final(state_dir, out_dir, fingerprint)
    state.wait_for_everyone()
    final = state_dir / FINAL_DIR / FINAL_RECORD
    if final.is_file():  # rank 0 left it only after re-emitting from it
        return json.loads(final.read_text())["summary"]
    # 1. The recipe and the run's arithmetic: every rank yields the same micro-batches per epoch.
    recipe = Recipe.from_config(spec["recipe"])
    micro, seen, total = micro_batches_per_epoch(
        data_dir, recipe, world_size=state.num_processes, workers=dataloader_workers
    )
    plan = make_plan(recipe, state.num_processes, micro_batches_per_epoch=micro)
    log.info("plan: %s; an epoch sees %d of %d samples", plan, seen, total)
    # 2. The strategy: one process, DDP, FSDP or DeepSpeed, as the launcher's environment says,
    # FSDP sharded as the recipe asks.
    sharding = apply_sharding(recipe, os.environ)
    accelerator = Accelerator(
        cpu=device == "cpu",
        mixed_precision="bf16" if device == "cuda" else "no",
        gradient_accumulation_steps=plan.grad_accum,
    )
    # 3. The model: built from the tower and the LLM, or the previous stage's checkpoint.
    torch.manual_seed(seed)
    model = initial_model(
        spec,
        clip_dir=clip_dir,
        llm_dir=llm_dir,
        init_dir=init_dir,
        base_dir=base_dir,
        device=str(accelerator.device),
    )
    check_saveable(model, accelerator)
    language_model = getattr(model, "llm", None) or model.model  # LlavaVLM / TrainableHubVLM
    if sharding == "replicate" and recipe.updating == "connector" and device == "cuda":
        # frozen for the whole run: a bf16 replica halves its memory, autocast computes in bf16
        language_model.to(torch.bfloat16)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if recipe.activation_checkpointing and accelerator.device.type == "cuda" and not fsdp:
        # under FSDP the recipe's switch is FSDP_ACTIVATION_CHECKPOINTING (apply_sharding)
        language_model.gradient_checkpointing_enable()
    if recipe.compile and accelerator.device.type == "cuda":
        compile_layers(language_model)
    # 4. The data: this rank's shards, rendered by the model's own collator.
    batches = _rank_batches(
        data_dir,
        model.collate_fn(max_length=recipe.max_length, count_truncated=True),
        plan,
        accelerator,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        workers=dataloader_workers,
        group_batches=recipe.group_batches,
    )
    # 5. Train: freezes and unfreezes the groups as the recipe says, then saves on rank 0.
    summary: dict = {}

    def finish(prepared: Any, result: TrainResult) -> None:
        summary.update(
            spec=spec,
            plan=asdict(plan),
            groups=[asdict(group) for group in group_schedules(recipe, plan)],
            result=asdict(result),
        )
        if accelerator.is_main_process:
            log_lines = (state_dir / "train_log.jsonl").read_text().splitlines()
            summary["log_tail"] = [json.loads(line) for line in log_lines[-5:]]
        save_model(accelerator, prepared, out_dir, {"training": summary})

    train(
        model,
        batches,
        recipe,
        plan,
        state_dir,
        seed=seed,
        checkpoint_every=checkpoint_every,
        accelerator=accelerator,
        log_path=state_dir / "train_log.jsonl",
        flops_per_token=flops_per_position(model, recipe),
        peak_flops=peak_flops(accelerator.device, peak_tflops),
        log_every=log_every,
        epoch_samples=total,
        finish=finish,
    )
    # 6. The job is complete: its output kept for a rerun that lost it, nothing left to resume.
    if accelerator.is_main_process:
        record_final(out_dir, state_dir, fingerprint, summary)
        for checkpoint in state_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(checkpoint)
    accelerator.wait_for_everyone()
    return summary


def _rank_batches(
    data_dir: Path,
    collate: Callable,
    plan: Plan,
    accelerator: Any,
    *,
    seed: int,
    shuffle_buffer: int,
    workers: int,
    group_batches: int = 0,
) -> Callable[[int, int], Iterator[dict]]:
    """``batches(epoch, skip)`` for ``train``: this rank's micro-batches on its device."""
    from torch.utils.data import DataLoader

    from fgvlm.data.shards import conversation_dataset

    def batches(epoch: int, skip: int) -> Iterator[dict]:
        dataset = conversation_dataset(
            data_dir,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            seed=seed,
            epoch=epoch,
            shuffle_buffer=shuffle_buffer,
            skip_batches=skip,
            batch_size=plan.per_device_batch,
            group_batches=group_batches,
        )
        loader = DataLoader(
            dataset,
            batch_size=plan.per_device_batch,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=accelerator.device.type == "cuda",
        )
        for batch in loader:
            batch = {
                k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()
            }
            # no KV cache: FSDP's activation checkpointing reruns each decoder layer in the
            # backward pass, which would append to the cache twice (HF's own checkpointing
            # turns it off itself)
            yield {**batch, "use_cache": False}

    return batches


def apply_sharding(recipe: Recipe, env: dict) -> str:
    """Set the recipe's sharding in ``env`` (``os.environ``) before ``Accelerator()`` reads it.

    Only under an FSDP accelerate config (``ACCELERATE_USE_FSDP``): ``replicate`` turns FSDP off
    (DDP), ``hybrid``/``full`` pick FSDP's strategy; the recipe's activation checkpointing
    replaces the config file's. Returns the sharding in effect (``none`` without FSDP)."""
    if env.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return "none"
    sharding = recipe.resolved_sharding()
    if sharding == "replicate":
        env["ACCELERATE_USE_FSDP"] = "false"
    else:
        env["FSDP_SHARDING_STRATEGY"] = {"hybrid": "HYBRID_SHARD", "full": "FULL_SHARD"}[sharding]
        env["FSDP_ACTIVATION_CHECKPOINTING"] = str(recipe.activation_checkpointing).lower()
    log.info("sharding: %s", sharding)
    return sharding


def compile_layers(language_model: Any) -> None:
    """``torch.compile`` every decoder layer in place: FSDP still wraps the same modules."""
    layers = getattr(getattr(language_model, "model", language_model), "layers", None)
    if layers is None:
        raise ValueError(f"compile: {type(language_model).__name__} has no decoder layers")
    for layer in layers:
        layer.compile()


# dense bf16 peak per GPU (datasheets), by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def peak_flops(device: torch.device, peak_tflops: float | None) -> float | None:
    """FLOP/s one device can do: ``peak_tflops`` if given, else its datasheet's (None: unknown)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def flops_per_position(model: Any, recipe: Recipe) -> float:
    """Model FLOPs per LM position of a training step: 2N forward + 2N activation gradients
    through the LLM's N parameters, + 2N weight gradients when the LLM learns (connector alike).
    The frozen vision tower's forward and attention's quadratic term are left out: MFU on LM
    positions, a lower bound."""
    groups = model.parameter_groups()
    llm = sum(p.numel() for p in groups["llm"])
    connector = sum(p.numel() for p in groups["connector"])
    llm_learns = recipe.updating in ("full", "llm")
    return float((6 if llm_learns else 4) * llm + 6 * connector)
