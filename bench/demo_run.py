"""Wall time and peak memory of the embedded demo, from scratch, on this machine.

    python bench/demo_run.py [TARGET ...] [--keep DIR]      (default target: all)

Runs `snakemake --profile profiles/demo` in a fresh temporary working directory and reports the
wall time and the peak resident memory of the largest job process (getrusage of the children),
then times a no-op rerun (a dry-run with nothing to do) and the dry-run of the paper's config.
CPU time (user + system of all jobs) is reported beside the wall time: on a shared machine it
says what the run would take alone. ``--keep DIR`` runs in DIR and keeps the outputs.
Results go to BENCHMARKS.md by hand, with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def demo_config(workdir: Path) -> Path:
    """config/demo.yaml with repository-relative paths made absolute."""
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    for model in cfg["clip_models"].values():
        source = model["source"]
        if source["type"] == "random_init":
            source["model_config"] = str(ROOT / source["model_config"])
    path = workdir / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path) -> list[str]:
    """The command line of this repository's workflow, run in ``workdir``."""
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", default=["all"])
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep it")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fgvlm-demo-") as tmp:
        workdir = args.keep.resolve() if args.keep else Path(tmp)
        cmd = [
            *snakemake(workdir),
            "--profile",
            str(ROOT / "profiles" / "demo"),
            "--configfile",
            str(demo_config(workdir)),
            "--quiet",
            *args.targets,
        ]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=workdir)
        wall = time.perf_counter() - start
        no_op_start = time.perf_counter()
        subprocess.run([*cmd, "-n"], check=True, cwd=workdir, capture_output=True)
        no_op = time.perf_counter() - no_op_start
        paper_dir = workdir / "paper"
        paper_dir.mkdir()
        paper_start = time.perf_counter()
        subprocess.run(
            [*snakemake(paper_dir), "-n", "--quiet", "all"],
            check=True,
            cwd=paper_dir,
            capture_output=True,
        )
        paper_dry_run = time.perf_counter() - paper_start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_kb = usage.ru_maxrss
    print(
        json.dumps(
            {
                "targets": args.targets,
                "wall_s": round(wall, 1),
                "cpu_s_all_runs": round(usage.ru_utime + usage.ru_stime, 1),
                "noop_dry_run_s": round(no_op, 1),
                "paper_config_dry_run_s": round(paper_dry_run, 1),
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "peak_rss_mb": round(peak_kb / 1024),
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
