"""Derive a profile for the test cluster from the paper's SLURM profile (profiles/slurm).

Only what a one-node test cluster needs changes, so the rest of the paper's resource mapping is
what gets submitted:

- ``site_profile``: the two placeholders (partition, account) filled in, and the plugin's first
  status check after 2 s instead of 40 s. Nothing else: the paper's 4 nodes x 4 GPUs stay.
- ``local_profile``: on top of that, what one node with a few CPUs can hold: ``nodes`` 4 -> 1,
  ``mem_mb`` capped at the node's, ``cpus_per_task`` at a ``share`` of its CPUs (half: a
  training job leaves room for a second job, as the local demo run on 2 cores runs two
  one-thread jobs at once; the trainer uses the rule's threads, not the allocation's CPUs);
  and ``slurm-status-command: squeue`` (the paper profile's too): plugin 2.8.0 compares sacct's
  state exactly, and sacct reports a job killed with scancel as "CANCELLED by <uid>", so with
  sacct the workflow waits forever on it; squeue says "CANCELLED" (the test cluster keeps
  finished jobs in squeue for MinJobAge=300 s, longer than the plugin's longest pause between
  status checks, 180 s). ``launchers`` emulates nodes: 2 gives the training rules
  ``nodes: 1, tasks: 2, mpi: srun`` (two torchrun agents on localhost meet at a c10d rendezvous
  as they would on two nodes). With 1 launcher ``tasks`` and ``mpi`` go: the plugin refuses
  ``mpi`` with one task, and one launcher trains in the job's own step, as on any one-node
  cluster (the paper profile's own "on one node" note).

``python tests/slurm/local_profile.py OUT_DIR [--launchers N]`` writes OUT_DIR/config.yaml.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PAPER_PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
PARTITION = "debug"  # tests/slurm/slurm.conf.in
ACCOUNT = "root"  # slurmdbd's default account
INIT_SECONDS = 2  # the plugin waits 40 s before its first status check by default
STATUS_COMMAND = "squeue"  # see the module docstring: sacct's "CANCELLED by 0" hangs plugin 2.8.0


def load_paper(path: Path = PAPER_PROFILE) -> dict[str, Any]:
    """The paper's profile as a dict."""
    return yaml.safe_load(Path(path).read_text())


def site_profile(
    paper: dict[str, Any], *, partition: str = PARTITION, account: str = ACCOUNT
) -> dict[str, Any]:
    """The paper profile with its site placeholders filled and a short first status check."""
    out = copy.deepcopy(paper)
    out["default-resources"]["slurm_partition"] = partition
    out["default-resources"]["slurm_account"] = account
    out["slurm-init-seconds-before-status-checks"] = INIT_SECONDS
    return out


def local_profile(
    paper: dict[str, Any],
    *,
    cpus: int,
    mem_mb: int,
    launchers: int = 1,
    share: int = 2,
    partition: str = PARTITION,
    account: str = ACCOUNT,
) -> dict[str, Any]:
    """``site_profile`` fitted to one node of ``cpus`` CPUs and ``mem_mb`` MB (module docstring).

    ``launchers`` (>= 1) is the number of emulated nodes of the multi-node rules; a job takes at
    most ``cpus // share`` CPUs (at least one per task).
    """
    if launchers < 1 or launchers > cpus:
        raise ValueError(f"launchers={launchers}: need 1..{cpus} (one CPU per launcher)")
    out = site_profile(paper, partition=partition, account=account)
    out["slurm-status-command"] = STATUS_COMMAND
    defaults = out["default-resources"]
    defaults["mem_mb"] = min(defaults.get("mem_mb", mem_mb), mem_mb)
    defaults["cpus_per_task"] = min(defaults.get("cpus_per_task", 1), max(1, cpus // share))
    for res in out["set-resources"].values():
        if "mem_mb" in res:
            res["mem_mb"] = min(res["mem_mb"], mem_mb)
        if res.get("nodes", 1) > 1:  # a multi-node rule: training
            res["nodes"] = 1
            if launchers > 1:
                res["tasks"] = launchers
            else:
                res.pop("tasks", None)
                res.pop("mpi", None)
        if "cpus_per_task" in res:
            per_task = max(1, cpus // share // max(1, res.get("tasks", 1)))
            res["cpus_per_task"] = min(res["cpus_per_task"], per_task)
    return out


def write_profile(profile: dict[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/config.yaml`` (a Snakemake profile folder); return the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return out_dir


def node_size() -> tuple[int, int]:
    """(CPUs, MB) of this machine as tests/slurm/cluster.sh declares its node: nproc, 85% RAM."""
    kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return len(os.sched_getaffinity(0)), int(kb / 1024 * 0.85)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--launchers", type=int, default=1)
    parser.add_argument("--site-only", action="store_true", help="fill placeholders only")
    args = parser.parse_args(argv)
    paper = load_paper()
    if args.site_only:
        profile = site_profile(paper)
    else:
        cpus, mem = node_size()
        profile = local_profile(paper, cpus=cpus, mem_mb=mem, launchers=args.launchers)
    print(write_profile(profile, args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
