"""The training loop of every stage, from one CPU process to 16 GPUs (``train``).

Who learns when comes from ``fgvlm.training.recipe.group_schedules`` (logged at the start of
every run); checkpoints from ``fgvlm.training.checkpoint``. SIGTERM (SLURM's warning before a
kill) makes every rank checkpoint at the next step and stop with ``Preempted``.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fgvlm.training.checkpoint import (
    init_optimizer_state,
    is_deepspeed,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
    torch_optimizer,
    truncate_log,
)
from fgvlm.training.recipe import (
    GroupSchedule,
    Plan,
    Recipe,
    describe,
    group_schedules,
    lr_multiplier,
    trainable_groups,
)

log = logging.getLogger(__name__)


def drop_gradients(params: list) -> None:
    """Forget the gradients of ``params``: AdamW skips parameters whose grad is None."""
    for param in params:
        param.grad = None


class _Stop:
    """SIGTERM (SLURM's warning before a kill) asks the loop to checkpoint and exit."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True


class Preempted(RuntimeError):
    """Raised after a checkpoint was written in answer to SIGTERM; rerun to resume."""


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    resumed_from: int


def train(
    model: Any,
    batches: Callable[[int, int], Iterator[dict]],
    recipe: Recipe,
    plan: Plan,
    state_dir: Path,
    *,
    seed: int,
    checkpoint_every: int = 50,
    accelerator=None,
    log_path: Path | None = None,
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
    log_every: int = 1,
    epoch_samples: int | None = None,
    on_step: Callable[[int, Any], None] | None = None,
    finish: Callable[[Any, TrainResult], None] | None = None,
) -> TrainResult:
    """Train ``model`` (a VLM with ``parameter_groups()``) by ``recipe`` / ``plan``.

    ``batches(epoch, skip)`` yields this rank's micro-batches of one epoch (dicts for
    ``model(**batch)``), skipping the first ``skip`` (already consumed before a resume).
    A batch may carry ``truncated`` (samples its collator cut to ``max_length``): counted, not
    passed on. Every ``log_every`` steps (the loop's only host syncs, SIGTERM checks included)
    a log line gives loss, tokens/s on LM positions and, with ``flops_per_token`` and
    ``peak_flops``, MFU; every epoch's end, the samples it saw (all ranks) of ``epoch_samples``.
    Resumes from the newest intact checkpoint in ``state_dir``, if any. ``on_step(step, model)``
    is called after every optimizer step (observation only); ``finish(model, result)`` on every
    rank after the last one, with the model ``accelerator.prepare`` returned (e.g. ``save_model``).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = accelerator or Accelerator(gradient_accumulation_steps=plan.grad_accum)
    torch.manual_seed(seed)
    random.seed(seed)
    schedules = group_schedules(recipe, plan)
    if accelerator.is_main_process:
        for line in describe(recipe, schedules):
            log.info(line)
    groups = trainable_groups(model, schedules)
    optimizer = make_optimizer(groups, recipe, fused=accelerator.device.type == "cuda")
    start_of = {group.name: group.start_step for group in schedules}
    starts = [start_of[g["name"]] for g in groups]
    scheduler = make_scheduler(optimizer, schedules, recipe, plan)
    model, optimizer = accelerator.prepare(model, optimizer)
    if not is_deepspeed(accelerator):  # DeepSpeed's optimizer makes its own state
        init_optimizer_state(torch_optimizer(optimizer))
    state_dir.mkdir(parents=True, exist_ok=True)

    step, micro_in_epoch, epoch, resumed = 0, 0, 0, 0
    checkpoint = resumable_checkpoint(state_dir, accelerator)
    if checkpoint is not None:
        position = load_checkpoint(
            checkpoint, model, optimizer, scheduler, accelerator.process_index, accelerator
        )
        step, epoch, micro_in_epoch = position["step"], position["epoch"], position["micro"]
        resumed = step
        log.info(
            "resuming %s at step %d (epoch %d, micro-batch %d)",
            checkpoint,
            step,
            epoch,
            micro_in_epoch,
        )
    if log_path is not None and accelerator.is_main_process:
        truncate_log(log_path, step)  # the steps after the checkpoint are trained again
    late = [
        (start, g["name"], g["params"]) for g, start in zip(groups, starts, strict=True) if start
    ]

    stop = _Stop()
    previous = signal.signal(signal.SIGTERM, stop)
    log_file = open(log_path, "a") if log_path else None  # noqa: SIM115
    bar = tqdm(
        total=plan.total_steps,
        initial=step,
        desc=recipe.stage,
        unit="step",
        disable=not accelerator.is_main_process,
    )
    started, last_loss = time.perf_counter(), float("nan")
    # device-side running sums: read on the host only when a log line is due
    window = _Window(accelerator.device)
    samples_in_epoch, truncated_in_epoch = 0, 0
    micro_per_epoch = plan.steps_per_epoch * plan.grad_accum
    try:
        model.train()
        while step < plan.total_steps:
            consumed = 0
            for batch in batches(epoch, micro_in_epoch):
                consumed += 1
                truncated = int(batch.get("truncated", 0))
                batch = {k: v for k, v in batch.items() if k != "truncated"}
                truncated_in_epoch += truncated
                samples_in_epoch += int(batch["attention_mask"].shape[0])
                with accelerator.accumulate(model):
                    out = model(**batch)
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients:
                        for start, _, params in late:
                            if step < start:
                                drop_gradients(params)  # e.g. the connector-only phase
                        # all of model.parameters(): FSDP's shard-aware clipping needs them
                        accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                        scheduler_due = True
                    else:
                        scheduler_due = False
                    optimizer.step()  # a no-op until the accumulation cycle completes
                    optimizer.zero_grad(set_to_none=True)
                micro_in_epoch += 1
                positions = _lm_positions(accelerator.unwrap_model(model), batch)
                window.add(out.loss.detach(), positions)
                window.truncated += truncated
                if not scheduler_due:
                    continue
                scheduler.step()
                step += 1
                for start, name, _ in late:
                    if step == start:
                        log.info("step %d: group %s learns from now on", step, name)
                due = step % log_every == 0 or step == plan.total_steps
                if due:
                    last_loss = window.flush(
                        log_file if accelerator.is_main_process else None,
                        step=step,
                        epoch=epoch,
                        lrs={g["name"]: g["lr"] for g in optimizer.param_groups},
                        flops_per_token=flops_per_token,
                        peak_flops=peak_flops,
                    )
                    bar.set_postfix(loss=f"{last_loss:.3f}")
                if on_step is not None:
                    on_step(step, accelerator.unwrap_model(model))
                bar.update(1)
                end_of_epoch = micro_in_epoch >= micro_per_epoch
                if end_of_epoch:
                    _log_epoch(
                        log_file,
                        accelerator,
                        step,
                        epoch,
                        samples_in_epoch,
                        truncated_in_epoch,
                        epoch_samples,
                    )
                    epoch, micro_in_epoch = epoch + 1, 0
                    samples_in_epoch, truncated_in_epoch = 0, 0
                stopping = (due or step % checkpoint_every == 0) and _any_rank(
                    stop.requested, accelerator
                )
                if step % checkpoint_every == 0 or stopping or step == plan.total_steps:
                    position = {"epoch": epoch, "micro": micro_in_epoch}
                    save_checkpoint(
                        state_dir, step, model, optimizer, scheduler, position, accelerator
                    )
                if stopping:
                    raise Preempted(f"SIGTERM: checkpointed step {step} in {state_dir}; rerun")
                if step >= plan.total_steps or end_of_epoch:
                    break
            else:
                # this rank's stream ended before the planned micro-batches of the epoch
                raise ValueError(
                    f"epoch {epoch} gave {micro_in_epoch} micro-batches ({consumed} after the "
                    f"resume point), fewer than the planned {micro_per_epoch}: the training "
                    "stream is shorter than the plan (shards split unevenly across ranks?)"
                )
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        if log_file:
            log_file.close()
    if window.micro:  # the loss of steps after the last log line
        last_loss = window.flush(None, step=step, epoch=epoch, lrs={})
    result = TrainResult(step, time.perf_counter() - started, last_loss, resumed)
    if finish is not None:
        finish(model, result)
    return result


def _any_rank(flag: bool, accelerator: Any) -> bool:
    """Whether ``flag`` is set on any rank: SIGTERM may reach the ranks at different steps,
    and the checkpoint it asks for is a collective that all of them must join at one step."""
    if accelerator.num_processes == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _lm_positions(model: Any, batch: dict) -> torch.Tensor:
    """Positions the LM processes in a batch: text tokens plus each spliced image's patches
    (a device tensor: reading it would sync)."""
    count = batch["attention_mask"].sum()
    pixels = batch.get("pixel_values")
    patches = getattr(getattr(model, "vision", None), "num_patches", None)
    if pixels is not None and patches:
        count += int(pixels.shape[0]) * (patches - 1)  # the placeholder became num_patches
    return count


def make_optimizer(groups: list[dict], recipe: Recipe, *, fused: bool) -> torch.optim.AdamW:
    """AdamW over the learning groups; ``fused``: one kernel for all parameters (same update)."""
    return torch.optim.AdamW(groups, weight_decay=recipe.weight_decay, fused=fused or None)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedules: list[GroupSchedule], recipe: Recipe, plan: Plan
) -> torch.optim.lr_scheduler.LambdaLR:
    """Every optimizer group's rate at every step: its base rate times ``lr_multiplier``."""
    by_name = {group.name: group for group in schedules}
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [
            (
                lambda s, g=by_name[pg["name"]]: lr_multiplier(
                    g, s, plan.total_steps, recipe.warmup_ratio
                )
            )
            for pg in optimizer.param_groups
        ],
    )


class _Window:
    """Loss and LM positions since the last log line, summed on the device (no host sync)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.started = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.positions = torch.zeros((), device=self.device, dtype=torch.long)
        self.micro, self.steps, self.truncated = 0, 0, 0

    def add(self, loss: torch.Tensor, positions: torch.Tensor) -> None:
        self.loss += loss.float()
        self.positions += positions
        self.micro += 1

    def flush(
        self,
        log_file: Any,
        *,
        step: int,
        epoch: int,
        lrs: dict,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> float:
        """Write one JSON line (when ``log_file``) and start a new window; the mean loss."""
        now = time.perf_counter()
        elapsed, positions = now - self.started, int(self.positions)
        loss = float(self.loss) / max(1, self.micro)
        if log_file is not None:
            rate = positions / elapsed if elapsed else None
            record = {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "lr": lrs,
                "tokens_per_s": rate,
                "mfu": flops_per_token * rate / peak_flops
                if (flops_per_token and peak_flops and rate)
                else None,
                "truncated": self.truncated,
            }
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        self.started = now
        self.reset()
        return loss


def _log_epoch(log_file, accelerator, step, epoch, samples, truncated, total) -> None:
    """One JSON line at an epoch's end: the samples all ranks saw of those that exist."""
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        counts = torch.tensor([samples, truncated], device=accelerator.device)
        dist.all_reduce(counts)
        samples, truncated = (int(c) for c in counts.tolist())
    line = f"epoch {epoch}: saw {samples} samples"
    line += f" of {total}" if total else ""
    log.info("%s (%d truncated to max_length)", line, truncated)
    if log_file and accelerator.is_main_process:
        record = {"step": step, "epoch_end": epoch, "samples_seen": samples}
        record["samples_total"] = total
        log_file.write(json.dumps({**record, "truncated": truncated}) + "\n")
        log_file.flush()
