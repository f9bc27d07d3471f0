"""Whole-study robustness: the numbers do not depend on how many jobs run at once, and
evaluations running side by side share nothing that one of them could corrupt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from fgvlm import mining

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
BENCHMARKS = ("shapes", "mmstar")  # the cut demo's fine-grained and VQA benchmark


def _cut_demo_config(tmp: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_slurm import cut_demo_config
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return cut_demo_config(tmp)


def _env(tmp: Path, temp: str = "tmp") -> dict[str, str]:
    """One HF cache and one temp folder for every process, as on a shared login node."""
    (tmp / "hf").mkdir(exist_ok=True)
    (tmp / temp).mkdir(exist_ok=True)
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HOME": str(tmp / "hf"),
        "TMPDIR": str(tmp / temp),
        "HF_HUB_OFFLINE": "1",
    }


def _finish(proc: subprocess.Popen, what: str) -> None:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"{what} failed:\n{out[-6000:]}"


@pytest.fixture(scope="module")
def cut_runs(tmp_path_factory):
    """The cut demo's all_ablations with --cores 1 and --cores 2, side by side in two folders."""
    base = tmp_path_factory.mktemp("cores")
    config = _cut_demo_config(base)
    env = _env(base)
    procs = {}
    for cores in (1, 2):
        workdir = base / f"cores{cores}"
        workdir.mkdir()
        procs[cores] = subprocess.Popen(
            [*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(config)]
            + ["--cores", str(cores), "all_ablations"],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    for cores, proc in procs.items():
        _finish(proc, f"cut demo with --cores {cores}")
    return {"base": base, "config": config, 1: base / "cores1", 2: base / "cores2"}


def _files(root: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob(pattern))}


@pytest.mark.slow
def test_tables_are_byte_identical_with_one_or_two_cores(cut_runs):
    one = _files(cut_runs[1], "results/tables/*.csv")
    two = _files(cut_runs[2], "results/tables/*.csv")
    assert set(one) >= {"results/tables/ablations.csv", "results/tables/table1.csv"}
    assert one.keys() == two.keys()
    for name in one:
        assert one[name] == two[name], f"{name} differs between --cores 1 and --cores 2"
    assert _files(cut_runs[1], "results/metrics/*/*.json") == _files(
        cut_runs[2], "results/metrics/*/*.json"
    )


@pytest.mark.slow
def test_two_evaluations_side_by_side_equal_the_sequential_ones(cut_runs):
    """Two `fgvlm eval-vlm` processes of one model at once, in one folder, with one HF cache and
    one temp folder: their predictions and metrics equal the sequential run's, and no temp file
    is left behind."""
    workdir, model = cut_runs[1], "p8_llama_short"
    env = _env(cut_runs["base"], "tmp-eval")
    outputs = [
        f"results/{kind}/{model}/{bench}.{ext}"
        for bench in BENCHMARKS
        for kind, ext in (("predictions", "parquet"), ("metrics", "json"))
    ]
    sequential = {name: (workdir / name).read_bytes() for name in outputs}
    for name in outputs:
        (workdir / name).unlink()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fgvlm.cli", "eval-vlm", "--config", str(cut_runs["config"])]
            + ["--model", model, "--benchmark", bench],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for bench in BENCHMARKS
    ]
    for bench, proc in zip(BENCHMARKS, procs, strict=True):
        _finish(proc, f"eval-vlm on {bench}")
    for name in outputs:
        if name.endswith(".parquet"):
            side_by_side = pl.read_parquet(workdir / name)
            assert side_by_side.equals(pl.read_parquet(sequential[name])), name
        else:
            assert (workdir / name).read_bytes() == sequential[name], name
    leftovers = [p for p in (workdir / "results").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
    # torch keeps its compile cache in the temp folder by design (shared, keyed by content)
    temp = [p.name for p in (cut_runs["base"] / "tmp-eval").iterdir()]
    assert [name for name in temp if not name.startswith("torchinductor_")] == []


def _dry_run(workdir: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SNAKEMAKE, "all", "--directory", str(workdir), "-n", "--configfile", str(config)],
        cwd=workdir,
        capture_output=True,
        text=True,
    )


def test_dry_run_refuses_a_study_without_rows_and_a_duplicated_key(tmp_path):
    """`all` with no ablation rows cannot finish (the figures need a row): refused up front.
    A key given twice in the --configfile is refused although Snakemake's loader keeps the last."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_workflow import demo_config
    finally:
        sys.path.remove(str(ROOT / "tests"))
    config = demo_config(tmp_path, ablations=[], report={})
    proc = _dry_run(tmp_path, config)
    assert proc.returncode != 0
    assert (
        "invalid config: ablations: no rows; the study needs at least one"
        in proc.stdout + proc.stderr
    )
    config = demo_config(tmp_path)
    text = config.read_text()
    config.write_text(text + "seed: 3\n")
    proc = _dry_run(tmp_path, config)
    assert proc.returncode != 0
    line = len(text.splitlines()) + 1
    first = text.splitlines().index("seed: 0") + 1
    assert f"{config}: duplicate key 'seed' (lines {first} and {line})" in proc.stdout + proc.stderr
    assert not (tmp_path / "data").exists()


def test_mining_names_the_benchmark_when_negatives_outnumber_its_classes():
    manifest = pl.DataFrame({"key": ["a"], "path": ["/a.png"], "label": [0], "classname": ["x"]})
    with pytest.raises(ValueError) as err:
        mining.mine_questions(
            manifest,
            None,
            benchmark="birds",
            classnames=["x", "y", "z", "w"],
            templates=["a photo of a {c}"],
            seed=0,
            k=4,
        )
    assert str(err.value) == (
        "birds: miner.negatives is 4, but the benchmark has 4 classes: a question needs 4 "
        "classes other than the true one"
    )
