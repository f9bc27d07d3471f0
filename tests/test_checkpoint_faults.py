"""Damaged and tampered checkpoints: a resume verifies each checkpoint against its manifest
before reading it, falls back to the newest intact one, and never runs a pickle's code; the
log of a resumed run holds each step once; a finished job's final record re-emits its output."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import FakeVLM

from fgvlm.training.checkpoint import (
    FINAL_DIR,
    MANIFEST,
    latest_checkpoint,
    load_checkpoint,
    record_final,
    reemit_final,
    resumable_checkpoint,
)
from fgvlm.training.loop import train
from fgvlm.training.recipe import Recipe, make_plan

STEPS = 10
RECIPE = dict(
    stage="pretrain",
    updating="full",
    connector_lr=1e-2,
    llm_lr=1e-2,
    connector_only_fraction=0.2,
    global_batch=2,
    per_device_batch=2,
    max_steps=STEPS,
)


def run(state_dir: Path, stop_at: int | None = None, accelerator=None):
    """Ten steps of the real loop on ``FakeVLM``, checkpoints every 3; ``stop_at``: killed
    right after that step (newest checkpoint: the step before, a multiple of 3)."""
    world = accelerator.num_processes if accelerator is not None else 1
    recipe = Recipe.from_config({**RECIPE, "global_batch": 2 * world})
    plan = make_plan(recipe, world, n_samples=2 * world * STEPS)
    gen = torch.Generator().manual_seed(5)
    data = [
        {
            "inputs": torch.randn(2, 4, generator=gen),
            "targets": torch.randn(2, generator=gen),
            "attention_mask": torch.ones(2, 3, dtype=torch.long),
        }
        for _ in range(STEPS)
    ]

    def observe(step, model):
        if step == stop_at:
            raise KeyboardInterrupt

    model = FakeVLM()
    result = train(
        model,
        lambda epoch, skip: iter(data[skip:]),
        recipe,
        plan,
        state_dir,
        seed=0,
        checkpoint_every=3,
        log_path=state_dir / "train_log.jsonl",
        on_step=observe,
        accelerator=accelerator,
    )
    return model, result


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    model, _ = run(tmp_path_factory.mktemp("full") / "state")
    return model.state_dict()


def killed(state_dir: Path) -> Path:
    """A run killed after step 7: checkpoints 3 and 6 on disk; the newest returned."""
    with pytest.raises(KeyboardInterrupt):
        run(state_dir, stop_at=7)
    assert sorted(p.name for p in state_dir.glob("step-*")) == ["step-00000003", "step-00000006"]
    return latest_checkpoint(state_dir)


def same_weights(expected: dict, model) -> bool:
    return all(torch.equal(value, model.state_dict()[key]) for key, value in expected.items())


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: truncate(c / "weights" / "__0_0.distcp"), "weights/__0_0.distcp has"),
        (lambda c: truncate(c / "scheduler.pt"), "scheduler.pt has"),
        (lambda c: (c / "position.json").unlink(), "position.json is missing"),
        (lambda c: (c / MANIFEST).unlink(), f"no {MANIFEST}"),
        (lambda c: (c / "weights" / "extra.distcp").write_bytes(b"x"), "extra.distcp is not in"),
    ],
    ids=["truncated-distcp", "truncated-scheduler", "no-position", "no-manifest", "extra-file"],
)
def test_damaged_newest_checkpoint_falls_back_to_an_intact_one(
    tmp_path, caplog, uninterrupted, damage, reason
):
    state = tmp_path / "state"
    newest = killed(state)
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="fgvlm.training.checkpoint"):
        model, result = run(state)
    warning = next(r.getMessage() for r in caplog.records if "damaged checkpoint" in r.getMessage())
    assert str(newest) in warning and reason in warning
    assert result.resumed_from == 3
    assert same_weights(uninterrupted, model)


def test_same_size_corruption_is_caught_by_the_sha256(tmp_path, caplog, uninterrupted):
    state = tmp_path / "state"
    newest = killed(state)
    shard = newest / "weights" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="fgvlm.training.checkpoint"):
        model, result = run(state)
    assert "weights/__0_0.distcp does not match its sha256" in caplog.text
    assert result.resumed_from == 3 and same_weights(uninterrupted, model)


def logged_steps(state: Path) -> list[int]:
    """The steps of the train log's step lines (epoch-end lines left out)."""
    records = [json.loads(line) for line in (state / "train_log.jsonl").open()]
    return [r["step"] for r in records if "epoch_end" not in r]


def test_no_intact_checkpoint_starts_afresh(tmp_path, caplog, uninterrupted):
    state = tmp_path / "state"
    killed(state)
    for checkpoint in state.glob("step-*"):
        truncate(checkpoint / "scheduler.pt")
    with caplog.at_level(logging.WARNING, logger="fgvlm.training.checkpoint"):
        model, result = run(state)
    assert f"{state}: no intact checkpoint; training starts afresh" in caplog.text
    assert result.resumed_from == 0 and same_weights(uninterrupted, model)
    assert logged_steps(state) == list(range(1, STEPS + 1))


def test_resumed_log_holds_every_step_once(tmp_path):
    state = tmp_path / "state"
    killed(state)
    assert logged_steps(state) == list(range(1, 8))  # step 7 logged, its checkpoint never written
    _, result = run(state)
    assert result.resumed_from == 6
    assert logged_steps(state) == list(range(1, STEPS + 1))


class _Evil:
    """A pickle that writes a file when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _rewrite_manifest(checkpoint: Path) -> None:
    """What someone who may write the state folder can do: hashes matching the new files."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        data = (checkpoint / name).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def test_tampered_metadata_is_never_unpickled(tmp_path, caplog, uninterrupted):
    state = tmp_path / "state"
    newest = killed(state)
    marker = tmp_path / "code-ran"
    (newest / "weights" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    # the manifest no longer matches: the pickle is not even opened
    with caplog.at_level(logging.WARNING, logger="fgvlm.training.checkpoint"):
        model, result = run(state)
    assert "weights/.metadata" in caplog.text and not marker.exists()
    assert result.resumed_from == 3 and same_weights(uninterrupted, model)


def test_metadata_with_a_matching_manifest_admits_only_dcp_classes(tmp_path):
    state = tmp_path / "state"
    newest = killed(state)
    marker = tmp_path / "code-ran"
    (newest / "weights" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    _rewrite_manifest(newest)
    assert resumable_checkpoint(state) == newest
    model = FakeVLM()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(pickle.UnpicklingError, match="builtins.exec: not allowed"):
        load_checkpoint(newest, model, optimizer, scheduler)
    assert not marker.exists()


def test_final_record_reemits_the_output_and_refuses_a_damaged_one(tmp_path, caplog):
    out, state = tmp_path / "model", tmp_path / "model.state"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights" * 100)
    (out / "sub").mkdir()
    (out / "sub" / "meta.json").write_text("{}")
    record_final(out, state, "job-a", {"result": {"steps": 10}})
    original = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for path in sorted(out.rglob("*"), reverse=True):  # Snakemake's --rerun-incomplete
        path.unlink() if path.is_file() else path.rmdir()
    out.rmdir()
    assert reemit_final(state, out, "job-a") == {"result": {"steps": 10}}
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == original
    # a final record of other inputs is dropped silently; a damaged one with a warning
    assert reemit_final(state, tmp_path / "other", "job-b") is None
    assert not (state / FINAL_DIR).exists()
    record_final(out, state, "job-a", {})
    truncate(state / FINAL_DIR / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="fgvlm.training.checkpoint"):
        assert reemit_final(state, tmp_path / "again", "job-a") is None
    assert f"damaged final record {state / FINAL_DIR}: model.safetensors has" in caplog.text
    assert not (state / FINAL_DIR).exists() and not (tmp_path / "again").exists()


# --- two gloo processes: the ranks share the hashing and agree on the verdict ------------------

DRIVER = """
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from accelerate import Accelerator
torch.set_num_threads(1)
from fgvlm import logs
logs.setup()
args = json.loads(sys.argv[1])
sys.path.insert(0, args["tests"])
from test_checkpoint_faults import run
try:
    accelerator = Accelerator(cpu=True)  # gloo across the two processes
    _, result = run(Path(args["state"]), stop_at=args["stop_at"], accelerator=accelerator)
    print(json.dumps({"resumed_from": result.resumed_from}))
except KeyboardInterrupt:
    sys.exit(3)
finally:
    if dist.is_initialized():
        dist.destroy_process_group()
"""


def two_ranks(state: Path, stop_at: int | None) -> list[subprocess.CompletedProcess]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
    }
    args = json.dumps(
        {"state": str(state), "stop_at": stop_at, "tests": str(Path(__file__).parent)}
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, args],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outs = [proc.communicate(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [
        subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        for proc, (out, err) in zip(procs, outs, strict=True)
    ]


def test_two_ranks_agree_on_a_damage_only_one_of_them_hashed(tmp_path):
    state = tmp_path / "state"
    done = two_ranks(state, stop_at=7)
    assert [d.returncode for d in done] == [3, 3], done[0].stderr[-3000:]
    newest = latest_checkpoint(state)
    assert newest.name == "step-00000006"
    files = json.loads((newest / MANIFEST).read_text())["files"]
    assert {"weights/__0_0.distcp", "weights/__1_0.distcp", "rng-rank1.json"} <= set(files)
    # a same-size change in a file of rank 1's share: only rank 1 sees it
    name = next(n for n in sorted(files)[1::2] if files[n]["bytes"])
    data = bytearray((newest / name).read_bytes())
    data[-1] ^= 0x01
    (newest / name).write_bytes(bytes(data))
    done = two_ranks(state, stop_at=None)
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:]
    assert [json.loads(d.stdout.splitlines()[-1])["resumed_from"] for d in done] == [3, 3]
    assert f"damaged checkpoint {newest}: a file another rank checked" in done[0].stderr
    assert f"damaged checkpoint {newest}: {name} does not match its sha256" in done[1].stderr
