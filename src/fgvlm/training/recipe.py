"""Who learns when: a stage's recipe, the run's arithmetic, and every parameter group's schedule.

A recipe (``config.recipes``, merged with a row's overrides) says which weights learn and when
(the paper's Appendix C):

- ``pretrain`` + ``connector``: connector only (lr 1e-3), LLM and vision tower frozen;
- ``pretrain`` + ``full``: connector only for the first ``connector_only_fraction`` (20%) of the
  steps, then the LLM too (lr 2e-5) for the rest; the connector keeps its rate, or switches to
  ``connector_lr_after_unfreeze`` when the LLM starts (the paper leaves it open);
- ``finetune`` + ``full``: connector and LLM (lr 2e-5);
- ``finetune`` + ``llm``: the LLM only (the Qwen2-VL architecture row).

The vision tower is always frozen. ``group_schedules`` is the one answer to "who learns when":
the loop builds its optimizer, schedules and gradient dropping from it, and logs it
(``describe``). Schedules are cosine with linear warmup (``warmup_ratio``); a group that starts
late (the LLM after the connector-only phase) warms up from its start. A group whose base rate
switches (the connector at the LLM's start) keeps its multiplier curve across the switch: only
the base rate changes (``lr_multiplier``). Gradient accumulation is global batch / (world size x
per-device batch).

This module imports no torch: ``fgvlm.config`` asks it which recipe a row trains with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

# the keys of every trainable model's parameter_groups(), in the order they are logged
GROUPS = ("vision", "connector", "llm")
# how a multi-GPU stage holds its weights (``Recipe.resolved_sharding``): DDP on a replica per
# GPU, FSDP sharded within a node and replicated across nodes, FSDP sharded across all GPUs
SHARDINGS = ("auto", "replicate", "hybrid", "full")


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
    connector_lr_after_unfreeze: float | None = None
    per_device_batch: int | None = None
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    max_length: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    group_batches: int = 0
    activation_checkpointing: bool = True
    sharding: str = "auto"
    compile: bool = False

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
        after = self.connector_lr_after_unfreeze
        if after is not None:
            if isinstance(after, bool) or not isinstance(after, int | float) or after <= 0:
                raise ValueError(
                    f"recipe.connector_lr_after_unfreeze: {after!r} is not a positive number"
                )
            if self.updating != "full":
                raise ValueError(
                    "recipe.connector_lr_after_unfreeze: only an updating 'full' recipe unfreezes "
                    f"the LLM after the connector, not {self.updating!r}"
                )
        if self.sharding not in SHARDINGS:
            raise ValueError(f"recipe.sharding: {self.sharding!r} is not one of {SHARDINGS}")

    def resolved_sharding(self) -> str:
        """``sharding`` with ``auto`` decided: a connector-only recipe trains a few million
        parameters beside a frozen LLM, so a bf16 replica per GPU with DDP on the connector beats
        sharding frozen weights across nodes; a recipe that trains the LLM shards within a node
        and replicates across nodes (``hybrid``: its all-gathers stay on NVLink)."""
        if self.sharding != "auto":
            return self.sharding
        return "replicate" if self.updating == "connector" else "hybrid"


def recipe_for(stage: str, *, updating: str, arch: str) -> str:
    """The ``config.recipes`` entry a trained ablation row uses for ``stage``.

    Pretraining updates what the row's ``updating`` says (the connector, or everything after a
    connector-only phase); finetuning updates connector and LLM, except for a Qwen2-VL base,
    whose LLM alone learns (its merger stays as released).
    """
    if stage == "pretrain":
        return "pretrain_full" if updating == "full" else "pretrain_connector"
    return "finetune_llm_only" if arch == "qwen2_vl" else "finetune"


@dataclass(frozen=True)
class Plan:
    """The run's arithmetic, fixed before the first step."""

    world_size: int
    per_device_batch: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int


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
    return Plan(world_size, per_device, grad_accum, steps_per_epoch, total)


@dataclass(frozen=True)
class GroupSchedule:
    """When one parameter group learns: from optimizer step ``start_step`` at ``lr``, and from
    ``switch_step`` on at ``switch_lr`` (None: ``lr`` to the end).

    ``lr`` None: frozen for the whole run (then ``start_step`` is the run's total: never).
    """

    name: str
    lr: float | None
    start_step: int
    switch_step: int | None = None
    switch_lr: float | None = None

    @property
    def frozen(self) -> bool:
        return self.lr is None

    def base_lr(self, step: int) -> float | None:
        """The rate the multiplier curve scales at optimizer step ``step``."""
        if self.switch_step is not None and step >= self.switch_step:
            return self.switch_lr
        return self.lr


def group_schedules(recipe: Recipe, plan: Plan) -> list[GroupSchedule]:
    """Every parameter group of ``GROUPS``, frozen or with its learning rate and first step."""
    lrs = {
        "vision": None,
        "connector": recipe.connector_lr if recipe.updating in ("connector", "full") else None,
        "llm": recipe.llm_lr if recipe.updating in ("full", "llm") else None,
    }
    late = {"llm": int(round(recipe.connector_only_fraction * plan.total_steps))}
    if recipe.updating != "full":
        late = {}
    schedules = [
        GroupSchedule(name, lrs[name], plan.total_steps if lrs[name] is None else late.get(name, 0))
        for name in GROUPS
    ]
    if recipe.connector_lr_after_unfreeze is not None:
        at = GROUPS.index("connector")
        schedules[at] = replace(
            schedules[at], switch_step=late["llm"], switch_lr=recipe.connector_lr_after_unfreeze
        )
    return schedules


def describe(recipe: Recipe, schedules: list[GroupSchedule]) -> list[str]:
    """One log line per group: ``group llm: learns from step 48 (after 20% connector-only
    warmup), lr 2e-5``, ``group connector: learns from step 0, lr 1e-3, lr 2e-5 from step 48
    (LLM unfrozen)``, ``group vision: frozen``."""
    lines = []
    for group in schedules:
        if group.frozen:
            lines.append(f"group {group.name}: frozen")
            continue
        after = ""
        if group.start_step:
            after = f" (after {recipe.connector_only_fraction:.0%} connector-only warmup)"
        switch = ""
        if group.switch_step is not None:
            switch = (
                f", lr {_short_float(group.switch_lr)} from step {group.switch_step} (LLM unfrozen)"
            )
        lines.append(
            f"group {group.name}: learns from step {group.start_step}{after}, "
            f"lr {_short_float(group.lr)}{switch}"
        )
    return lines


def _short_float(value: float) -> str:
    """1e-3 -> ``1e-3``, 2.5e-05 -> ``2.5e-5``."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def trainable_groups(model: Any, schedules: list[GroupSchedule]) -> list[dict]:
    """Optimizer parameter groups of the groups that learn; sets ``requires_grad`` for the run.

    A group that starts late learns from the start in autograd's eyes (DDP and DeepSpeed
    register the trainable parameters once, at ``prepare``), but the loop drops its gradients
    before every optimizer step until its start step, so AdamW leaves it bit-identical until then.
    """
    params = model.parameter_groups()
    if set(params) != set(GROUPS):
        raise ValueError(f"parameter_groups() gave {sorted(params)}, not {sorted(GROUPS)}")
    out = []
    for group in schedules:
        for param in params[group.name]:
            param.requires_grad_(not group.frozen)
        if not group.frozen:
            out.append({"params": params[group.name], "lr": group.lr, "name": group.name})
    return out


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


def lr_multiplier(group: GroupSchedule, step: int, total: int, warmup_ratio: float) -> float:
    """What the scheduler multiplies ``group.lr`` (the optimizer's base rate) by at ``step``.

    The curve is ``lr_factor`` from the group's start; a switch of base rate scales it from
    ``switch_step`` on, so the connector continues its cosine at the new rate (no new warmup).
    """
    return lr_factor(step, group.start_step, total, warmup_ratio) * group.base_lr(step) / group.lr
