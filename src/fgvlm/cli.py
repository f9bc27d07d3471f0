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
    cfg = study.load_config(args.path)
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
        device=study.device_of(cfg),
    )
    print(
        f"{args.model} on {args.benchmark}: {metrics['primary']} "
        f"{metrics[metrics['primary']]:.3f} ({metrics['mode']}; n={metrics['n']}, "
        f"agreement with generate {metrics['agreement_with_generate']:.3f})"
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


def cmd_cost(args: argparse.Namespace, cfg: dict) -> None:
    import json

    from fgvlm.data.shards import check_coverage
    from fgvlm.training import cost
    from fgvlm.training.recipe import Recipe, per_device_batch

    jobs = []
    specs = [("pretrain", key, spec) for key, spec in study.pretrain_jobs(cfg).items()]
    specs += [
        ("finetune", row["name"], study.finetune_spec(cfg, row)) for row in study.trained_rows(cfg)
    ]
    for family, name, spec in specs:
        data = cfg["train_data"].get(spec["data"])
        if data is None:
            continue  # builtin: nothing is trained on it here
        if "expected_samples" not in data:
            raise study.ConfigError(f"train_data.{spec['data']}: no expected_samples to size it")
        resources = cfg["resources"][family]
        gpus = max(1, resources.get("gpu", 0)) * resources.get("nodes", 1)
        recipe = Recipe.from_config(spec["recipe"])
        per_device = per_device_batch(recipe, gpus)
        check_coverage(  # the job would stop at its start otherwise
            data["expected_samples"],
            world_size=gpus,
            num_workers=cfg["training"]["dataloader_workers"],
            batch_size=per_device,
            grad_accum=max(1, recipe.global_batch // (gpus * per_device)),
            where=f"{family} {name} ({spec['data']})",
        )
        jobs.append(cost.Job(family, name, data["expected_samples"], recipe.epochs, gpus))
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
