"""One function per rule of the DAG, from files to files.

Snakemake scripts and the ``fgvlm`` CLI both call these, with the same arguments: the job's
config subtree (the rule's ``params``), its input files (named as in the rule, from
``fgvlm.paths``) and its outputs. Each reads its inputs, makes one call into the library that
owns the work, and writes its outputs atomically. ``pretrain`` and ``finetune`` share
``train_stage`` (the entry ``fgvlm.training.launch`` runs on every rank).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import polars as pl

from fgvlm import io

log = logging.getLogger(__name__)


def synthesize_world(world: dict, out: str) -> None:
    """Draw a synthetic fine-grained world (``config.synthetic_worlds.<name>``) into ``out``."""
    from fgvlm.data.synthetic import generate_world

    keys = ("image_size", "train_per_class", "test_per_class", "mc_fraction", "naming_fraction")
    summary = generate_world(
        Path(out), family=world["family"], seed=world["seed"], **{k: world[k] for k in keys}
    )
    log.info("world %s: %s", out, summary)


def build_manifest(
    spec: dict,
    *,
    manifest: str,
    classes: str,
    candidates: str,
    stats: str,
    raw_dir: str,
    world: str | None = None,
) -> None:
    """A benchmark (``fgvlm.config.benchmark_spec``), downloaded where its source allows, as a
    manifest, its class list, its candidate negatives and its counts beside the expected."""
    from fgvlm.data.benchmarks import read_benchmark, write_benchmark

    benchmark = read_benchmark(spec, raw_dir=Path(raw_dir), world_dir=world and Path(world))
    write_benchmark(benchmark, Path(manifest), Path(classes), Path(candidates), Path(stats))


def vqa_benchmark(source: dict, out: str) -> None:
    """A general-VQA benchmark as a VLMEvalKit TSV (downloaded, md5-checked, or synthesized)."""
    from fgvlm.data.benchmarks import fetch_vqa_benchmark

    fetch_vqa_benchmark(source, Path(out))


def fetch_clip(source: dict, out: str, *, model_config: str | None = None, worlds=()) -> None:
    """Released CLIP weights, or a tiny CLIP (from ``model_config``, pre-trained on ``worlds``)."""
    from fgvlm.models.materialize import materialize_clip

    materialize_clip(source, Path(out), world_dirs=[Path(w) for w in worlds])


def materialize_hub_vlm(vlm: dict, out: str, *, text_model: str | None = None) -> None:
    """A released VLM (``fgvlm.config.hub_vlm_spec``; safetensors only), or a tiny stand-in."""
    from fgvlm.models.materialize import materialize_hub_vlm as materialize

    materialize(vlm, Path(out), text_model_dir=text_model and Path(text_model))


def mine_questions(
    miner: dict,
    *,
    manifest: str,
    classes: str,
    candidates: str,
    clip: str,
    out: str,
    benchmark: str,
    batch_size: int,
    device: str,
) -> None:
    """5-way questions with CLIP hard negatives (``miner``: ``fgvlm.config.miner_spec``)."""
    from fgvlm.data.manifest import read_manifest
    from fgvlm.mining import mine_questions as mine
    from fgvlm.models.clip import load_clip

    model = load_clip(Path(clip), device=device)
    questions = mine(
        read_manifest(manifest),
        model,
        benchmark=benchmark,
        classnames=io.read_json(classes),
        templates=miner["templates"],
        seed=miner["seed"],
        k=miner["negatives"],
        batch_size=batch_size,
        device=device,
        candidates=io.read_json(candidates),
        precision=miner["precision"],
    )
    metadata = {
        "benchmark": benchmark,
        "miner": model.name,
        "templates": json.dumps(miner["templates"]),
        "negatives": str(miner["negatives"]),
        "seed": str(miner["seed"]),
    }
    io.write_parquet(questions, out, metadata=metadata)
    log.info("questions %s: %d", out, questions.height)


def shard_questions(*, questions: str, manifest: str, out: str, samples_per_shard: int) -> dict:
    """A question set and its images as WebDataset shards with an index."""
    from fgvlm.data.manifest import read_manifest
    from fgvlm.data.shards import write_question_shards

    return write_question_shards(
        pl.read_parquet(questions),
        read_manifest(manifest),
        Path(out),
        samples_per_shard=samples_per_shard,
    )


def eval_clip(
    spec: dict,
    *,
    shards: str,
    classes: str,
    clip: str,
    predictions: str,
    metrics: str,
    metric: str,
    batch_size: int,
    device: str,
) -> dict:
    """Zero-shot CLIP baseline on one benchmark: N-way and 5-way (``fgvlm.config.clip_eval_spec``)."""
    from fgvlm.data.shards import iter_question_samples
    from fgvlm.evaluate.clip_zeroshot import evaluate_clip
    from fgvlm.models.clip import load_clip

    frame, summary = evaluate_clip(
        iter_question_samples(Path(shards)),
        load_clip(Path(clip), device=device),
        io.read_json(classes),
        spec["templates"],
        batch_size=batch_size,
        device=device,
        primary=metric,
    )
    io.write_parquet(frame, predictions)
    io.write_json(summary, metrics)
    return summary


def materialize_llm(source: dict, out: str, *, worlds=()) -> None:
    """A released LLM, or a tiny one pre-trained on the drawn worlds' text."""
    from fgvlm.models.materialize import materialize_llm as materialize

    materialize(source, Path(out), world_dirs=[Path(w) for w in worlds])


def materialize_base_vlm(source: dict, out: str, *, text_model: str | None = None) -> None:
    """A base VLM to finetune whole (Qwen2-VL base), or the demo's tiny one."""
    from fgvlm.models.materialize import materialize_base_vlm as materialize

    materialize(source, Path(out), text_model_dir=text_model and Path(text_model))


def shard_train_data(
    source: dict,
    out: str,
    *,
    raw_dir: str,
    worlds=(),
    archives=(),
    fetched=(),
    samples_per_shard: int,
) -> dict:
    """One training-data source as conversation shards, in a seeded random order: sources list
    their samples grouped (by class, by dataset), and the trainer reads whole shards and
    shuffles only within a buffer, so the shards themselves must be mixed. ``archives``: the
    source's extracted image archives; ``fetched``: its URL lists' reports (``fgvlm.paths``
    layout: an archive's folder and a report's stem are their names)."""
    from fgvlm.data.conversations import read_source
    from fgvlm.data.fetch import image_bytes
    from fgvlm.data.shards import write_conversation_shards
    from fgvlm.paths import fetched_dir

    samples = list(
        read_source(
            source,
            raw_dir=Path(raw_dir),
            world_dirs=[Path(w) for w in worlds],
            archives={Path(a).name: Path(a) for a in archives},
            fetched={Path(r).stem: Path(fetched_dir(str(r))) for r in fetched},
        )
    )
    random.Random(0).shuffle(samples)
    lazy = ((record, image_bytes(image)) for record, image in samples)
    return write_conversation_shards(lazy, Path(out), samples_per_shard=samples_per_shard)


def train_stage(
    spec: dict,
    out_dir: str | Path,
    *,
    state_dir: str | Path,
    data_dir: str | Path,
    clip_dir: str | Path | None = None,
    llm_dir: str | Path | None = None,
    init_dir: str | Path | None = None,
    base_dir: str | Path | None = None,
    device: str = "cpu",
    checkpoint_every: int = 500,
    dataloader_workers: int = 0,
    log_every: int = 1,
    peak_tflops: float | None = None,
) -> dict:
    """Pretrain or finetune one model (``spec``: ``fgvlm.config.pretrain_spec``/``finetune_spec``).

    The model starts from ``init_dir`` (a pretraining checkpoint), from ``base_dir`` (a whole
    base VLM, the Qwen2-VL row) or from the vision tower and LLM; it is saved to ``out_dir``
    at the end. Resumable state lives in ``state_dir`` (outside the rule's declared output).
    """
    from fgvlm.training.stage import run_training

    return run_training(
        spec,
        Path(out_dir),
        state_dir=Path(state_dir),
        data_dir=Path(data_dir),
        clip_dir=Path(clip_dir) if clip_dir else None,
        llm_dir=Path(llm_dir) if llm_dir else None,
        init_dir=Path(init_dir) if init_dir else None,
        base_dir=Path(base_dir) if base_dir else None,
        device=device,
        checkpoint_every=checkpoint_every,
        dataloader_workers=dataloader_workers,
        log_every=log_every,
        peak_tflops=peak_tflops,
    )


def eval_vlm(
    spec: dict,
    *,
    model: str,
    data: str,
    questions: str | None = None,
    predictions: str,
    metrics: str,
    details: str,
    parts_dir: str,
    batch_size: int,
    part_size: int,
    device: str,
    loader_workers: int = 0,
) -> dict:
    """One VLM on one benchmark (``fgvlm.config.vlm_eval_spec``), resumable in parts."""
    from fgvlm.evaluate.run import evaluate_vlm

    frame, summary, per_class = evaluate_vlm(
        spec,
        model_dir=Path(model),
        data=Path(data),
        questions=questions and Path(questions),
        parts_dir=Path(parts_dir),
        batch_size=batch_size,
        part_size=part_size,
        device=device,
        loader_workers=loader_workers,
    )
    io.write_parquet(frame, predictions)
    io.write_json(per_class, details)
    io.write_json(summary, metrics)
    log.info("%s: %s", metrics, {k: summary[k] for k in ("accuracy", "n", "mode")})
    return summary


# --- aggregation, tables and figures --------------------------------------------------------


def aggregate_ablations(study: dict, files: dict, out_dir: str | Path) -> dict:
    """The ablation table, factor effects (paired intervals, McNemar), Table 1 and Tables 1-4
    from ``files`` (``report.aggregate.study_files`` of ``study``, the rule's inputs)."""
    from fgvlm.report.aggregate import aggregate_study

    return aggregate_study(study, files, out_dir)


def aggregate_models(study: dict, files: dict, out_path: str | Path) -> None:
    """Section 3's table: hub VLMs (fine-grained and general averages) and CLIP baselines."""
    from fgvlm.report.aggregate import aggregate_models as build

    build(study, files, out_path)


def make_figures(inputs: dict, out_dir: str | Path, **options) -> list[Path]:
    """Figures 2-8 and a per-class confusion view (``report.figures.make_figures``)."""
    from fgvlm.report.figures import make_figures as build

    return build(inputs, out_dir, **options)


def provenance(spec: dict, out: str | Path, *, root: str | Path = ".") -> int:
    """Every model's and data set's source with its pin (``provenance.provenance_table`` of
    ``provenance.provenance_spec``), read from the fetched folders under ``root``; returns the
    row count."""
    from fgvlm.provenance import write_provenance

    rows = write_provenance(spec, out, root)
    log.info("%s: %d sources", out, rows)
    return rows


# --- training-data downloads --------------------------------------------------------------------


def fetch_train_archive(spec: dict, out: str, *, download_dir: str) -> dict:
    """One image archive of a training source, downloaded, checked and extracted into ``out``."""
    from fgvlm.data.archives import fetch_archive

    return fetch_archive(spec, Path(out), download_dir=Path(download_dir))


def fetch_train_urls(
    source: dict, urls: str, out: str, *, raw_dir: str, processes: int, fetch=None
) -> dict:
    """The images of one URL list of a training source (PixMo-Cap's ``images``, a
    ``url_lists`` entry) fetched into resumable parts beside ``out``, the report at ``out``."""
    from fgvlm.data.conversations import URL_LIST_FORMATS, download_training_data, pixmo_url_list
    from fgvlm.data.download import download_file
    from fgvlm.data.fetch import fetch_url_list
    from fgvlm.paths import fetched_dir

    if source["type"] == "pixmo_cap":
        spec = source
        items = pixmo_url_list(download_training_data(source, Path(raw_dir))["parquet"])
    else:
        spec = source["url_lists"][urls]
        listing = Path(raw_dir) / "lists" / f"{urls}.json"
        download_file(spec["url"], listing, md5=spec["md5"], size=spec["size"])
        items = URL_LIST_FORMATS[spec["format"]](listing)
    report = fetch_url_list(
        items, Path(fetched_dir(out)), processes=processes, fetch=fetch, name=urls, **spec["fetch"]
    )
    io.write_json(report, out)
    return report


def data_plan(train_data: dict, used: set[str]) -> list[dict]:
    """Per training source: what its downloads take (GB fetched, GB on disk, from the config's
    ``plan`` figures; skipped downloads left out) and the samples it should give."""
    from fgvlm.paths import train_archives, train_url_lists

    rows = []
    for name, entry in train_data.items():
        source = entry["source"]
        parts = [source, *(source["archives"][a] for a in train_archives(source))]
        if source["type"] == "llava_instruct":
            parts += [source["url_lists"][u] for u in train_url_lists(source)]
        plans = [part.get("plan", {}) for part in parts]
        rows.append(
            {
                "source": name,
                "used": name in used,
                "downloads": len(train_archives(source)) + len(train_url_lists(source)),
                "download_gb": round(sum(p.get("download_gb", 0) for p in plans), 1),
                "extracted_gb": round(sum(p.get("extracted_gb", 0) for p in plans), 1),
                "samples": source.get("plan", {}).get("samples", 0),
            }
        )
    return rows
