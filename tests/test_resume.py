"""A training job killed mid-way (SIGTERM, SIGKILL) and rerun ends with the weights of an
uninterrupted run; a finished job whose output was lost writes it again without training: real
processes, the real model, data and trainer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tiny import training_assets
from safetensors.torch import load_file

SPEC = {
    "run": "resume_test",
    "arch": "llava",
    "data": "instructions",
    "template": "vicuna_v1",
    "image_aspect": "pad",
    "seed": 3,
    "recipe": {
        "stage": "finetune",
        "updating": "full",
        "connector_lr": 1e-3,
        "llm_lr": 1e-3,
        "global_batch": 8,
        "per_device_batch": 4,
        "epochs": 3,
        "warmup_ratio": 0.1,
    },
}

DRIVER = """
import json, sys, torch
torch.set_num_threads(1)
from fgvlm import logs, stages
logs.setup()
args = json.loads(sys.argv[1])
stages.train_stage(**args)
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return training_assets(tmp_path_factory.mktemp("resume"), llm_layers=1, samples_per_shard=16)


def start(assets: dict, out: Path) -> subprocess.Popen:
    args = {
        "spec": SPEC,
        "out_dir": str(out),
        "state_dir": str(out) + ".state",
        "checkpoint_every": 2,
        "device": "cpu",
        **assets,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(proc: subprocess.Popen, state_dir: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list(state_dir.glob("step-*")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint appeared: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)


def weights(out: Path) -> dict:
    return load_file(out / "model.safetensors")


def training_meta(out: Path) -> dict:
    return json.loads((out / "fgvlm_vlm.json").read_text())["training"]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "model"
    proc = start(assets, out)
    assert proc.wait(timeout=300) == 0, proc.communicate()[1][-2000:]
    assert training_meta(out)["result"]["resumed_from"] == 0
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_run_resumes_to_identical_weights(assets, reference, tmp_path, sig):
    out = tmp_path / "model"
    state = Path(str(out) + ".state")
    proc = start(assets, out)
    wait_for_checkpoint(proc, state)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    assert code != 0, "the job should have been interrupted"
    if sig == signal.SIGTERM:
        assert "Preempted" in proc.communicate()[1]  # it checkpointed and asked for a rerun
    assert not out.exists()  # nothing that looks complete
    rerun = start(assets, out)
    assert rerun.wait(timeout=300) == 0, rerun.communicate()[1][-2000:]
    resumed = training_meta(out)["result"]["resumed_from"]
    assert 0 < resumed < training_meta(reference)["plan"]["total_steps"]
    expected, got = weights(reference), weights(out)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert (tensor == got[name]).all(), name


def test_finished_job_whose_output_was_deleted_re_emits_it_untrained(assets, reference, tmp_path):
    # Snakemake died while the job ran on; --rerun-incomplete deleted the finished output
    out = tmp_path / "model"
    state = Path(f"{out}.state")
    shutil.copytree(f"{reference}.state", state)
    assert not list(state.glob("step-*")) and (state / "final" / "final.json").is_file()
    log_before = (state / "train_log.jsonl").read_bytes()
    rerun = start(assets, out)
    assert rerun.wait(timeout=120) == 0, rerun.communicate()[1][-2000:]
    err = rerun.communicate()[1]
    assert "re-emitted from" in err and "resuming" not in err
    assert (state / "train_log.jsonl").read_bytes() == log_before  # not one step trained
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for name in files:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
