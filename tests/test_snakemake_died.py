"""Snakemake SIGKILLed while a training job runs on: the job finishes, Snakemake marks its output
incomplete, and ``--rerun-incomplete`` re-emits the same weights without training again."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from test_workflow import ROOT, SNAKEMAKE, demo_config, snakemake

TARGET = "runs/tiny_p8__tiny_qwen2__captions_short__connector/pretrain"


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_rerun_incomplete_after_snakemake_died_re_emits_the_trained_weights(tmp_path):
    config = demo_config(tmp_path)
    profile = ["--profile", str(ROOT / "profiles" / "demo"), "--configfile", str(config)]
    out, state = tmp_path / TARGET, tmp_path / f"{TARGET}.state"
    session = subprocess.Popen(
        [*SNAKEMAKE, "--directory", str(tmp_path), TARGET, *profile],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: (state / "train_log.jsonl").exists(), 900, "the training job to start")
    os.kill(session.pid, signal.SIGKILL)  # Snakemake only: the job runs on
    session.wait()
    wait_for(lambda: (state / "final" / "final.json").exists(), 300, "the job to finish")
    wait_for(lambda: not list(state.glob("step-*")), 60, "the job to remove its checkpoints")
    time.sleep(2)
    trained = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    train_log = (state / "train_log.jsonl").read_bytes()

    refused = snakemake(tmp_path, TARGET, *profile, check=False)
    assert refused.returncode != 0 and "IncompleteFilesException" in refused.stderr + refused.stdout
    snakemake(tmp_path, TARGET, "--unlock", *profile)  # the killed Snakemake's lock
    started = time.monotonic()
    snakemake(tmp_path, TARGET, "--rerun-incomplete", *profile)
    seconds = time.monotonic() - started
    job_log = tmp_path / "logs/pretrain/tiny_p8__tiny_qwen2__captions_short__connector.log"
    assert "re-emitted from" in job_log.read_text()
    assert (state / "train_log.jsonl").read_bytes() == train_log  # no step trained again
    emitted = {
        p.relative_to(out): p.read_bytes()
        for p in out.rglob("*")
        if p.is_file() and not p.name.startswith(".snakemake")
    }
    assert emitted == {k: v for k, v in trained.items() if not k.name.startswith(".snakemake")}
    assert seconds < 120, seconds
