"""The Snakemake DAG: the paper's study dry-runs with no data; the demo runs for real, end to end;
a config change reruns exactly the jobs it invalidates."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [*SNAKEMAKE, "--directory", str(workdir), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def planned_jobs(workdir: Path, *args: str) -> Counter:
    """Rule -> job count of a dry-run (Snakemake's 'Job stats' table)."""
    out = snakemake(workdir, "-n", *args).stdout
    if "Nothing to be done" in out:
        return Counter()
    table = out.split("Job stats:")[1].split("total")[0]
    rows = re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.MULTILINE)
    return Counter({rule: int(n) for rule, n in rows})


def demo_config(tmp: Path, **changes) -> Path:
    """config/demo.yaml with its model-config paths made absolute (the run happens in ``tmp``)."""
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    for model in cfg["clip_models"].values():
        if model["source"]["type"] == "random_init":
            model["source"]["model_config"] = str(ROOT / model["source"]["model_config"])
    for path, value in changes.items():
        node = cfg
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    out = tmp / "demo.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def test_paper_config_dry_run_lists_every_stage(tmp_path):
    jobs = planned_jobs(tmp_path)  # no --configfile: the paper's study, target `all`
    assert jobs == Counter(
        build_manifest=4,  # ImageNet subset, Flowers, Pets, Food
        vqa_benchmark=3,  # MMBench, MMMU, MMStar
        fetch_clip=3,  # the miner's LAION ViT-L/14, OpenAI ViT-L/14-336, DFN ViT-H/14-378
        mine_questions=4,
        shard_questions=4,
        eval_clip=12,  # 3 CLIP models x 4 benchmarks
        materialize_llm=4,  # Vicuna, Llama-2, Qwen2, Qwen2-Instruct
        materialize_base_vlm=1,  # Qwen2-VL base
        materialize_hub_vlm=15,  # Section 3's released VLMs
        shard_train_data=3,  # LLaVA-Pretrain, PixMo-Cap, LLaVA-1.5 mix665k
        fetch_train_archive=6,  # LLaVA-Pretrain images; COCO, GQA, TextVQA, VG parts 1 and 2
        fetch_train_urls=2,  # PixMo-Cap's and OCR-VQA's image URLs
        pretrain=13,  # one per distinct pretraining recipe
        finetune=22,  # one per trained ablation row
        eval_vlm=(22 + 15) * 7,  # trained rows and hub VLMs x 7 benchmarks
        aggregate_ablations=1,
        aggregate_models=1,
        figures=1,
        provenance=1,  # every model's and data set's pin, read from the fetched folders
        all=1,
    )


def test_demo_dry_run_lists_every_stage_with_the_provenance_table(tmp_path):
    jobs = planned_jobs(tmp_path, "--configfile", str(demo_config(tmp_path)))
    assert jobs["provenance"] == 1 and jobs["all"] == 1
    assert jobs["aggregate_ablations"] == jobs["aggregate_models"] == jobs["figures"] == 1


def test_all_ablations_needs_only_the_ablation_rows_and_table1s_models(tmp_path):
    jobs = planned_jobs(tmp_path, "all_ablations")
    # Table 2's 24 rows (2 of them released checkpoints) and Table 1's Molmo-7B-D
    assert jobs["eval_vlm"] == 25 * 7
    assert jobs["materialize_hub_vlm"] == 3
    assert jobs["aggregate_ablations"] == 1 and "eval_clip" not in jobs


def test_malformed_config_fails_before_any_job(tmp_path):
    config = demo_config(tmp_path, **{"miner.clip": "no_such_model"})
    proc = snakemake(tmp_path, "-n", "--configfile", str(config), check=False)
    assert proc.returncode != 0
    assert "miner.clip: 'no_such_model' is not defined in clip_models" in proc.stderr + proc.stdout
    assert not (tmp_path / "data").exists()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The demo's benchmark half, run once for real on 2 cores."""
    workdir = tmp_path_factory.mktemp("demo")
    config = demo_config(workdir)
    snakemake(workdir, "--profile", str(ROOT / "profiles" / "demo"), "--configfile", str(config))
    return workdir


@pytest.mark.slow
def test_demo_runs_end_to_end(demo_run):
    demo = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    for bench in demo["benchmarks"]:
        questions = pl.read_parquet(demo_run / "results" / "questions" / f"{bench}.parquet")
        manifest = pl.read_parquet(demo_run / "data" / bench / "manifest.parquet")
        assert questions.height == manifest.height > 0
        assert questions["options"].list.len().unique().to_list() == [5]
        index = json.loads((demo_run / "shards" / "questions" / bench / "index.json").read_text())
        assert index["total"] == questions.height
        for clip in demo["clip_eval"]["models"]:
            metrics = json.loads(
                (demo_run / "results" / "metrics" / f"clip-{clip}" / f"{bench}.json").read_text()
            )
            assert metrics["n"] == questions.height
            assert 0.0 <= metrics["accuracy"] <= 1.0
            # N-way correct implies 5-way correct: the answer is always among the options.
            assert metrics["nway_accuracy"] <= metrics["accuracy"]
    for vqa in demo["vqa_benchmarks"]:
        assert (demo_run / "data" / "vqa" / f"{vqa}.tsv").stat().st_size > 0


@pytest.mark.slow
def test_no_change_reruns_nothing(demo_run):
    assert planned_jobs(demo_run, "--configfile", str(demo_config(demo_run))) == Counter()


def demo_counts(config: Path) -> dict:
    demo = yaml.safe_load(config.read_text())
    return {
        "fine": len(demo["benchmarks"]),
        "vqa": len(demo["vqa_benchmarks"]),
        "clip": len(demo["clip_eval"]["models"]),
        "vlms": len([r for r in demo["ablations"] if "hub" not in r]) + len(demo["hub_vlms"]),
    }


@pytest.mark.slow
def test_demo_builds_the_ablation_table(demo_run):
    table = pl.read_csv(demo_run / "results" / "tables" / "ablations.csv")
    demo = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    assert table["run"].to_list() == [row["name"] for row in demo["ablations"]]
    for column in [*demo["benchmarks"], *demo["vqa_benchmarks"], "classification", "vlm"]:
        assert table[column].null_count() == 0
        assert table[column].is_between(0, 100).all()
    effects = pl.read_csv(demo_run / "results" / "tables" / "effects.csv")
    assert effects.height > 0 and effects["classification_p"].null_count() == 0
    for name in ("figure2", "figure4", "figure8", "confusion"):
        assert (demo_run / "results" / "figures" / f"{name}.svg").stat().st_size > 0


@pytest.mark.slow
def test_demo_table1_is_a_progression_of_three_steps(demo_run):
    """The demo's own chain (report.table1): no pretraining -> short captions -> ViT/4 ->
    unfreezing the LLM, each step with its change beside it, as Figure 8 draws it."""
    table1 = pl.read_csv(demo_run / "results" / "tables" / "table1.csv")
    chain = table1.filter(pl.col("chain"))
    assert chain.height >= 4  # 3 steps
    assert chain["classification"].null_count() == 0


@pytest.mark.slow
def test_best_finetuned_row_doubles_chance_on_every_fine_grained_benchmark(demo_run):
    """Image features reach the LM in the demo's own runs (chance is 20%, 5 options)."""
    table = pl.read_csv(demo_run / "results" / "tables" / "ablations.csv")
    demo = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    worst_benchmark = table.select(pl.min_horizontal(*demo["benchmarks"])).to_series()
    assert worst_benchmark.max() >= 40.0, table


@pytest.mark.slow
def test_report_gathers_every_figure_and_table_with_captions(demo_run):
    config = demo_config(demo_run)
    snakemake(demo_run, "--configfile", str(config), "--report", "report.html")
    html = (demo_run / "report.html").read_text()
    figures = sorted(p.name for p in (demo_run / "results" / "figures").glob("*.svg"))
    assert len(figures) == 8
    for name in [*figures, "ablations.csv", "effects.csv", "models.csv", "provenance.csv"]:
        assert name in html, name
    for caption in (ROOT / "workflow" / "report").glob("figure*.rst"):
        assert caption.read_text().split(":")[0] in html  # "Figure 2" ...


@pytest.mark.slow
def test_changed_miner_template_reruns_questions_evaluations_and_aggregation(demo_run):
    config = demo_config(demo_run, **{"miner.templates": ["a blurry photo of a {c}"]})
    n = demo_counts(config)
    assert planned_jobs(demo_run, "--configfile", str(config)) == Counter(
        mine_questions=n["fine"],
        shard_questions=n["fine"],
        eval_clip=n["fine"] * n["clip"],
        eval_vlm=n["fine"] * n["vlms"],  # VQA evaluations do not read the questions
        aggregate_ablations=1,
        aggregate_models=1,
        figures=1,
        all=1,
    )  # and no training


@pytest.mark.slow
def test_changed_finetune_lr_of_one_row_reruns_that_row_only(demo_run):
    demo = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    rows = demo["ablations"]
    index = next(i for i, row in enumerate(rows) if row["name"] == "p8_llama_short")
    rows[index] = {**rows[index], "recipes": {"finetune": {"llm_lr": 3.0e-3}}}
    config = demo_config(demo_run, ablations=rows)
    n = demo_counts(config)
    assert planned_jobs(demo_run, "--configfile", str(config)) == Counter(
        finetune=1,
        eval_vlm=n["fine"] + n["vqa"],
        aggregate_ablations=1,
        figures=1,
        all=1,
    )


@pytest.mark.slow
def test_new_row_adds_only_its_jobs_and_shares_pretraining(demo_run):
    demo = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    base = next(row for row in demo["ablations"] if row["name"] == "p8_llama_short")
    new = {**base, "name": "p8_llama_short_lr2", "recipes": {"finetune": {"llm_lr": 3.0e-3}}}
    config = demo_config(demo_run, ablations=[*demo["ablations"], new])
    n = demo_counts(config)
    assert planned_jobs(demo_run, "--configfile", str(config)) == Counter(
        finetune=1,  # no pretrain job: the row shares p8_llama_short's pretraining
        eval_vlm=n["fine"] + n["vqa"],
        aggregate_ablations=1,
        figures=1,
        all=1,
    )


@pytest.mark.slow
def test_changed_clip_eval_template_reruns_only_clip_eval(demo_run):
    config = demo_config(demo_run, **{"clip_eval.templates": ["itap of a {c}"]})
    n = demo_counts(config)
    assert planned_jobs(demo_run, "--configfile", str(config)) == Counter(
        eval_clip=n["fine"] * n["clip"], aggregate_models=1, figures=1, all=1
    )


def reordered(entry: dict) -> dict:
    """``entry`` with its keys in reverse order (YAML order carries no meaning)."""
    return {key: entry[key] for key in reversed(list(entry))}


@pytest.mark.slow
def test_reordered_keys_rerun_nothing(demo_run):
    demo = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    recipes = {name: reordered(recipe) for name, recipe in demo["recipes"].items()}
    train_data = {
        name: {**data, "source": reordered(data["source"])}
        for name, data in demo["train_data"].items()
    }
    hub_vlms = {name: reordered(vlm) for name, vlm in demo["hub_vlms"].items()}
    config = demo_config(demo_run, recipes=recipes, train_data=train_data, hub_vlms=hub_vlms)
    assert planned_jobs(demo_run, "--configfile", str(config)) == Counter()


@pytest.mark.slow
def test_renamed_labels_rerun_only_the_report(demo_run):
    demo = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    hub_vlms = {name: {**vlm, "label": f"{name} renamed"} for name, vlm in demo["hub_vlms"].items()}
    train_data = {
        name: {**data, "label": name.upper()} for name, data in demo["train_data"].items()
    }
    config = demo_config(demo_run, hub_vlms=hub_vlms, train_data=train_data)
    planned = planned_jobs(demo_run, "--configfile", str(config))
    assert set(planned) <= {"aggregate_ablations", "aggregate_models", "figures", "all"}
    assert planned["aggregate_models"] == 1 and planned["aggregate_ablations"] == 1


@pytest.mark.slow
def test_miner_batch_size_reruns_nothing(demo_run):
    """The questions are byte-identical at any batch size, so it is not a param of mining."""
    config = demo_config(demo_run, **{"miner.batch_size": 7})
    assert planned_jobs(demo_run, "--configfile", str(config)) == Counter()


@pytest.mark.slow
def test_readme_fgvlm_examples_run_as_printed(demo_run, tmp_path):
    """Every ``fgvlm`` line of the README's command block, run as printed in a copy of the
    demo's working folder (``config/`` beside it, as in a checkout)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## The `fgvlm` command")[1].split("```bash")[1].split("```")[0]
    commands = [line.split("#")[0].split() for line in block.splitlines() if line.strip()]
    assert commands and all(command[0] == "fgvlm" for command in commands)
    workdir = tmp_path / "work"
    subprocess.run(["cp", "-a", str(demo_run), str(workdir)], check=True)
    subprocess.run(["cp", "-a", str(ROOT / "config"), str(workdir / "config")], check=True)
    subprocess.run(["cp", "-a", str(ROOT / "tests"), str(workdir / "tests")], check=True)
    fgvlm = Path(sys.executable).parent / "fgvlm"
    for command in commands:
        proc = subprocess.run(
            [str(fgvlm), *command[1:]], cwd=workdir, capture_output=True, text=True
        )
        assert proc.returncode == 0, f"{' '.join(command)}:\n{proc.stderr[-3000:]}"
