"""One training stage end to end (``run_training``), as the numbered steps of the recipe.

``fgvlm.stages.train_stage`` calls it in every process of a launched stage
(``fgvlm.training.launch``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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
    data_dir: Path, recipe: Recipe, *, world_size: int, seed: int, workers: int
) -> int:
    """Micro-batches every rank can yield in every epoch of the run (ranks hold whole shards)."""
    from fgvlm.data.shards import batches_per_rank

    per_device = per_device_batch(recipe, world_size)
    epochs = max(1, math.ceil(recipe.epochs))
    return min(
        min(
            batches_per_rank(
                data_dir,
                world_size=world_size,
                seed=seed,
                epoch=epoch,
                num_workers=workers,
                batch_size=per_device,
            )
        )
        for epoch in range(epochs)
    )


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
) -> dict:
    """Train one stage and save the model to ``out_dir`` (see ``fgvlm.stages.train_stage``).

    Samples are shuffled within each shard through a seeded buffer of ``shuffle_buffer``.
    A job that finished before but whose output is gone (Snakemake died while it ran, and
    ``--rerun-incomplete`` deleted it) writes the output again from ``state_dir``, untrained."""
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
    micro = micro_batches_per_epoch(
        data_dir, recipe, world_size=state.num_processes, seed=seed, workers=dataloader_workers
    )
    plan = make_plan(recipe, state.num_processes, micro_batches_per_epoch=micro)
    log.info("plan: %s", plan)
    # 2. The strategy: one process, DDP, FSDP or DeepSpeed, as the launcher's environment says.
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
    if accelerator.device.type == "cuda" and not os.environ.get("FSDP_ACTIVATION_CHECKPOINTING"):
        # activation memory of 7B LMs; under FSDP the accelerate config does it instead
        language_model = getattr(model, "llm", None) or model.model  # LlavaVLM / TrainableHubVLM
        language_model.gradient_checkpointing_enable()
    # 4. The data: this rank's shards, rendered by the model's own collator.
    batches = _rank_batches(
        data_dir,
        model.collate_fn(max_length=recipe.max_length),
        plan,
        accelerator,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        workers=dataloader_workers,
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
        )
        loader = DataLoader(
            dataset, batch_size=plan.per_device_batch, collate_fn=collate, num_workers=workers
        )
        for batch in loader:
            batch = {
                k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()
            }
            # no KV cache: FSDP's activation checkpointing reruns each decoder layer in the
            # backward pass, which would append to the cache twice (HF's own checkpointing
            # turns it off itself)
            yield {**batch, "use_cache": False}

    return batches
