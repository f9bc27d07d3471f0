"""The training speed items keep the results: length grouping (same samples, exact resume, less
padding), truncation counts, fused AdamW, sparse logging, activation checkpointing, sharding."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import make_batches, run

from fgvlm.data.shards import conversation_dataset, sample_length, write_conversation_shards
from fgvlm.training.loop import make_optimizer
from fgvlm.training.recipe import Recipe
from fgvlm.training.stage import apply_sharding, flops_per_position

TWO_WORKERS = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """240 samples, a third text-only, answer lengths from a long-tailed draw."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(240):
        words = int(min(rng.pareto(1.5) * 5, 60)) + 1  # long-tailed, capped like max_length
        answer = " ".join(["w"] * words)
        image = i % 3 != 0
        question = "<image>\ndescribe" if image else "describe"
        record = {
            "id": f"s{i}",
            "conversations": [
                {"from": "human", "value": question},
                {"from": "gpt", "value": answer},
            ],
        }
        if image:
            record["image"] = f"i{i}.png"
        samples.append((record, _png() if image else None))
    out = tmp_path_factory.mktemp("grouping") / "shards"
    write_conversation_shards(samples, out, samples_per_shard=7)
    return out


def _batches(shard_dir: Path, *, group: int, skip: int = 0, workers: int = 2) -> list[list[str]]:
    dataset = conversation_dataset(
        shard_dir,
        rank=1,
        world_size=2,
        seed=4,
        epoch=1,
        shuffle_buffer=3,
        skip_batches=skip,
        batch_size=3,
        group_batches=group,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=3, num_workers=workers, collate_fn=list
    )
    return [[record["id"] for record, _ in batch] for batch in loader]


def _lengths(shard_dir: Path) -> dict[str, tuple[bool, int]]:
    import tarfile

    out = {}
    for tar_path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    raw = tar.extractfile(member).read()
                    record = json.loads(raw)
                    sample = {"json": raw, **({"png": b""} if "image" in record else {})}
                    out[record["id"]] = sample_length(sample)
    return out


def _padding(batches: list[list[str]], lengths: dict) -> float:
    """Padded positions / all positions, with words as lengths."""
    pad = total = 0
    for batch in batches:
        sizes = [lengths[i][1] for i in batch]
        pad += max(sizes) * len(sizes) - sum(sizes)
        total += max(sizes) * len(sizes)
    return pad / total


@TWO_WORKERS
def test_length_grouping_same_samples_less_padding_exact_resume(shard_dir: Path) -> None:
    plain = _batches(shard_dir, group=0)
    grouped = _batches(shard_dir, group=10)
    assert sorted(sum(plain, [])) == sorted(sum(grouped, []))  # the rank's samples, reordered
    assert grouped != plain and [len(b) for b in grouped] == [len(b) for b in plain]
    lengths = _lengths(shard_dir)
    assert _padding(grouped, lengths) < 0.7 * _padding(plain, lengths)
    mixed = [b for b in grouped if len({lengths[i][0] for i in b}) > 1]
    assert len(mixed) <= 2 * 2  # at most the modality boundary of each window of each worker
    assert _batches(shard_dir, group=10) == grouped  # seeded
    for skip in (1, 2, 7, 19, 20, 23, len(grouped) - 1, len(grouped)):
        assert _batches(shard_dir, group=10, skip=skip) == grouped[skip:], skip


def test_truncation_is_counted_and_cuts_as_before(tmp_path: Path) -> None:
    from _tiny import training_assets

    from fgvlm.data.shards import decode_conversation
    from fgvlm.models.vlm import build_vlm

    assets = training_assets(tmp_path, llm_layers=1, samples_per_shard=64)
    model = build_vlm(assets["clip_dir"], assets["llm_dir"], template="vicuna_v1", seed=0)
    dataset = conversation_dataset(assets["data_dir"], rank=0, world_size=1, seed=0)
    samples = [s for s in dataset if s[1] is not None][:6]  # image rows: one limit for all
    full = model.collate_fn()(samples)
    lengths = full["attention_mask"].sum(1)
    limit = int(lengths.max()) - 1  # cuts the longest rows by one token
    counted = model.collate_fn(
        max_length=limit + model.vision.num_patches - 1, count_truncated=True
    )
    plain = model.collate_fn(max_length=limit + model.vision.num_patches - 1)
    expected = int((lengths > limit).sum())
    assert expected > 0 and counted(samples)["truncated"] == expected
    batch = counted(samples)
    del batch["truncated"]
    for key, value in plain(samples).items():
        assert value is None or torch.equal(value, batch[key]), key
    assert decode_conversation  # the shards decode through the real reader


def test_fused_adamw_takes_the_same_steps() -> None:
    recipe = Recipe.from_config(
        dict(stage="finetune", updating="llm", llm_lr=1e-2, global_batch=4, weight_decay=0.1)
    )
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        layer = torch.nn.Linear(8, 8)
        optimizer = make_optimizer(
            [{"params": list(layer.parameters()), "lr": 1e-2}], recipe, fused=fused
        )
        for step in range(5):
            loss = layer(torch.full((2, 8), float(step))).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append([p.detach().clone() for p in layer.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_logging_every_n_steps_changes_nothing_but_the_log(tmp_path: Path) -> None:
    every, _, _, result_every = run(tmp_path / "a", "full", steps=10, log_path=tmp_path / "a.jsonl")
    sparse, _, _, result_sparse = run(
        tmp_path / "b", "full", steps=10, log_path=tmp_path / "b.jsonl", log_every=4
    )
    for key, value in every.state_dict().items():
        assert torch.equal(value, sparse.state_dict()[key]), key
    sparse_log = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in sparse_log if "loss" in r]
    assert steps == [4, 8, 10]
    dense = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    dense = [r for r in dense if "loss" in r]
    assert [r["step"] for r in dense] == list(range(1, 11))
    assert all(r["tokens_per_s"] > 0 for r in dense)
    # a sparse line's loss is the mean over its window (steps 9 and 10)
    assert result_sparse.final_loss == pytest.approx((dense[-2]["loss"] + dense[-1]["loss"]) / 2)
    assert sparse_log[1]["loss"] == pytest.approx(sum(r["loss"] for r in dense[4:8]) / 4)
    assert result_every.final_loss == dense[-1]["loss"]


def test_epoch_end_states_samples_seen_of_total(tmp_path: Path) -> None:
    from _tiny import FakeVLM

    from fgvlm.training.loop import train
    from fgvlm.training.recipe import make_plan

    recipe = Recipe.from_config(
        dict(stage="pretrain", updating="connector", connector_lr=1e-2, global_batch=2, epochs=2)
    )
    plan = make_plan(recipe, 1, micro_batches_per_epoch=3)
    train(
        FakeVLM(),
        make_batches(3),
        recipe,
        plan,
        tmp_path / "state",
        seed=0,
        log_path=tmp_path / "log.jsonl",
        epoch_samples=7,
    )
    ends = [
        r
        for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())
        if "epoch_end" in r
    ]
    assert ends == [
        {"step": 3, "epoch_end": 0, "samples_seen": 6, "samples_total": 7, "truncated": 0},
        {"step": 6, "epoch_end": 1, "samples_seen": 6, "samples_total": 7, "truncated": 0},
    ]


def test_activation_checkpointing_gives_the_same_gradients(tmp_path: Path) -> None:
    from _tiny import training_assets

    from fgvlm.models.vlm import build_vlm

    assets = training_assets(tmp_path, llm_layers=2, samples_per_shard=64)
    dataset = conversation_dataset(assets["data_dir"], rank=0, world_size=1, seed=0)
    samples = [sample for _, sample in zip(range(4), dataset, strict=False)]
    grads = []
    for checkpointing in (False, True):
        model = build_vlm(assets["clip_dir"], assets["llm_dir"], template="vicuna_v1", seed=0)
        if checkpointing:
            model.llm.gradient_checkpointing_enable()
        model.train()
        out = model(**model.collate_fn()(samples), use_cache=False)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_sharding_per_stage_sets_the_fsdp_environment() -> None:
    def recipe(**kw) -> Recipe:
        return Recipe.from_config(
            {**dict(stage="pretrain", connector_lr=1e-3, global_batch=8), **kw}
        )

    connector = recipe(updating="connector")
    full = recipe(updating="full", llm_lr=1e-5, activation_checkpointing=False)
    assert apply_sharding(connector, {}) == "none"  # no FSDP config: nothing to choose
    env = {"ACCELERATE_USE_FSDP": "true"}
    assert apply_sharding(connector, env) == "replicate" and env["ACCELERATE_USE_FSDP"] == "false"
    env = {"ACCELERATE_USE_FSDP": "true"}
    assert apply_sharding(full, env) == "hybrid"
    assert env["FSDP_SHARDING_STRATEGY"] == "HYBRID_SHARD"
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "false"
    env = {"ACCELERATE_USE_FSDP": "true"}
    apply_sharding(recipe(updating="full", llm_lr=1e-5, sharding="full"), env)
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    with pytest.raises(ValueError, match="recipe.sharding"):
        recipe(updating="connector", sharding="zero3")


def test_flops_per_position_counts_backward_only_where_it_runs() -> None:
    from _tiny import FakeVLM

    model = FakeVLM()
    groups = model.parameter_groups()
    llm = sum(p.numel() for p in groups["llm"])
    connector = sum(p.numel() for p in groups["connector"])
    base = dict(stage="pretrain", connector_lr=1e-3, llm_lr=1e-5, global_batch=8)
    frozen = flops_per_position(model, Recipe.from_config({**base, "updating": "connector"}))
    learning = flops_per_position(model, Recipe.from_config({**base, "updating": "full"}))
    assert frozen == 4 * llm + 6 * connector and learning == 6 * llm + 6 * connector
