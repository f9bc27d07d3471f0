"""One training loop for every stage of the paper (Appendix C), from one CPU process to 16 GPUs.

A recipe (``config.recipes``, merged with a row's overrides) says which weights learn and when:

- ``pretrain`` + ``connector``: connector only (lr 1e-3), LLM and vision tower frozen;
- ``pretrain`` + ``full``: connector only for the first ``connector_only_fraction`` (20%) of the
  steps, then the LLM too (lr 2e-5) for the rest;
- ``finetune`` + ``full``: connector and LLM (lr 2e-5);
- ``finetune`` + ``llm``: the LLM only (the Qwen2-VL architecture row).

The vision tower is always frozen. Schedules are cosine with linear warmup (``warmup_ratio``);
a group that starts late (the LLM after the connector-only phase) warms up from its start.
Gradient accumulation is global batch / (world size x per-device batch). Checkpoints every
``checkpoint_every`` steps hold the trainable weights, optimizer, scheduler, data position and
RNG state, so a killed job resumes where it stopped and ends with the same weights. Under FSDP
each rank writes its own shards of weights and optimizer (torch.distributed.checkpoint), under
DeepSpeed the engine writes its partitions; the final model is gathered on rank 0 and saved there.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fgvlm import io

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"


@dataclass(frozen=True)
class Recipe:
    """Which weights learn, at which learning rates, for how long (``config.recipes.<name>``)."""

    stage: str
    updating: str
    global_batch: int
    epochs: float = 1.0
    connector_lr: float | None = None
    llm_lr: float | None = None
    connector_only_fraction: float = 0.0
    per_device_batch: int | None = None
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    max_length: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    @classmethod
    def from_config(cls, recipe: dict) -> Recipe:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise ValueError(f"recipe: unknown fields {unknown}")
        made = cls(**recipe)
        made.check()
        return made

    def check(self) -> None:
        if self.updating not in ("connector", "full", "llm"):
            raise ValueError(f"recipe.updating: {self.updating!r} is not connector, full or llm")
        if self.updating in ("connector", "full") and self.connector_lr is None:
            raise ValueError(f"recipe: updating {self.updating!r} needs connector_lr")
        if self.updating in ("full", "llm") and self.llm_lr is None:
            raise ValueError(f"recipe: updating {self.updating!r} needs llm_lr")
        if not 0.0 <= self.connector_only_fraction < 1.0:
            raise ValueError("recipe.connector_only_fraction must be in [0, 1)")


@dataclass(frozen=True)
class Plan:
    """The run's arithmetic, fixed before the first step."""

    world_size: int
    per_device_batch: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    llm_start_step: int  # first optimizer step at which the LLM learns (total_steps: never)


def per_device_batch(recipe: Recipe, world_size: int) -> int:
    """The recipe's per-device batch, or the largest one up to 16 that divides the global batch."""
    if recipe.per_device_batch:
        return recipe.per_device_batch
    per_device = max(1, min(16, recipe.global_batch // world_size))
    while recipe.global_batch % (world_size * per_device):
        per_device -= 1
    return per_device


def make_plan(
    recipe: Recipe,
    world_size: int,
    *,
    n_samples: int | None = None,
    micro_batches_per_epoch: int | None = None,
) -> Plan:
    """Per-device batch, accumulation and step counts; errors say which number does not divide.

    ``micro_batches_per_epoch`` is what every rank can yield each epoch (the minimum over ranks
    and epochs when shards split unevenly); without it, it is derived from ``n_samples``.
    """
    per_device = per_device_batch(recipe, world_size)
    if recipe.global_batch % (world_size * per_device):
        raise ValueError(
            f"global batch {recipe.global_batch} is not a multiple of world size {world_size} x "
            f"per-device batch {per_device}"
        )
    grad_accum = recipe.global_batch // (world_size * per_device)
    if micro_batches_per_epoch is None:
        if n_samples is None:
            raise ValueError("make_plan needs n_samples or micro_batches_per_epoch")
        micro_batches_per_epoch = n_samples // (world_size * per_device)
    steps_per_epoch = micro_batches_per_epoch // grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"an epoch of {micro_batches_per_epoch} micro-batches of {per_device} per rank is less "
            f"than one global batch ({recipe.global_batch}): too few training samples"
        )
    total = recipe.max_steps or max(1, math.ceil(recipe.epochs * steps_per_epoch))
    if recipe.updating == "connector":
        llm_start = total
    elif recipe.updating == "full":
        llm_start = int(round(recipe.connector_only_fraction * total))
    else:
        llm_start = 0
    return Plan(world_size, per_device, grad_accum, steps_per_epoch, total, llm_start)


def lr_factor(step: int, start: int, total: int, warmup_ratio: float) -> float:
    """Cosine decay with linear warmup over the steps [start, total); 0 before ``start``."""
    if step < start:
        return 0.0
    span = max(1, total - start)
    warmup = max(1, math.ceil(warmup_ratio * span)) if warmup_ratio > 0 else 0
    done = step - start
    if done < warmup:
        return (done + 1) / warmup
    progress = (done - warmup) / max(1, span - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def trainable_groups(model: Any, recipe: Recipe) -> list[dict]:
    """Optimizer parameter groups; sets ``requires_grad`` once for the whole run.

    The LLM of a ``full`` pretraining learns from the start in autograd's eyes (so DDP/FSDP
    see a fixed set of trainable parameters), but its gradients are dropped before every
    optimizer step until its start step, so AdamW leaves it bit-identical until then.
    """
    groups = model.parameter_groups()
    for param in groups["vision"]:
        param.requires_grad_(False)
    learns_connector = recipe.updating in ("connector", "full")
    learns_llm = recipe.updating in ("full", "llm")
    for param in groups["connector"]:
        param.requires_grad_(learns_connector)
    for param in groups["llm"]:
        param.requires_grad_(learns_llm)
    out = []
    if learns_connector:
        out.append({"params": groups["connector"], "lr": recipe.connector_lr, "name": "connector"})
    if learns_llm:
        out.append({"params": groups["llm"], "lr": recipe.llm_lr, "name": "llm"})
    return out


def drop_gradients(params: list) -> None:
    """Forget the gradients of ``params``: AdamW skips parameters whose grad is None."""
    for param in params:
        param.grad = None


# --- checkpoints -------------------------------------------------------------------------------
#
# state_dir/step-NNNNNNNN/ appears by one rename once every rank has written its part:
#   weights/              torch.distributed.checkpoint (DCP): trainable weights ("model.*") and
#                         AdamW state ("optimizer.*"). Under FSDP every rank writes
#                         its own shards (nothing is gathered); replicated tensors (one process,
#                         DDP) are written once, tensors only (no pickles to load back).
#   deepspeed/            under DeepSpeed ZeRO-3 instead: the engine's own partitioned checkpoint
#   param_groups.json     the optimizer's hyper-parameters (learning rates, parameter names)
#   scheduler.pt          the LR scheduler (plain numbers; loaded with weights_only)
#   position.json         step, epoch and micro-batch within the epoch
#   rng-rank{r}.*         each rank's torch (and CUDA) RNG in safetensors, Python's in JSON

WEIGHTS_DIR = "weights"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def _is_deepspeed(accelerator: Any) -> bool:
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _is_sharded(accelerator: Any) -> bool:
    """FSDP or DeepSpeed: each rank holds only a shard of the weights."""
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of ``optimizer`` (AdamW) its state now: zeros and step 0, exactly
    what AdamW creates at a parameter's first step, so training is unchanged.

    Checkpoints need it. FSDP's optimizer state dict refuses a flat parameter whose trainable
    weights hold state only in part (the LLM before its start step, beside the connector), and
    torch's ``get_state_dict`` would otherwise initialize a rank that holds no state yet with a
    real step. The optimizer's own code makes the state: one step with zero gradients at lr 0
    (the weights do not move), then the step counts go back to 0.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if optimizer.state or not params:
        return
    if any(p.grad is not None for p in params):
        raise ValueError("init_optimizer_state: call it before the first backward pass")
    for param in params:
        param.grad = torch.zeros_like(param)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        if "step" in state:
            step = state["step"]
            state["step"] = torch.zeros_like(step) if torch.is_tensor(step) else 0


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen weights (the tower; the LLM in connector-only recipes) come back from their files
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _no_dist() -> bool:
    """DCP without a process group (one process)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def _quiet_checkpointing() -> Iterator[None]:
    """Silence two expected messages: DCP's warning on every single-process save and load (even
    when asked for one), and FSDP's line per frozen weight left out of a checkpoint on purpose."""
    fsdp_log = logging.getLogger("torch.distributed.fsdp._state_dict_utils")
    level = fsdp_log.level
    fsdp_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    finally:
        fsdp_log.setLevel(level)


def _save_sharded_state(directory: Path, model: Any, optimizer: Any) -> list[dict]:
    """Write trainable weights and optimizer state with DCP; return the param groups.

    A collective: every rank calls it with the model and optimizer ``accelerator.prepare`` gave.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(
        model, _torch_optimizer(optimizer), options=_state_dict_options()
    )
    for fqn, state in optim["state"].items():
        for name, value in state.items():
            if not torch.is_tensor(value):
                # DCP would pickle it, and loading it would unpickle
                raise ValueError(f"optimizer state {fqn}.{name} is a {type(value).__name__}")
    with _quiet_checkpointing():
        dcp.save(
            {"model": weights, "optimizer": optim["state"]},
            checkpoint_id=directory,
            no_dist=_no_dist(),
        )
    return optim["param_groups"]


def _load_sharded_state(path: Path, model: Any, optimizer: Any) -> None:
    """Restore what ``_save_sharded_state`` wrote into the prepared model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = path / WEIGHTS_DIR
    inner = _torch_optimizer(optimizer)
    # this run's tensors (shards under FSDP; state from init_optimizer_state) to fill in place
    weights, optim = get_state_dict(model, inner, options=_state_dict_options())
    state = optim["state"]
    stored = set(dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata)
    wanted = [f"model.{name}" for name in weights]
    wanted += [f"optimizer.{fqn}.{key}" for fqn, entry in state.items() for key in entry]
    missing = [key for key in wanted if key not in stored]
    if missing:
        raise ValueError(f"{directory}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    groups = _read_param_groups(path / "param_groups.json")
    with _quiet_checkpointing():
        dcp.load(
            {"model": weights, "optimizer": state}, checkpoint_id=directory, no_dist=_no_dist()
        )
        set_state_dict(
            model,
            inner,
            model_state_dict=weights,
            optim_state_dict={"state": state, "param_groups": groups},
            options=_state_dict_options(),
        )


def _write_param_groups(groups: list[dict], path: Path) -> None:
    for group in groups:
        for key, value in group.items():
            if torch.is_tensor(value):
                raise ValueError(f"optimizer param group {group.get('name')}: {key} is a tensor")
    path.write_text(json.dumps(groups, indent=1))


def _read_param_groups(path: Path) -> list[dict]:
    """JSON gives lists for tuples (AdamW's betas); ``params`` (parameter names) is a list."""
    groups = json.loads(path.read_text())
    return [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in groups
    ]


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    return tensors, {"python": random.getstate()}


def _set_rng_state(tensors: dict[str, torch.Tensor], other: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = other["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(
    state_dir: Path, step: int, model: Any, optimizer, scheduler, position: dict, accelerator=None
) -> Path:
    """Write ``state_dir/step-NNNNNNNN/`` atomically; keep only the newest two checkpoints.

    ``model`` and ``optimizer`` are what ``accelerator.prepare`` returned (FSDP / DeepSpeed
    wrapped, or the plain ones). A collective: every rank must call it at the same step. Every
    rank writes its RNG state and its shard of weights and optimizer into one temporary folder;
    rank 0 then writes the rest and renames the folder into place, so a save killed half-way
    leaves only a temporary folder, which ``latest_checkpoint`` never matches.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    barrier = accelerator.wait_for_everyone if accelerator is not None else (lambda: None)
    target = state_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = state_dir / f".{target.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_tensors, rng_other = _rng_state()
    save_file(rng_tensors, tmp / f"rng-rank{rank}.safetensors")
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rng_other))
    if _is_deepspeed(accelerator):
        # ZeRO-3 partitions live in the engine: its own (collective) sharded save
        model.save_checkpoint(
            str(tmp / DEEPSPEED_DIR),
            tag=DEEPSPEED_TAG,
            save_latest=False,
            exclude_frozen_parameters=True,
        )
        groups = None
    else:
        groups = _save_sharded_state(tmp / WEIGHTS_DIR, model, optimizer)
    barrier()
    if rank == 0:
        if groups is not None:
            _write_param_groups(groups, tmp / "param_groups.json")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "position.json").write_text(json.dumps({**position, "step": step}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        for old in sorted(state_dir.glob(f"{CHECKPOINT_PREFIX}*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return target


def latest_checkpoint(state_dir: Path) -> Path | None:
    """The newest complete checkpoint (temp folders of a killed save are never matched, nor
    folders of an older layout without ``weights/`` or ``deepspeed/``)."""
    found = sorted(
        p
        for p in state_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if (p / WEIGHTS_DIR).is_dir() or (p / DEEPSPEED_DIR).is_dir()
    )
    return found[-1] if found else None


def load_checkpoint(
    path: Path, model: Any, optimizer, scheduler, rank: int = 0, accelerator=None
) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``path``; return the data position.

    ``model`` and ``optimizer`` as for ``save_checkpoint``; a collective as well.
    """
    if (path / DEEPSPEED_DIR).is_dir():
        if not _is_deepspeed(accelerator):
            raise ValueError(f"{path}: a DeepSpeed checkpoint, but this run is not DeepSpeed")
        # the engine's own loader: partitions, fp32 master weights and optimizer state
        loaded, _ = model.load_checkpoint(
            str(path / DEEPSPEED_DIR),
            tag=DEEPSPEED_TAG,
            load_module_strict=False,  # frozen weights were not saved
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if loaded is None:
            raise ValueError(f"{path / DEEPSPEED_DIR}: DeepSpeed found no checkpoint")
    elif (path / WEIGHTS_DIR).is_dir():
        if _is_deepspeed(accelerator):
            raise ValueError(f"{path}: not a DeepSpeed checkpoint, but this run is DeepSpeed")
        _load_sharded_state(path, model, optimizer)
    else:
        raise ValueError(f"{path}: neither {WEIGHTS_DIR}/ nor {DEEPSPEED_DIR}/ inside")
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rank_file = path / f"rng-rank{rank}.safetensors"
    if rank_file.exists():
        _set_rng_state(
            load_file(rank_file), json.loads((path / f"rng-rank{rank}.json").read_text())
        )
    return json.loads((path / "position.json").read_text())


def save_model(accelerator: Any, model: Any, out_dir: Path, extra_meta: dict) -> None:
    """Save the trained model (as ``accelerator.prepare`` returned it) to ``out_dir`` from rank 0.

    Under FSDP / ZeRO-3 each rank holds a shard: ``accelerator.get_state_dict`` gathers the full
    weights on rank 0 (a collective, called on every rank); the model's ``save`` writes them.
    """
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        _save_with_state(accelerator.unwrap_model(model), out_dir, extra_meta, state)
    accelerator.wait_for_everyone()


def _save_with_state(model: Any, out_dir: Path, extra_meta: dict, state: dict) -> None:
    """``model.save`` with the gathered ``state`` (models whose save takes none: their own)."""
    if "state_dict" in inspect.signature(model.save).parameters:
        model.save(out_dir, extra_meta=extra_meta, state_dict=state)
    else:
        model.save(out_dir, extra_meta)


def check_saveable(model: Any, accelerator: Any) -> None:
    """Fail before training when the final save could not take gathered (sharded) weights."""
    takes_state = "state_dict" in inspect.signature(model.save).parameters
    if _is_sharded(accelerator) and not takes_state:
        raise ValueError(
            f"{type(model).__name__}.save() takes no state_dict: the gathered weights of "
            "FSDP / DeepSpeed training could not be saved"
        )


# --- the loop ----------------------------------------------------------------------------------


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
    on_step: Callable[[int, Any], None] | None = None,
    finish: Callable[[Any, TrainResult], None] | None = None,
) -> TrainResult:
    """Train ``model`` (a VLM with ``parameter_groups()``) by ``recipe`` / ``plan``.

    ``batches(epoch, skip)`` yields this rank's micro-batches of one epoch (dicts for
    ``model(**batch)``), skipping the first ``skip`` (already consumed before a resume).
    Resumes from the newest checkpoint in ``state_dir`` if there is one. ``on_step(step, model)``
    is called after every optimizer step (observation only); ``finish(model, result)`` on every
    rank after the last one, with the model ``accelerator.prepare`` returned (e.g. ``save_model``).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = accelerator or Accelerator(gradient_accumulation_steps=plan.grad_accum)
    torch.manual_seed(seed)
    random.seed(seed)
    groups = trainable_groups(model, recipe)
    optimizer = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    starts = [plan.llm_start_step if g["name"] == "llm" else 0 for g in groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [
            (lambda s, st=st: lr_factor(s, st, plan.total_steps, recipe.warmup_ratio))
            for st in starts
        ],
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if not _is_deepspeed(accelerator):  # DeepSpeed's optimizer makes its own state
        init_optimizer_state(_torch_optimizer(optimizer))
    state_dir.mkdir(parents=True, exist_ok=True)

    step, micro_in_epoch, epoch, resumed = 0, 0, 0, 0
    checkpoint = latest_checkpoint(state_dir)
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
    llm_params = [p for g in groups if g["name"] == "llm" for p in g["params"]]

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
    started, tokens, last_loss, micro_losses = time.perf_counter(), 0, float("nan"), []
    micro_per_epoch = plan.steps_per_epoch * plan.grad_accum
    try:
        model.train()
        while step < plan.total_steps:
            consumed = 0
            for batch in batches(epoch, micro_in_epoch):
                consumed += 1
                with accelerator.accumulate(model):
                    out = model(**batch)
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients:
                        if step < plan.llm_start_step:
                            drop_gradients(llm_params)  # the connector-only phase
                        # all of model.parameters(): FSDP's shard-aware clipping needs them
                        accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                        scheduler_due = True
                    else:
                        scheduler_due = False
                    optimizer.step()  # a no-op until the accumulation cycle completes
                    optimizer.zero_grad(set_to_none=True)
                micro_in_epoch += 1
                tokens += _lm_positions(accelerator.unwrap_model(model), batch)
                micro_losses.append(float(out.loss.detach()))
                if not scheduler_due:
                    continue
                scheduler.step()
                step += 1
                last_loss, micro_losses = sum(micro_losses) / len(micro_losses), []
                if step == plan.llm_start_step and llm_params:
                    log.info("step %d: the LLM learns from now on", step)
                _log_step(
                    log_file,
                    accelerator,
                    step,
                    epoch,
                    last_loss,
                    optimizer,
                    tokens,
                    time.perf_counter() - started,
                    flops_per_token,
                    peak_flops,
                )
                if on_step is not None:
                    on_step(step, accelerator.unwrap_model(model))
                bar.set_postfix(loss=f"{last_loss:.3f}")
                bar.update(1)
                end_of_epoch = micro_in_epoch >= micro_per_epoch
                if end_of_epoch:
                    epoch, micro_in_epoch = epoch + 1, 0
                stopping = _any_rank(stop.requested, accelerator)
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


def _lm_positions(model: Any, batch: dict) -> int:
    """Positions the LM processes in a batch: text tokens plus each spliced image's patches."""
    count = int(batch["attention_mask"].sum())
    pixels = batch.get("pixel_values")
    patches = getattr(getattr(model, "vision", None), "num_patches", None)
    if pixels is not None and patches:
        count += int(pixels.shape[0]) * (patches - 1)  # the placeholder became num_patches
    return count


def _log_step(log_file, accelerator, step, epoch, loss, optimizer, tokens, elapsed, fpt, peak):
    """One JSON line per optimizer step: loss, learning rates, tokens/s and (with peak FLOPs) MFU."""
    if not (log_file and accelerator.is_main_process):
        return
    record = {
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
        "tokens_per_s": tokens / elapsed if elapsed else None,
        "mfu": fpt * tokens / elapsed / peak if (fpt and peak and elapsed) else None,
    }
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()


def plan_summary(plan: Plan, recipe: Recipe) -> dict:
    return {"plan": asdict(plan), "recipe": asdict(recipe), "pid": os.getpid()}


# --- a stage, end to end: model + data + loop + save -------------------------------------------


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
    model = vlm_lib.build_vlm(clip_dir, llm_dir, template=template, seed=spec["seed"])
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

    Samples are shuffled within each shard through a seeded buffer of ``shuffle_buffer``."""
    from accelerate import Accelerator, PartialState
    from torch.utils.data import DataLoader

    from fgvlm.data.shards import conversation_dataset

    recipe = Recipe.from_config(spec["recipe"])
    seed = spec["seed"]
    state = PartialState(cpu=device == "cpu")
    workers = dataloader_workers
    micro = micro_batches_per_epoch(
        data_dir, recipe, world_size=state.num_processes, seed=seed, workers=workers
    )
    plan = make_plan(recipe, state.num_processes, micro_batches_per_epoch=micro)
    log.info("plan: %s", plan)
    accelerator = Accelerator(
        cpu=device == "cpu",
        mixed_precision="bf16" if device == "cuda" else "no",
        gradient_accumulation_steps=plan.grad_accum,
    )
    torch.manual_seed(seed)
    model = initial_model(
        spec,
        clip_dir=clip_dir,
        llm_dir=llm_dir,
        init_dir=init_dir,
        base_dir=base_dir,
        device=str(accelerator.device),
    )
    collate = model.collate_fn(max_length=recipe.max_length)
    if accelerator.device.type == "cuda" and not os.environ.get("FSDP_ACTIVATION_CHECKPOINTING"):
        # activation memory of 7B LMs; under FSDP the accelerate config does it instead
        language_model = getattr(model, "llm", None) or model.model  # LlavaVLM / TrainableHubVLM
        language_model.gradient_checkpointing_enable()

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

    check_saveable(model, accelerator)
    if accelerator.is_main_process:
        prepare_state_dir(state_dir, spec)
    accelerator.wait_for_everyone()
    summary: dict = {}

    def finish(prepared: Any, result: TrainResult) -> None:
        summary.update(spec=spec, plan=asdict(plan), result=asdict(result))
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
    if accelerator.is_main_process:
        for checkpoint in state_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(checkpoint)  # the job is complete: nothing left to resume
    accelerator.wait_for_everyone()
    return summary


def prepare_state_dir(state_dir: Path, spec: dict) -> None:
    """Resume only a run of the same spec: state left by another spec is discarded."""
    marker = state_dir / "spec.json"
    wanted = json.dumps(spec, sort_keys=True)
    if state_dir.exists() and (not marker.exists() or marker.read_text() != wanted):
        log.warning("%s: state of a different spec; starting afresh", state_dir)
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        with io.atomic_path(marker) as tmp:
            tmp.write_text(wanted)
