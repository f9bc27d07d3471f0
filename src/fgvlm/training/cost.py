"""The bill before submitting: GPU-hours of every training job, from data sizes and throughput.

A job's GPU-hours = samples x epochs x LM positions per sample / (LM positions/s per GPU) /
3600, with LM positions counting image tokens, as the train log's tokens/s does. The
throughput is per GPU and per stage (pretraining steps a frozen or learning LLM, finetuning
a learning one): measured by ``bench/gpu_bench.py`` (its JSON) or given on the command line.
This module imports no torch: ``fgvlm cost`` runs anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# LM positions per sample at the paper's shapes (576 CLIP-L/14@336 patches per image) with
# Vicuna's tokenizer: LCS-558K captions and their prompt are ~40 tokens; mix665k conversations
# average ~250 text tokens and ~6% of them have no image. Estimates; override per stage.
POSITIONS_PER_SAMPLE = {"pretrain": 620, "finetune": 800}


@dataclass(frozen=True)
class Job:
    """One training job: its family (pretrain/finetune), name, data size and GPUs."""

    family: str
    name: str
    samples: int
    epochs: float
    gpus: int


def gpu_hours(
    job: Job, tokens_per_s_per_gpu: dict[str, float], positions: dict[str, float]
) -> float:
    """GPU-hours of ``job`` at the given per-GPU throughput of its family."""
    rate = tokens_per_s_per_gpu.get(job.family)
    if not rate or rate <= 0:
        raise ValueError(f"no positive throughput for {job.family} jobs (got {rate!r})")
    return job.samples * job.epochs * positions[job.family] / rate / 3600


def bill(
    jobs: list[Job],
    tokens_per_s_per_gpu: dict[str, float],
    positions: dict[str, float] | None = None,
) -> dict:
    """Per job, per family and in total: GPU-hours and wall-clock hours on the job's GPUs."""
    positions = {**POSITIONS_PER_SAMPLE, **(positions or {})}
    rows, families = [], {}
    for job in jobs:
        hours = gpu_hours(job, tokens_per_s_per_gpu, positions)
        rows.append(
            {
                "family": job.family,
                "job": job.name,
                "samples": job.samples,
                "epochs": job.epochs,
                "gpus": job.gpus,
                "gpu_hours": hours,
                "wall_hours": hours / job.gpus,
            }
        )
        total = families.setdefault(job.family, {"jobs": 0, "gpu_hours": 0.0})
        total["jobs"] += 1
        total["gpu_hours"] += hours
    return {
        "jobs": rows,
        "families": families,
        "total_gpu_hours": sum(f["gpu_hours"] for f in families.values()),
        "tokens_per_s_per_gpu": tokens_per_s_per_gpu,
        "positions_per_sample": positions,
    }


def throughput_from_bench(result: dict) -> dict[str, float]:
    """Per-GPU LM positions/s by family from ``bench/gpu_bench.py``'s JSON: finetuning takes
    the fastest measured full-training row; pretraining the same (an upper bound on its cost:
    a frozen LLM skips the weight gradients)."""
    rows = [r for r in result.get("training", {}).get("rows", []) if r.get("tokens_per_s")]
    if not rows:
        raise ValueError("the benchmark result has no training row with tokens_per_s")
    layers = result["training"]["llm_shapes"].get("num_hidden_layers", 32)
    # a run with fewer decoder layers than the 7B's 32 is faster in proportion (to first order)
    best = max(r["tokens_per_s"] for r in rows) * min(1.0, layers / 32)
    return {"pretrain": best, "finetune": best}


def format_bill(result: dict) -> list[str]:
    """Lines for the terminal: each job, each family, the total."""
    lines = [
        f"{'family':9} {'job':44} {'samples':>9} {'GPUs':>4} {'GPU-h':>8} {'wall-h':>7}",
    ]
    for row in result["jobs"]:
        lines.append(
            f"{row['family']:9} {row['job'][:44]:44} {row['samples'] * row['epochs']:>9.0f} "
            f"{row['gpus']:>4} {row['gpu_hours']:>8.1f} {row['wall_hours']:>7.1f}"
        )
    for family, total in result["families"].items():
        lines.append(f"{family}: {total['jobs']} jobs, {total['gpu_hours']:.0f} GPU-hours")
    lines.append(f"total: {math.ceil(result['total_gpu_hours'])} GPU-hours")
    rates = ", ".join(f"{k} {v:,.0f}" for k, v in result["tokens_per_s_per_gpu"].items())
    positions = ", ".join(f"{k} {v:g}" for k, v in result["positions_per_sample"].items())
    lines.append(f"at LM positions/s per GPU: {rates}; positions per sample: {positions}")
    return lines


def study_jobs(config: dict) -> list[Job]:
    """Every training job of a study config, sized from its data's planned sample count
    (``train_data.<d>.source.plan.samples``; a source without one is left out), after checking
    that its data split over ranks x loader workers leaves no rank short of an epoch
    (``fgvlm.data.shards.check_coverage``): the error names the job and the numbers."""
    from fgvlm import config as study
    from fgvlm.data.shards import check_coverage
    from fgvlm.training.recipe import Recipe, per_device_batch

    specs = [("pretrain", key, spec) for key, spec in study.pretrain_jobs(config).items()]
    specs += [
        ("finetune", row["name"], study.finetune_spec(config, row))
        for row in study.trained_rows(config)
    ]
    jobs = []
    for family, name, spec in specs:
        data = config["train_data"].get(spec["data"])
        samples = (data or {}).get("source", {}).get("plan", {}).get("samples")
        if not samples:
            continue  # builtin data, or a size known only once the data is there
        resources = config["resources"][family]
        gpus = max(1, resources["gpu"]) * resources.get("nodes", 1)
        recipe = Recipe.from_config(spec["recipe"])
        per_device = per_device_batch(recipe, gpus)
        check_coverage(
            samples,
            world_size=gpus,
            num_workers=config["training"]["dataloader_workers"],
            batch_size=per_device,
            grad_accum=max(1, recipe.global_batch // (gpus * per_device)),
            where=f"{family} {name} ({spec['data']})",
        )
        jobs.append(Job(family, name, samples, recipe.epochs, gpus))
    return jobs
