"""The training loop's recipes: which weights learn and when; schedules; checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _tiny import FakeVLM

from fgvlm.training.checkpoint import latest_checkpoint
from fgvlm.training.loop import make_optimizer, make_scheduler, train
from fgvlm.training.recipe import (
    Recipe,
    group_schedules,
    lr_factor,
    make_plan,
    trainable_groups,
)


def make_batches(n_micro: int, batch: int = 2):
    gen = torch.Generator().manual_seed(123)
    data = [
        {
            "inputs": torch.randn(batch, 4, generator=gen),
            "targets": torch.randn(batch, generator=gen),
            "attention_mask": torch.ones(batch, 3, dtype=torch.long),
        }
        for _ in range(n_micro)
    ]

    def batches(epoch: int, skip: int):
        yield from data[skip:]

    return batches


def snapshot(model: FakeVLM) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict, after: dict, prefix: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


RECIPES = {
    "connector": dict(stage="pretrain", updating="connector", connector_lr=1e-2, global_batch=4),
    "full": dict(
        stage="pretrain",
        updating="full",
        connector_lr=1e-2,
        llm_lr=1e-2,
        connector_only_fraction=0.2,
        global_batch=4,
    ),
    "finetune": dict(
        stage="finetune", updating="full", connector_lr=2e-5, llm_lr=2e-5, global_batch=4
    ),
    "llm": dict(stage="finetune", updating="llm", llm_lr=1e-2, global_batch=4),
}
RECIPES["full_switch"] = dict(RECIPES["full"], connector_lr_after_unfreeze=1e-4)


def run(tmp_path, updating: str, steps: int = 10, stop_at: int | None = None, **kw):
    recipe = Recipe.from_config({**RECIPES[updating], "per_device_batch": 2, "max_steps": steps})
    plan = make_plan(recipe, 1, n_samples=4 * steps)
    model = FakeVLM()
    history = [snapshot(model)]

    def observe(step, m):
        history.append(snapshot(m))
        if step == stop_at:
            raise KeyboardInterrupt  # a job killed right after this step

    result = train(
        model,
        make_batches(steps * plan.grad_accum),
        recipe,
        plan,
        tmp_path / "state",
        seed=0,
        on_step=observe,
        **kw,
    )
    return model, plan, history, result


def llm_start(recipe: Recipe, plan) -> int:
    return {group.name: group.start_step for group in group_schedules(recipe, plan)}["llm"]


def test_plan_derives_accumulation_and_rejects_bad_batches():
    recipe = Recipe.from_config(dict(RECIPES["full"], global_batch=256, per_device_batch=4))
    plan = make_plan(recipe, 16, n_samples=558_128)
    assert (plan.grad_accum, plan.steps_per_epoch, plan.total_steps) == (4, 2180, 2180)
    assert llm_start(recipe, plan) == 436  # 20% connector-only warmup
    with pytest.raises(ValueError, match="not a multiple of world size 16 x per-device batch 6"):
        make_plan(
            Recipe.from_config(dict(RECIPES["full"], global_batch=256, per_device_batch=6)),
            16,
            n_samples=10**6,
        )
    with pytest.raises(ValueError, match="less than one global batch"):
        make_plan(recipe, 1, n_samples=100)
    with pytest.raises(ValueError, match="unknown fields"):
        Recipe.from_config({**RECIPES["connector"], "lr": 1})


def test_connector_only_changes_only_the_connector(tmp_path):
    model, plan, history, result = run(tmp_path, "connector")
    assert plan.grad_accum == 2 and result.steps == 10
    assert changed(history[0], history[-1], "connector")
    assert not changed(history[0], history[-1], "llm")
    assert not changed(history[0], history[-1], "vision")


def test_full_keeps_the_llm_frozen_for_the_first_20_percent(tmp_path):
    model, plan, history, _ = run(tmp_path, "full", steps=10)
    start = llm_start(Recipe.from_config({**RECIPES["full"], "max_steps": 10}), plan)
    assert start == 2
    for step in range(start + 1):
        assert not changed(history[0], history[step], "llm"), step
    assert changed(history[0], history[start + 1], "llm")
    assert changed(history[0], history[1], "connector")
    assert not changed(history[0], history[-1], "vision")


def test_llm_only_recipe(tmp_path):
    _, _, history, _ = run(tmp_path, "llm")
    assert changed(history[0], history[1], "llm")
    assert not changed(history[0], history[-1], "connector")


def test_resume_from_a_checkpoint_gives_identical_weights(tmp_path):
    full, _, _, _ = run(tmp_path / "a", "full", steps=10)
    # a run killed after step 7 (newest checkpoint: step 6), then a rerun that resumes there
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", "full", steps=10, checkpoint_every=3, stop_at=7)
    assert latest_checkpoint(tmp_path / "b" / "state").name == "step-00000006"
    resumed, _, _, result = run(tmp_path / "b", "full", steps=10, checkpoint_every=3)
    assert result.resumed_from == 6
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_lr_schedule_warms_up_then_decays():
    factors = [lr_factor(s, 0, 100, 0.03) for s in range(100)]
    assert factors[0] == pytest.approx(1 / 3) and factors[2] == 1.0
    assert factors[50] < factors[10] and factors[-1] < 0.01
    assert lr_factor(5, 20, 100, 0.03) == 0.0  # before a late group's start
    assert lr_factor(20, 20, 100, 0.03) == pytest.approx(1 / 3)


def scheduled_lrs(recipe: Recipe, steps: int) -> list[dict[str, float]]:
    """Each optimizer step's rate per group, read off the param_groups the loop's own optimizer
    and scheduler give, after each scheduler step."""
    plan = make_plan(recipe, 1, n_samples=4 * steps)
    schedules = group_schedules(recipe, plan)
    optimizer = make_optimizer(trainable_groups(FakeVLM(), schedules), recipe, fused=False)
    scheduler = make_scheduler(optimizer, schedules, recipe, plan)
    out = []
    for _ in range(plan.total_steps):
        out.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    return out


def cosine(done: int, span: int) -> float:
    """Warmup of one step (warmup_ratio 0.03 of <= 10 steps), then cosine over the rest."""
    return 1.0 if done == 0 else 0.5 * (1 + math.cos(math.pi * (done - 1) / (span - 1)))


@pytest.mark.parametrize("after", [None, 5e-5])
def test_connector_lr_after_the_llm_is_unfrozen(after):
    base = dict(RECIPES["full"], connector_lr=1e-3, llm_lr=2e-5, max_steps=10, per_device_batch=2)
    lrs = scheduled_lrs(Recipe.from_config({**base, "connector_lr_after_unfreeze": after}), 10)
    # 10 steps, 20% connector-only: the LLM learns from step 2, warming up from there
    assert [lr["llm"] for lr in lrs[:2]] == [0.0, 0.0]
    for step in range(2, 10):
        assert lrs[step]["llm"] == pytest.approx(2e-5 * cosine(step - 2, 8)), step
    for step in range(10):
        # the connector's curve runs on across the switch; only its base rate changes at step 2
        rate = 1e-3 if after is None or step < 2 else after
        assert lrs[step]["connector"] == pytest.approx(rate * cosine(step, 10)), step
    if after is not None:
        assert lrs[1]["connector"] == pytest.approx(1e-3 * cosine(1, 10))
        assert lrs[2]["connector"] == pytest.approx(5e-5 * cosine(2, 10))


def test_the_train_log_shows_the_connector_rate_switch(tmp_path):
    run(tmp_path, "full_switch", steps=10, log_path=tmp_path / "log.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # a log line after step s holds the rates of the next step
    connector = {row["step"]: row["lr"]["connector"] for row in rows if "lr" in row}
    assert connector[1] == pytest.approx(1e-2 * cosine(1, 10))
    assert connector[2] == pytest.approx(1e-4 * cosine(2, 10))
    assert connector[5] == pytest.approx(1e-4 * cosine(5, 10))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"connector_lr_after_unfreeze": -1e-3}, "-0.001 is not a positive number"),
        ({"connector_lr_after_unfreeze": "2e-5"}, "'2e-5' is not a positive number"),
        ({"connector_lr_after_unfreeze": True}, "True is not a positive number"),
        (
            {"updating": "connector", "connector_lr_after_unfreeze": 2e-5},
            "only an updating 'full' recipe unfreezes the LLM after the connector, not 'connector'",
        ),
    ],
)
def test_connector_lr_after_unfreeze_is_refused_where_it_means_nothing(fields, message):
    with pytest.raises(ValueError, match="recipe.connector_lr_after_unfreeze") as err:
        Recipe.from_config({**RECIPES["full"], **fields})
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("updating", "lines"),
    [
        (
            "connector",
            [
                "group vision: frozen",
                "group connector: learns from step 0, lr 1e-2",
                "group llm: frozen",
            ],
        ),
        (
            "full",
            [
                "group vision: frozen",
                "group connector: learns from step 0, lr 1e-2",
                "group llm: learns from step 2 (after 20% connector-only warmup), lr 1e-2",
            ],
        ),
        (
            "full_switch",
            [
                "group vision: frozen",
                "group connector: learns from step 0, lr 1e-2, lr 1e-4 from step 2 (LLM unfrozen)",
                "group llm: learns from step 2 (after 20% connector-only warmup), lr 1e-2",
            ],
        ),
        (
            "finetune",
            [
                "group vision: frozen",
                "group connector: learns from step 0, lr 2e-5",
                "group llm: learns from step 0, lr 2e-5",
            ],
        ),
        (
            "llm",
            [
                "group vision: frozen",
                "group connector: frozen",
                "group llm: learns from step 0, lr 1e-2",
            ],
        ),
    ],
)
def test_every_run_starts_by_logging_who_learns_when(tmp_path, caplog, updating, lines):
    caplog.set_level("INFO", logger="fgvlm.training.loop")
    run(tmp_path, updating, steps=10)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("group ")]
    assert logged == lines
