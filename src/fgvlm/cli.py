"""``fgvlm``: every rule of the workflow from the command line, without Snakemake.

Each subcommand reads the study config, takes the job's config subtree exactly as its rule does
(``fgvlm.config``), finds its inputs and outputs in the DAG's file layout (``fgvlm.paths``, the
module the rules use too; every path can be overridden) and calls the rule's function in
``fgvlm.stages``. Run them from the folder the workflow runs in:

    fgvlm validate-config config/demo.yaml
    fgvlm synthesize --config config/demo.yaml --world shapes
    fgvlm eval-clip --config config/demo.yaml --benchmark shapes --clip tiny_p8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fgvlm import config as study
from fgvlm import logs, paths, stages


def cmd_validate_config(args: argparse.Namespace) -> None:
    from fgvlm.training.cost import study_jobs

    cfg = study.load_config(args.path)
    study_jobs(cfg)  # every training job's data split fits its ranks x loader workers
    print(
        f"{args.path}: valid — {len(cfg['benchmarks'])} benchmarks, "
        f"{len(cfg['vqa_benchmarks'])} VQA benchmarks, {len(cfg['clip_models'])} CLIP "
        f"models, {len(cfg['ablations'])} ablation rows ({len(study.trained_rows(cfg))} trained, "
        f"{len(study.pretrain_jobs(cfg))} pretraining jobs), {len(cfg['hub_vlms'])} hub VLMs"
    )


def cmd_synthesize(args: argparse.Namespace, cfg: dict) -> None:
    world = _lookup(cfg, "synthetic_worlds", args.world)
    stages.synthesize_world(
        study.canonical(world), args.out or paths.WORLD.format(world=args.world)
    )


def cmd_manifest(args: argparse.Namespace, cfg: dict) -> None:
    _lookup(cfg, "benchmarks", args.benchmark)
    outputs = paths.manifest_outputs(args.benchmark)
    stages.build_manifest(
        study.benchmark_spec(cfg, args.benchmark),
        **_override(paths.manifest_inputs(cfg, args.benchmark), args),
        **_override(outputs, args),
        raw_dir=args.raw_dir or paths.RAW.format(benchmark=args.benchmark),
    )


def cmd_vqa_benchmark(args: argparse.Namespace, cfg: dict) -> None:
    bench = _lookup(cfg, "vqa_benchmarks", args.name)
    stages.vqa_benchmark(bench["source"], args.out or paths.VQA_TSV.format(vqa=args.name))


def cmd_fetch_clip(args: argparse.Namespace, cfg: dict) -> None:
    model = _lookup(cfg, "clip_models", args.clip)
    stages.fetch_clip(
        model["source"],
        args.out or paths.CLIP.format(clip=args.clip),
        **paths.clip_inputs(cfg, args.clip),
    )


def cmd_materialize_hub_vlm(args: argparse.Namespace, cfg: dict) -> None:
    _lookup(cfg, "hub_vlms", args.hub)
    stages.materialize_hub_vlm(
        study.hub_vlm_spec(cfg, args.hub),
        args.out or paths.HUB_VLM.format(hub=args.hub),
        **paths.hub_vlm_inputs(cfg, args.hub),
    )


def cmd_mine(args: argparse.Namespace, cfg: dict) -> None:
    _lookup(cfg, "benchmarks", args.benchmark)
    stages.mine_questions(
        study.miner_spec(cfg),
        **_override(paths.question_inputs(cfg, args.benchmark), args),
        out=args.out or paths.QUESTIONS.format(benchmark=args.benchmark),
        benchmark=args.benchmark,
        batch_size=cfg["miner"]["batch_size"],
        device=study.device_of(cfg),
    )


def cmd_shard(args: argparse.Namespace, cfg: dict) -> None:
    _lookup(cfg, "benchmarks", args.benchmark)
    index = stages.shard_questions(
        questions=args.questions or paths.QUESTIONS.format(benchmark=args.benchmark),
        manifest=args.manifest or paths.MANIFEST.format(benchmark=args.benchmark),
        out=args.out or paths.QUESTION_SHARDS.format(benchmark=args.benchmark),
        samples_per_shard=cfg["shards"]["samples_per_shard"],
    )
    print(f"{len(index['shards'])} shards, {index['total']} samples")


def cmd_eval_clip(args: argparse.Namespace, cfg: dict) -> None:
    _lookup(cfg, "benchmarks", args.benchmark)
    _lookup(cfg, "clip_models", args.clip)
    model = f"clip-{args.clip}"
    outputs = paths.eval_outputs(model, args.benchmark)
    metrics = stages.eval_clip(
        study.clip_eval_spec(cfg, args.clip),
        **paths.clip_eval_inputs(args.benchmark, args.clip),
        predictions=args.predictions or outputs["predictions"],
        metrics=args.metrics or outputs["metrics"],
        metric=study.metric_of(cfg, args.benchmark),
        batch_size=cfg["clip_eval"]["batch_size"],
        device=study.device_of(cfg),
    )
    print(
        f"{model} on {args.benchmark}: 5-way {metrics['accuracy']:.3f}, "
        f"N-way {metrics['nway_accuracy']:.3f} (n={metrics['n']})"
    )


def cmd_materialize_llm(args: argparse.Namespace, cfg: dict) -> None:
    llm = _lookup(cfg, "llms", args.llm)
    stages.materialize_llm(
        llm["source"], args.out or paths.LLM.format(llm=args.llm), **paths.llm_inputs(cfg, args.llm)
    )


def cmd_materialize_base_vlm(args: argparse.Namespace, cfg: dict) -> None:
    base = _lookup(cfg, "base_vlms", args.base)
    stages.materialize_base_vlm(
        base["source"],
        args.out or paths.BASE_VLM.format(base=args.base),
        **paths.base_vlm_inputs(cfg, args.base),
    )


def cmd_shard_train(args: argparse.Namespace, cfg: dict) -> None:
    source = _lookup(cfg, "train_data", args.data)["source"]
    index = stages.shard_train_data(
        source,
        args.out or paths.TRAIN_SHARDS.format(data=args.data),
        **paths.train_data_inputs(cfg, args.data),
        raw_dir=paths.TRAIN_RAW.format(data=args.data),
        samples_per_shard=cfg["training"]["samples_per_shard"],
    )
    print(f"{len(index['shards'])} shards, {index['total']} samples")


def cmd_train(args: argparse.Namespace, cfg: dict) -> None:
    """One pretraining (--pretrain KEY) or finetuning (--run NAME) job, resumable."""
    if args.pretrain:
        jobs = study.pretrain_jobs(cfg)
        if args.pretrain not in jobs:
            known = ", ".join(jobs) or "none"
            raise study.ConfigError(f"no pretraining job {args.pretrain!r} (known: {known})")
        spec = jobs[args.pretrain]
        inputs = paths.pretrain_inputs(cfg, args.pretrain)
        out = args.out or paths.PRETRAIN.format(pretrain_key=args.pretrain)
    else:
        spec = study.finetune_spec(cfg, study.trained_row(cfg, args.run))
        inputs = paths.finetune_inputs(cfg, args.run)
        out = args.out or paths.FINETUNE.format(run=args.run)
    stages.train_stage(
        spec,
        out,
        state_dir=paths.state_dir(out),
        data_dir=inputs["data"],
        clip_dir=inputs.get("clip"),
        llm_dir=inputs.get("llm"),
        init_dir=inputs.get("init"),
        base_dir=inputs.get("base"),
        device=study.device_of(cfg),
        checkpoint_every=cfg["training"]["checkpoint_every"],
        dataloader_workers=cfg["training"]["dataloader_workers"],
        log_every=cfg["training"]["log_every"],
        peak_tflops=cfg["training"]["peak_tflops"],
    )


def cmd_eval_vlm(args: argparse.Namespace, cfg: dict) -> None:
    models = study.vlm_models(cfg)
    if args.model not in models:
        raise study.ConfigError(f"no VLM {args.model!r} (known: {', '.join(models)})")
    if args.benchmark not in study.vlm_benchmarks(cfg):
        known = ", ".join(study.vlm_benchmarks(cfg))
        raise study.ConfigError(f"no benchmark {args.benchmark!r} (known: {known})")
    inputs = paths.eval_vlm_inputs(cfg, args.model, args.benchmark)
    if args.model_dir:
        inputs["model"] = args.model_dir
    evaluation = cfg["evaluation"]
    metrics = stages.eval_vlm(
        study.vlm_eval_spec(cfg, args.model, args.benchmark),
        **inputs,
        **paths.eval_outputs(args.model, args.benchmark),
        parts_dir=paths.PARTS.format(model=args.model, vlm_benchmark=args.benchmark),
        batch_size=evaluation["batch_size"],
        part_size=evaluation["part_size"],
        loader_workers=evaluation["loader_workers"],
        device=study.device_of(cfg),
    )
    print(
        f"{args.model} on {args.benchmark}: {metrics['primary']} "
        f"{metrics[metrics['primary']]:.3f} ({metrics['mode']}; n={metrics['n']}, "
        f"agreement with generate {metrics['agreement_with_generate']:.3f})"
    )


def cmd_imagenet_subset(args: argparse.Namespace) -> None:
    from fgvlm.data import imagenet

    annotations = imagenet.load_annotations(args.annotations)
    paper = imagenet.PAPER_SUBSET_COUNTS
    pool = imagenet.annotated_pool(annotations)
    print("paper (App. B.1): 19,056 annotated examples -> 5,457 images, 928 classes")
    print("annotated pool: " + ", ".join(f"{k} {v}" for k, v in pool.items()))
    print("single_correct keep_problematic min_wrong  images  classes (min-max)  paper")
    for row in imagenet.candidate_rule_counts(annotations, args.min_wrong):
        classes = f"{row['classes_min']}-{row['classes_max']}"
        print(
            f"{row['single_correct']!s:>14} {row['keep_problematic']!s:>16} {row['min_wrong']:>9}"
            f"  {row['images']:>6}  {classes:>17}  {'MATCH' if row['matches_paper'] else ''}"
        )
    print(f"(match: {paper['images']} images and {paper['classes']} classes within the bounds)")


def cmd_fetch_archive(args: argparse.Namespace, cfg: dict) -> None:
    source = _lookup(cfg, "train_data", args.data)["source"]
    if args.archive not in paths.train_archives(source):
        known = ", ".join(paths.train_archives(source)) or "none"
        raise study.ConfigError(f"train_data.{args.data}: no archive {args.archive!r} ({known})")
    record = stages.fetch_train_archive(
        source["archives"][args.archive],
        args.out or paths.TRAIN_ARCHIVE.format(data=args.data, archive=args.archive),
        download_dir=paths.TRAIN_DOWNLOADS.format(data=args.data),
    )
    print(f"{record['files']} files, {record['bytes'] / 1e9:.2f} GB")


def cmd_fetch_urls(args: argparse.Namespace, cfg: dict) -> None:
    source = _lookup(cfg, "train_data", args.data)["source"]
    if args.urls not in paths.train_url_lists(source):
        known = ", ".join(paths.train_url_lists(source)) or "none"
        raise study.ConfigError(f"train_data.{args.data}: no URL list {args.urls!r} ({known})")
    report = stages.fetch_train_urls(
        source,
        args.urls,
        args.out or paths.TRAIN_URLS.format(data=args.data, urls=args.urls),
        raw_dir=paths.TRAIN_RAW.format(data=args.data),
        processes=args.processes or cfg["resources"]["download"]["cpus"],
    )
    print(f"{report['kept']} of {report['tried']} kept ({report['kept_fraction']:.1%})")


def cmd_data_plan(args: argparse.Namespace, cfg: dict) -> None:
    used = {row[k] for row in study.trained_rows(cfg) for k in ("pt_data", "ft_data")}
    rows = stages.data_plan(cfg["train_data"], used)
    print(
        f"{'source':<16}{'trained on':>11}{'downloads':>10}{'download GB':>13}"
        f"{'on disk GB':>12}{'samples':>11}"
    )
    for row in rows:
        print(
            f"{row['source']:<16}{'yes' if row['used'] else 'no':>11}{row['downloads']:>10}"
            f"{row['download_gb']:>13,.1f}{row['extracted_gb']:>12,.1f}{row['samples']:>11,}"
        )
    total = [r for r in rows if r["used"]]
    print(
        f"{'total (trained)':<16}{'':>11}{sum(r['downloads'] for r in total):>10}"
        f"{sum(r['download_gb'] for r in total):>13,.1f}"
        f"{sum(r['extracted_gb'] for r in total):>12,.1f}{sum(r['samples'] for r in total):>11,}"
    )


def cmd_aggregate(args: argparse.Namespace) -> None:
    from fgvlm.report.aggregate import aggregate, read_report_definitions

    out = aggregate(
        args.metrics,
        args.runs,
        args.out,
        fine_grained=args.fine_grained,
        general=args.general,
        exclude=args.exclude,
        report=read_report_definitions(args.report) if args.report else None,
    )
    print(
        f"{out['rows']} rows, {out['pairs']} one-factor pairs: {out['ablations']}, "
        f"{out['effects']}, {out['effects_summary']}"
    )


def cmd_aggregate_ablations(args: argparse.Namespace, cfg: dict) -> None:
    from fgvlm.report.aggregate import study_files

    spec = study.report_spec(cfg)
    out = stages.aggregate_ablations(
        spec, study_files(spec, paths.RESULTS), args.out or paths.TABLES
    )
    print(f"{out['rows']} rows, {out['pairs']} one-factor pairs: {out['ablations']}")


def cmd_aggregate_models(args: argparse.Namespace, cfg: dict) -> None:
    from fgvlm.report.aggregate import model_files

    spec = study.models_spec(cfg)
    out = args.out or paths.table("models.csv")
    stages.aggregate_models(spec, model_files(spec, paths.RESULTS), out)
    print(out)


def cmd_figures(args: argparse.Namespace, cfg: dict) -> None:
    inputs = paths.figure_inputs(cfg)
    written = stages.make_figures(
        inputs,
        args.out or paths.FIGURES,
        report=study.report_spec(cfg)["report"],
        repos=study.models_spec(cfg)["repos"],
        row_encoders=study.row_encoders(cfg),
        confusion_title=f"Per-class accuracy and confusions: {inputs['details']}",
    )
    print(f"{len(written)} files in {args.out or paths.FIGURES}")


def cmd_provenance(args: argparse.Namespace, cfg: dict) -> None:
    from fgvlm.provenance import provenance_spec

    out = args.out or paths.PROVENANCE
    rows = stages.provenance(provenance_spec(cfg), out, root=args.root)
    print(f"{out}: {rows} sources")


def cmd_cost(args: argparse.Namespace, cfg: dict) -> None:
    import json

    from fgvlm.training import cost

    jobs = cost.study_jobs(cfg)
    if args.bench:
        rates = cost.throughput_from_bench(json.loads(args.bench.read_text()))
    else:
        rates = {}
    for family in ("pretrain", "finetune"):
        given = getattr(args, f"{family}_tokens_per_s")
        if given:
            rates[family] = given
    positions = {
        family: value
        for family in ("pretrain", "finetune")
        if (value := getattr(args, f"{family}_positions"))
    }
    for line in cost.format_bill(cost.bill(jobs, rates, positions)):
        print(line)


def _lookup(cfg: dict, table: str, name: str) -> dict:
    entries = cfg[table]
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none defined"
        raise study.ConfigError(f"{table}: no entry {name!r} (known: {known})")
    return entries[name]


def _override(files: dict, args: argparse.Namespace) -> dict:
    """``files`` (a job's named inputs or outputs) with those given on the command line."""
    return {name: getattr(args, name, None) or path for name, path in files.items()}


def _with_config(func):
    """A subcommand that reads the study config first (``--config``)."""
    return lambda args: func(args, study.load_config(args.config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fgvlm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_text: str, *, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config:
            p.add_argument("--config", default="config/config.yaml", type=Path)
            func = _with_config(func)
        p.set_defaults(func=func)
        return p

    p = add("validate-config", cmd_validate_config, "Validate a study config.", config=False)
    p.add_argument("path", type=Path)

    p = add("synthesize", cmd_synthesize, "Draw a synthetic world (rule synthesize_world).")
    p.add_argument("--world", required=True)
    p.add_argument("--out")

    p = add("manifest", cmd_manifest, "Download and normalize a benchmark (rule build_manifest).")
    p.add_argument("--benchmark", required=True)
    for opt in ("--manifest", "--classes", "--candidates", "--raw-dir", "--world"):
        p.add_argument(opt)

    p = add("vqa-benchmark", cmd_vqa_benchmark, "Fetch or synthesize a general-VQA TSV.")
    p.add_argument("--name", required=True)
    p.add_argument("--out")

    p = add("fetch-clip", cmd_fetch_clip, "Fetch or materialize a CLIP model (rule fetch_clip).")
    p.add_argument("--clip", required=True)
    p.add_argument("--out")

    p = add("materialize-hub-vlm", cmd_materialize_hub_vlm, "Fetch a released VLM or a stand-in.")
    p.add_argument("--hub", required=True)
    p.add_argument("--out")

    p = add("mine", cmd_mine, "Mine 5-way questions with CLIP hard negatives (mine_questions).")
    p.add_argument("--benchmark", required=True)
    for opt in ("--manifest", "--classes", "--candidates", "--clip", "--out"):
        p.add_argument(opt)

    p = add("shard", cmd_shard, "Write a question set as WebDataset shards (shard_questions).")
    p.add_argument("--benchmark", required=True)
    for opt in ("--questions", "--manifest", "--out"):
        p.add_argument(opt)

    p = add("eval-clip", cmd_eval_clip, "Zero-shot CLIP baseline on one benchmark (eval_clip).")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--clip", required=True)
    for opt in ("--predictions", "--metrics"):
        p.add_argument(opt)

    p = add("materialize-llm", cmd_materialize_llm, "Fetch an LLM or create a tiny one.")
    p.add_argument("--llm", required=True)
    p.add_argument("--out")

    p = add("materialize-base-vlm", cmd_materialize_base_vlm, "Fetch a base VLM or a tiny one.")
    p.add_argument("--base", required=True)
    p.add_argument("--out")

    p = add("shard-train", cmd_shard_train, "Write a training-data source as shards.")
    p.add_argument("--data", required=True)
    p.add_argument("--out")

    p = add("train", cmd_train, "One pretraining or finetuning job (rules pretrain, finetune).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--pretrain", metavar="KEY", help="a pretraining job (fgvlm.config.pretrain_jobs)"
    )
    which.add_argument("--run", metavar="NAME", help="a trained ablation row (its finetuning)")
    p.add_argument("--out")

    p = add("eval-vlm", cmd_eval_vlm, "Evaluate one VLM on one benchmark (resumable).")
    p.add_argument("--model", required=True, help="a trained row name or hub-<name>")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--model-dir")

    p = add("aggregate-ablations", cmd_aggregate_ablations, "Table 2, the effects and Table 1.")
    p.add_argument("--out", help="tables folder")

    p = add("aggregate-models", cmd_aggregate_models, "Section 3's table of released models.")
    p.add_argument("--out", help="CSV file")

    p = add("figures", cmd_figures, "Figures 2-8 and the per-class view (rule figures).")
    p.add_argument("--out", help="figures folder")

    p = add(
        "imagenet-subset",
        cmd_imagenet_subset,
        "Counts each candidate ImageNet subset rule gives, beside the paper's 5,457 / 928.",
        config=False,
    )
    p.add_argument("--annotations", required=True, type=Path, help="human_accuracy_v3.0.0.json")
    p.add_argument("--min-wrong", nargs="+", type=int, default=[1, 2, 3, 4, 5], metavar="N")
    p = add("fetch-archive", cmd_fetch_archive, "Download and extract a training image archive.")
    p.add_argument("--data", required=True)
    p.add_argument("--archive", required=True)
    p.add_argument("--out")

    p = add("fetch-urls", cmd_fetch_urls, "Fetch a training source's image URL list (resumable).")
    p.add_argument("--data", required=True)
    p.add_argument("--urls", default="images", help="the URL list (PixMo-Cap's is 'images')")
    p.add_argument("--processes", type=int, help="default: resources.download.cpus")
    p.add_argument("--out")

    p = add("data-plan", cmd_data_plan, "Disk, download and sample counts of the training data.")

    p = add(
        "provenance",
        cmd_provenance,
        "Every model's and training source's commit and every VQA TSV's md5 (provenance.csv).",
    )
    p.add_argument("--root", default=".", help="the folder the workflow runs in")
    p.add_argument("--out")
    p = add("cost", cmd_cost, "Expected GPU-hours of every training job, before submitting.")
    p.add_argument("--bench", type=Path, help="bench/gpu_bench.py's JSON (measured tokens/s)")
    for family in ("pretrain", "finetune"):
        p.add_argument(
            f"--{family}-tokens-per-s",
            type=float,
            help=f"LM positions/s per GPU of {family} jobs (overrides --bench)",
        )
        p.add_argument(f"--{family}-positions", type=float, help="LM positions per sample")

    p = add(
        "aggregate",
        cmd_aggregate,
        "Ablation table and factor effects from per-benchmark accuracies.",
        config=False,
    )
    p.add_argument("--metrics", required=True, type=Path, help="CSV: model,benchmark,accuracy")
    p.add_argument("--runs", required=True, type=Path, help="CSV: run + the six factor columns")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--fine-grained", nargs="+", metavar="BENCHMARK")
    p.add_argument("--general", nargs="+", metavar="BENCHMARK")
    p.add_argument("--exclude", action="append", default=[], metavar="RUN")
    p.add_argument(
        "--report",
        type=Path,
        metavar="YAML",
        help="the report: definitions (Table 1, effects' pair sets): a study config or the section",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup()
    try:
        args.func(args)
    except (study.ConfigError, ValueError, FileNotFoundError) as err:
        print(f"fgvlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
