"""One function per stage of the DAG, from files to files.

Snakemake scripts and the ``fgvlm`` CLI both call these, so a stage runs the same with or
without the workflow. Each takes the config subtree its job depends on (the rule's ``params``),
input paths and output paths; every output is written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl

from fgvlm import io

log = logging.getLogger(__name__)


def synthesize_world(world: dict, out_dir: str | Path) -> dict:
    """Draw a synthetic fine-grained world (``config.synthetic_worlds.<name>``) into ``out_dir``."""
    from fgvlm.data.synthetic import generate_world

    summary = generate_world(
        Path(out_dir),
        family=world["family"],
        seed=world["seed"],
        image_size=world.get("image_size", 32),
        train_per_class=world.get("train_per_class", 40),
        test_per_class=world.get("test_per_class", 10),
        **{k: world[k] for k in ("mc_fraction", "naming_fraction") if k in world},
    )
    log.info("world %s: %s", out_dir, summary)
    return summary


def world_pairs(world_dirs: list[str | Path]) -> list[tuple[Path, str]]:
    """(train image, text) pairs of synthetic worlds for CLIP pretraining: each image with
    "a photo of a <class>" and with its long caption."""
    pairs = []
    for world in map(Path, world_dirs):
        for row in _jsonl(world / "captions.jsonl"):
            image = world / row["image"]
            classname = image.parent.name.replace("_", " ")
            pairs += [(image, f"a photo of a {classname}"), (image, row["long"])]
    return pairs


def build_manifest(
    spec: dict,
    manifest_path: str | Path,
    classes_path: str | Path,
    negatives_path: str | Path,
    *,
    raw_dir: str | Path,
    world_dir: str | Path | None = None,
) -> pl.DataFrame:
    """Download (where the source allows) and normalize a benchmark into its manifest.

    ``spec`` is ``fgvlm.config.benchmark_spec``: the source and the class-name table. Writes the
    manifest, the full class-name list (label order) to ``classes_path``, and to
    ``negatives_path`` the candidate negatives per image key where the source defines them
    (ImageNet: the human-annotated model mistakes), else null (every class is a candidate).
    Every image is opened once so that a corrupt file fails here, naming the file, not in a
    GPU job later.
    """
    from fgvlm.data import classification, folder, imagenet, manifest

    source = spec["source"]
    kind = source["type"]
    raw_dir = Path(raw_dir)
    negatives = None
    if kind == "torchvision":
        classification.download_torchvision_dataset(source["name"], raw_dir)
        frame = classification.build_manifest(
            source["name"], raw_dir, expected_count=source.get("expected_count")
        )
    elif kind == "imagenet_subset":
        annotations = raw_dir / "human_accuracy_v3.0.0.json"
        ann = source["annotations"]
        imagenet.download_annotations(ann["url"], ann["md5"], annotations)
        min_wrong = source.get("min_wrong", imagenet.MIN_WRONG)
        frame = imagenet.read_imagenet_subset(Path(source["val_dir"]), annotations, min_wrong)
        negatives = imagenet.subset_negatives(imagenet.load_annotations(annotations), min_wrong)
    elif kind == "image_folder":
        frame = folder.read_image_folder(Path(source["root"]), split=source.get("split", "test"))
    elif kind == "csv":
        root = source.get("image_root")
        frame = folder.read_csv_source(
            Path(source["csv"]), Path(root) if root else None, split=source.get("split", "test")
        )
    elif kind == "synthetic":
        # A synthetic world is an image-folder tree: read it through the generic source.
        split = source.get("split", "test")
        frame = folder.read_image_folder(Path(world_dir) / split, split=split)
    else:  # the schema rejects other types; this guards direct library use
        raise ValueError(f"benchmark source type {kind!r} is not supported")

    classnames = _classnames(spec, frame, world_dir)
    frame = manifest.make_manifest(frame)
    manifest.verify_images(frame)
    manifest.write_manifest(frame, manifest_path)
    io.write_json(classnames, classes_path)
    io.write_json(negatives, negatives_path)
    log.info("manifest %s: %d images, %d classes", manifest_path, frame.height, len(classnames))
    return frame


def _classnames(spec: dict, frame: pl.DataFrame, world_dir: str | Path | None) -> list[str]:
    """The full class list in label order: a named table, the world's classes, or the manifest's."""
    from fgvlm.data.classification import load_classnames

    if "classnames" in spec:
        return load_classnames(spec["classnames"])
    if world_dir is not None:
        return io.read_json(Path(world_dir) / "classes.json")
    pairs = frame.select("label", "classname").unique().sort("label")
    labels = pairs["label"].to_list()
    if labels != list(range(len(labels))):
        raise ValueError("manifest labels are not 0..C-1; name a class table with 'classnames'")
    return pairs["classname"].to_list()


def fetch_clip(source: dict, out_dir: str | Path, *, world_dirs: list[str | Path] = ()) -> None:
    """Fetch released CLIP weights, or materialize a tiny CLIP (random init, then optionally
    contrastive pretraining on the synthetic worlds' train images) into ``out_dir``."""
    from fgvlm.models import clip

    if source["type"] == "open_clip":
        clip.fetch_pretrained_clip(
            source["arch"], source["pretrained"], Path(out_dir), revision=source.get("revision")
        )
    elif source["type"] == "random_init" and "pretrain" in source:
        import tempfile

        pretrain = source["pretrain"]
        with tempfile.TemporaryDirectory(dir=Path(out_dir).parent) as tmp:
            init = Path(tmp) / "init"
            clip.materialize_random_clip(Path(source["model_config"]), init, source["seed"])
            summary = clip.contrastive_pretrain(
                init,
                Path(out_dir),
                world_pairs(world_dirs),
                steps=pretrain["steps"],
                seed=source["seed"],
                lr=pretrain.get("lr", 1e-3),
            )
        log.info("CLIP pretraining %s: %s", out_dir, summary)
    elif source["type"] == "random_init":
        clip.materialize_random_clip(Path(source["model_config"]), Path(out_dir), source["seed"])
    else:
        raise ValueError(f"CLIP source type {source['type']!r} is not supported")


def mine(
    manifest_path: str | Path,
    classes_path: str | Path,
    negatives_path: str | Path,
    clip_dir: str | Path,
    miner: dict,
    questions_path: str | Path,
    *,
    benchmark: str,
    batch_size: int = 64,
    device: str = "cpu",
) -> pl.DataFrame:
    """Mine 5-way questions (``miner``: ``fgvlm.config.miner_spec``) for one benchmark."""
    from fgvlm.data.manifest import read_manifest
    from fgvlm.mining import mine_questions
    from fgvlm.models.clip import load_clip

    frame = read_manifest(manifest_path)
    classnames = io.read_json(classes_path)
    model = load_clip(Path(clip_dir), device=device)
    questions = mine_questions(
        frame,
        model,
        benchmark=benchmark,
        classnames=classnames,
        templates=miner["templates"],
        seed=miner["seed"],
        k=miner["negatives"],
        batch_size=batch_size,
        device=device,
        candidates=io.read_json(negatives_path),
    )
    metadata = {
        "benchmark": benchmark,
        "miner": model.name,
        "templates": json.dumps(miner["templates"]),
        "negatives": str(miner["negatives"]),
        "seed": str(miner["seed"]),
    }
    io.write_parquet(questions, questions_path, metadata=metadata)
    log.info("questions %s: %d", questions_path, questions.height)
    return questions


def shard(
    questions_path: str | Path,
    manifest_path: str | Path,
    out_dir: str | Path,
    *,
    samples_per_shard: int,
) -> dict:
    """Write a question set and its images as WebDataset shards with an index."""
    from fgvlm.data.manifest import read_manifest
    from fgvlm.data.shards import write_question_shards

    return write_question_shards(
        pl.read_parquet(questions_path),
        read_manifest(manifest_path),
        Path(out_dir),
        samples_per_shard=samples_per_shard,
    )


def eval_clip(
    shard_dir: str | Path,
    classes_path: str | Path,
    clip_dir: str | Path,
    templates: list[str],
    predictions_path: str | Path,
    metrics_path: str | Path,
    *,
    metric: str = "accuracy",
    batch_size: int = 64,
    device: str = "cpu",
) -> dict:
    """Zero-shot CLIP baseline on one benchmark: N-way and 5-way, predictions and metrics."""
    from fgvlm.data.shards import iter_question_samples
    from fgvlm.evaluate.clip_zeroshot import evaluate_clip
    from fgvlm.models.clip import load_clip

    model = load_clip(Path(clip_dir), device=device)
    predictions, metrics = evaluate_clip(
        iter_question_samples(Path(shard_dir)),
        model,
        io.read_json(classes_path),
        templates,
        batch_size=batch_size,
        device=device,
        primary=metric,
    )
    io.write_parquet(predictions, predictions_path)
    io.write_json(metrics, metrics_path)
    return metrics


def vqa_benchmark(source: dict, out_path: str | Path) -> None:
    """Fetch a VLMEvalKit TSV (md5-checked) or write the demo's synthetic one."""
    if source["type"] == "synthetic_vqa":
        from fgvlm.data.synthetic import write_vqa_tsv

        write_vqa_tsv(
            Path(out_path),
            seed=source["seed"],
            n_questions=source.get("n_questions", 60),
            image_size=source.get("image_size", 32),
            style=source["style"],
        )
    elif source["type"] == "vlmeval_tsv":
        from fgvlm.data.download import download_file

        download_file(source["url"], Path(out_path), md5=source["md5"])
    else:
        raise ValueError(f"VQA source type {source['type']!r} is not supported")


# --- training (issue 3) ------------------------------------------------------------------------


def world_corpus(world_dirs: list[str | Path]) -> list[str]:
    """Text of the synthetic worlds (captions of both qualities, instruction turns) for tiny LMs."""
    lines: list[str] = []
    for world in map(Path, world_dirs):
        for row in _jsonl(world / "captions.jsonl"):
            lines += [row["short"], row["long"]]
        for row in _jsonl(world / "instructions.jsonl"):
            lines += [turn["value"].replace("<image>", "").strip() for turn in row["conversations"]]
    return [line for line in lines if line]


def _jsonl(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def materialize_llm(source: dict, out_dir: str | Path, *, world_dirs: list[str | Path]) -> dict:
    """Fetch a released LLM, or create a tiny one pre-trained on the worlds' text."""
    from fgvlm.models import llm

    if source["type"] == "hub":
        llm.fetch_llm(source["repo"], source.get("revision", "main"), Path(out_dir))
        return {"repo": source["repo"]}
    if source["type"] == "tiny":
        return llm.materialize_tiny_llm(
            Path(out_dir),
            family=source["family"],
            corpus=world_corpus(world_dirs),
            seed=source["seed"],
            hidden_size=source.get("hidden_size", 96),
            layers=source.get("layers", 2),
            text_pretrain_steps=source.get("text_pretrain_steps", 300),
        )
    raise ValueError(f"LLM source type {source['type']!r} is not supported")


def training_samples(source: dict, *, raw_dir: str | Path, world_dirs: list[str | Path]):
    """(record, image) pairs of one training-data source, in a fixed order."""
    from fgvlm.data import conversations

    kind = source["type"]
    if kind == "synthetic_captions":
        for world in world_dirs:
            yield from conversations.read_synthetic_captions(Path(world), source["quality"])
    elif kind == "synthetic_instructions":
        for world in world_dirs:
            yield from conversations.read_synthetic_instructions(Path(world))
    else:
        yield from conversations.read_training_source(source, Path(raw_dir))


def shard_train_data(
    source: dict,
    out_dir: str | Path,
    *,
    raw_dir: str | Path,
    world_dirs: list[str | Path],
    samples_per_shard: int,
    shuffle_seed: int = 0,
) -> dict:
    """Write one training-data source as conversation shards, in a seeded random order.

    Sources list their samples grouped (by class, by dataset); the trainer reads whole shards
    and shuffles only within a buffer, so the shards themselves must be mixed.
    """
    import random

    from fgvlm.data.shards import write_conversation_shards

    samples = list(training_samples(source, raw_dir=raw_dir, world_dirs=world_dirs))
    random.Random(shuffle_seed).shuffle(samples)
    return write_conversation_shards(samples, Path(out_dir), samples_per_shard=samples_per_shard)


def materialize_base_vlm(
    source: dict, out_dir: str | Path, *, text_model_dir: str | Path | None = None
) -> None:
    """Fetch a base VLM (Qwen2-VL base), or build the demo's tiny transformers-native one."""
    from fgvlm.models import hub

    if source["type"] == "hub":
        hub.fetch_hub_vlm(source["repo"], source.get("revision", "main"), Path(out_dir))
    elif source["type"] == "tiny_qwen2_vl":
        hub.materialize_tiny_hub_vlm(
            "qwen2_vl",
            Path(out_dir),
            tokenizer_dir=Path(text_model_dir),
            seed=source["seed"],
            text_model_dir=Path(text_model_dir),
        )
    else:
        raise ValueError(f"base VLM source type {source['type']!r} is not supported")


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
    )


# --- VLM evaluation (issue 4) ------------------------------------------------------------------


def eval_vlm(
    spec: dict,
    model_dir: str | Path,
    data_path: str | Path,
    predictions_path: str | Path,
    metrics_path: str | Path,
    details_path: str | Path,
    *,
    parts_dir: str | Path,
    questions_path: str | Path | None = None,
    batch_size: int = 16,
    part_size: int = 512,
    device: str = "cpu",
) -> dict:
    """Evaluate one VLM on one benchmark (``spec``: ``fgvlm.config.vlm_eval_spec``).

    Answers are scored in parts under ``parts_dir`` so that a killed job resumes; predictions,
    metrics (with the agreement of the scoring mode with greedy generation) and a details file
    (per-class accuracy and confusions, or per-category accuracy) are written at the end.
    """
    import numpy as np

    from fgvlm.evaluate.metrics import summarize
    from fgvlm.evaluate.runners import load_runner, question_source
    from fgvlm.evaluate.scoring import evaluate_mcq, files_fingerprint, question_items

    model, benchmark = spec["model"], spec["benchmark"]
    runner = load_runner(model, Path(model_dir), device=device)
    stream, answers, counts = question_source(benchmark, Path(data_path), questions_path)
    option_prompt = model.get("option_prompt", "cloze")
    predictions, summary = evaluate_mcq(
        runner,
        lambda: question_items(stream(), style=model["style"], option_prompt=option_prompt),
        answers,
        Path(parts_dir),
        mode=model["mode"],
        batch_size=batch_size,
        part_size=part_size,
        max_new_tokens=model["max_new_tokens"],
        # parts scored after another prompt are not reused
        fingerprint=f"{files_fingerprint(model_dir, questions_path or data_path)}:{option_prompt}",
    )
    if benchmark["kind"] == "questions":
        from fgvlm.evaluate.analysis import per_class_report

        questions = pl.read_parquet(questions_path)
        labels = predictions.join(questions.select("qid", "label"), on="qid", how="left")["label"]
        details = per_class_report(predictions, questions)
        correct, labels, unparsable = (
            predictions["correct"].to_numpy(),
            labels.to_numpy(),
            predictions["pred"].is_null().to_numpy(),
        )
    else:
        predictions = predictions.with_columns(
            pl.col("qid").replace_strict(counts["groups"], default=pl.col("qid")).alias("group")
        )
        correct, unparsable, details = _vqa_correctness(predictions, counts)
        labels = None
    metrics = summarize(correct, labels, unparsable, primary=benchmark["metric"])
    metrics.update(summary)
    metrics["generate_accuracy"] = float(np.mean(predictions["generate_correct"].to_numpy()))
    metrics["questions"] = {k: v for k, v in counts.items() if not isinstance(v, dict)}
    metrics["model"], metrics["style"] = model["name"], model["style"]
    io.write_parquet(predictions, predictions_path)
    io.write_json(details, details_path)
    io.write_json(metrics, metrics_path)
    log.info("%s: %s", metrics_path, {k: metrics[k] for k in ("accuracy", "n", "mode")})
    return metrics


def _vqa_correctness(predictions: pl.DataFrame, counts: dict):
    """Per-question (or, for MMBench's CircularEval copies, per-group: all copies right)
    correctness, unparsable flags, and per-category accuracy. ``predictions`` has a ``group``
    column (the question itself when it has no copies)."""
    import numpy as np

    frame = predictions.with_columns(
        pl.col("qid").replace_strict(counts.get("categories") or {}, default="").alias("category"),
    )
    grouped = frame.group_by("group", maintain_order=True).agg(
        pl.col("correct").all(),
        pl.col("pred").is_null().any().alias("unparsable"),
        pl.col("category").first(),
    )
    per_category = (
        grouped.group_by("category")
        .agg(pl.col("correct").mean().alias("accuracy"), pl.len().alias("n"))
        .sort("category")
    )
    details = {"per_category": per_category.to_dicts(), "groups": grouped.height}
    return grouped["correct"].to_numpy(), grouped["unparsable"].to_numpy().astype(np.bool_), details


def materialize_hub_vlm(
    vlm: dict, out_dir: str | Path, *, text_model_dir: str | Path | None
) -> None:
    """Fetch a released VLM (safetensors only), or build the demo's tiny stand-in."""
    from fgvlm.models import hub

    if "tiny" in vlm:
        hub.materialize_tiny_hub_vlm(
            vlm["tiny"]["kind"],
            Path(out_dir),
            tokenizer_dir=Path(text_model_dir),
            seed=vlm["tiny"]["seed"],
            text_model_dir=Path(text_model_dir),
        )
    else:
        hub.fetch_hub_vlm(
            vlm["repo"],
            vlm.get("revision", "main"),
            Path(out_dir),
            trust_remote_code=vlm.get("trust_remote_code", False),
            tokenizer=vlm.get("tokenizer"),
        )


# --- aggregation, tables and figures (issue 5) -------------------------------------------------


def aggregate_ablations(
    study: dict, out_dir: str | Path, *, results_dir: str | Path = "results"
) -> dict:
    """The ablation table, factor effects (paired intervals, McNemar) and Tables 1-4.

    ``study`` (``fgvlm.config.report_spec``): runs with their factor labels, the results name
    of each run, the fine-grained and general benchmark lists, benchmark labels, and the runs
    left out of the effects (replicates).
    """
    from fgvlm.report.aggregate import build_outputs, collect_metrics, collect_paired

    benchmarks = [*study["fine_grained"], *study["general"]]
    models = study["models"]
    return build_outputs(
        collect_metrics(results_dir, models, benchmarks),
        pl.DataFrame(study["runs"]),
        out_dir,
        fine_grained=study["fine_grained"],
        general=study["general"],
        paired=collect_paired(results_dir, models, benchmarks),
        exclude=study["exclude"],
        labels=study["labels"],
    )


def aggregate_models(
    study: dict, out_path: str | Path, *, results_dir: str | Path = "results"
) -> None:
    """Section 3's table: hub VLMs (fine-grained and general averages) and CLIP baselines."""
    from fgvlm.report.aggregate import collect_metrics, write_csv
    from fgvlm.report.tables import models_table

    fine, general = study["fine_grained"], study["general"]
    vlms = collect_metrics(results_dir, study["hub_models"], [*fine, *general])
    clips = collect_metrics(results_dir, study["clip_models"], fine, nway=True)
    table = models_table(
        vlms,
        clips,
        fine_grained=fine,
        general=general,
        labels=study["model_labels"],
        encoders=study["encoders"],
    )
    write_csv(table, out_path)


def make_figures(
    tables_dir: str | Path,
    models_csv: str | Path,
    details_path: str | Path,
    out_dir: str | Path,
    *,
    confusion_title: str,
    row_encoders: dict[str, str] | None = None,
) -> list[Path]:
    """Figures 2-8 and a per-class confusion view, as SVG and HTML in ``out_dir``.

    ``row_encoders`` maps trained ablation runs to the CLIP model of their vision tower, so that
    Figure 3 sets them beside their encoders too (hub VLMs only where the config names one).
    """
    from fgvlm.report import figures

    tables_dir, out_dir = Path(tables_dir), Path(out_dir)
    models = pl.read_csv(models_csv, schema_overrides={"clip": pl.Utf8})
    ablations = pl.read_csv(tables_dir / "ablations.csv")
    trained = ablations.filter(pl.col("run").is_in(list(row_encoders or {}))).select(
        model=pl.col("run"),
        label=pl.col("run"),
        kind=pl.lit("vlm"),
        clip=pl.col("run").replace_strict(row_encoders or {}, return_dtype=pl.Utf8),
        fine_grained=pl.col("classification"),
        general=pl.col("vlm"),
        n_way=pl.lit(None, dtype=pl.Float64),
    )
    with_rows = pl.concat([models.select(trained.columns), trained], how="vertical_relaxed")
    pairs = pl.read_csv(tables_dir / "effects.csv", infer_schema_length=None)
    charts = {
        "figure2": figures.figure2_fine_vs_general(models),
        "figure3": figures.figure3_vlm_vs_encoder(with_rows),
        **{
            name: figures.factor_figure(pairs, factor)
            for name, factor in figures.FIGURE_FACTORS.items()
        },
        "confusion": figures.confusion_figure(io.read_json(details_path), title=confusion_title),
    }
    progression = tables_dir / "progression.csv"
    if progression.is_file():
        charts["figure8"] = figures.figure8_progression(pl.read_csv(progression))
    written = []
    for name, chart in charts.items():
        written += figures.save_chart(chart, out_dir / name)
    return written
