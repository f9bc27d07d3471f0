"""The command the README gives users: after `make slurm-profile` in a fresh clone,
`snakemake --profile slurm all_ablations` finds the repository's SLURM profile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None or shutil.which("make") is None, reason="git/make")
def test_bare_slurm_profile_works_after_make_slurm_profile(tmp_path):
    clone = tmp_path / "fgvlm"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
    env.update(HOME=str(home), PYTHONPATH=str(clone / "src"))
    dry_run = [sys.executable, "-m", "snakemake", "--profile", "slurm", "all_ablations", "-n"]

    before = subprocess.run(dry_run, cwd=clone, env=env, capture_output=True, text=True)
    assert before.returncode != 0
    assert "slurm" in before.stderr

    subprocess.run(["make", "slurm-profile"], cwd=clone, env=env, check=True, capture_output=True)
    link = home / ".config" / "snakemake" / "slurm"
    assert link.resolve() == (clone / "profiles" / "slurm").resolve()
    after = subprocess.run(dry_run, cwd=clone, env=env, capture_output=True, text=True)
    assert after.returncode == 0, after.stdout[-3000:] + after.stderr[-3000:]
    assert "This was a dry-run" in after.stdout
    assert "aggregate_ablations" in after.stdout
    assert "slurm_partition=YOUR_PARTITION" in after.stdout  # the profile's resources apply

    again = subprocess.run(["make", "slurm-profile"], cwd=clone, env=env, capture_output=True)
    assert again.returncode == 0  # rerunning the set-up replaces its own link
    link.unlink()
    link.mkdir()
    refused = subprocess.run(
        ["make", "slurm-profile"], cwd=clone, env=env, capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert "exists and is not a link: move it away first" in refused.stderr
