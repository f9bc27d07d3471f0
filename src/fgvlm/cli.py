"""``fgvlm``: every stage of the workflow from the command line, without Snakemake.

Each subcommand reads the study config for the subtree it needs and uses the DAG's file layout
by default (``data/``, ``results/``, ``shards/``, ``models/``); every path can be overridden.

    fgvlm validate-config config/demo.yaml
    fgvlm mine --config config/demo.yaml --benchmark shapes
    fgvlm eval-clip --config config/demo.yaml --benchmark shapes --clip tiny_p8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fgvlm import config as fc
from fgvlm import logs, stages


def _config(args: argparse.Namespace) -> dict:
    return fc.load_config(args.config)


def cmd_validate_config(args: argparse.Namespace) -> None:
    cfg = fc.load_config(args.path)
    rows = cfg.get("ablations") or []
    print(
        f"{args.path}: valid — {len(cfg['benchmarks'])} benchmarks, "
        f"{len(cfg.get('vqa_benchmarks') or {})} VQA benchmarks, {len(cfg['clip_models'])} CLIP "
        f"models, {len(rows)} ablation rows ({len(fc.trained_rows(cfg))} trained, "
        f"{len(fc.pretrain_jobs(cfg))} pretraining jobs), {len(cfg.get('hub_vlms') or {})} hub VLMs"
    )


def cmd_synthesize(args: argparse.Namespace) -> None:
    cfg = _config(args)
    world = _lookup(cfg, "synthetic_worlds", args.world)
    stages.synthesize_world(world, args.out or f"data/synthetic/{args.world}")


def cmd_manifest(args: argparse.Namespace) -> None:
    cfg = _config(args)
    _lookup(cfg, "benchmarks", args.benchmark)
    spec = fc.benchmark_spec(cfg, args.benchmark)
    world_dir = None
    if spec["source"]["type"] == "synthetic":
        world_dir = args.world_dir or f"data/synthetic/{spec['source']['world']}"
    stages.build_manifest(
        spec,
        args.out or f"data/{args.benchmark}/manifest.parquet",
        args.classes or f"data/{args.benchmark}/classes.json",
        args.negatives or f"data/{args.benchmark}/negatives.json",
        raw_dir=args.raw_dir or f"data/raw/{args.benchmark}",
        world_dir=world_dir,
    )


def cmd_vqa_benchmark(args: argparse.Namespace) -> None:
    cfg = _config(args)
    bench = _lookup(cfg, "vqa_benchmarks", args.name)
    stages.vqa_benchmark(bench["source"], args.out or f"data/vqa/{args.name}.tsv")


def cmd_fetch_clip(args: argparse.Namespace) -> None:
    cfg = _config(args)
    model = _lookup(cfg, "clip_models", args.clip)
    stages.fetch_clip(model["source"], args.out or f"models/clip/{args.clip}")


def cmd_mine(args: argparse.Namespace) -> None:
    cfg = _config(args)
    _lookup(cfg, "benchmarks", args.benchmark)
    miner = fc.miner_spec(cfg)
    stages.mine(
        args.manifest or f"data/{args.benchmark}/manifest.parquet",
        args.classes or f"data/{args.benchmark}/classes.json",
        args.negatives or f"data/{args.benchmark}/negatives.json",
        args.clip_dir or f"models/clip/{miner['clip']}",
        miner,
        args.out or f"results/questions/{args.benchmark}.parquet",
        benchmark=args.benchmark,
        batch_size=cfg["miner"].get("batch_size", 64),
        device=fc.device_of(cfg),
    )


def cmd_shard(args: argparse.Namespace) -> None:
    cfg = _config(args)
    _lookup(cfg, "benchmarks", args.benchmark)
    index = stages.shard(
        args.questions or f"results/questions/{args.benchmark}.parquet",
        args.manifest or f"data/{args.benchmark}/manifest.parquet",
        args.out or f"shards/questions/{args.benchmark}",
        samples_per_shard=cfg["shards"]["samples_per_shard"],
    )
    print(f"{len(index['shards'])} shards, {index['total']} samples")


def cmd_eval_clip(args: argparse.Namespace) -> None:
    cfg = _config(args)
    _lookup(cfg, "benchmarks", args.benchmark)
    _lookup(cfg, "clip_models", args.clip)
    model = f"clip-{args.clip}"
    metrics = stages.eval_clip(
        args.shards or f"shards/questions/{args.benchmark}",
        args.classes or f"data/{args.benchmark}/classes.json",
        args.clip_dir or f"models/clip/{args.clip}",
        cfg["clip_eval"]["templates"],
        args.predictions or f"results/predictions/{model}/{args.benchmark}.parquet",
        args.metrics or f"results/metrics/{model}/{args.benchmark}.json",
        metric=fc.metric_of(cfg, args.benchmark),
        batch_size=cfg["clip_eval"].get("batch_size", 64),
        device=fc.device_of(cfg),
    )
    print(
        f"{model} on {args.benchmark}: 5-way {metrics['accuracy']:.3f}, "
        f"N-way {metrics['nway_accuracy']:.3f} (n={metrics['n']})"
    )


def cmd_materialize_llm(args: argparse.Namespace) -> None:
    cfg = _config(args)
    llm = _lookup(cfg, "llms", args.llm)
    worlds = [f"data/synthetic/{w}" for w in fc.synthetic_world_names(cfg)]
    stages.materialize_llm(llm["source"], args.out or f"models/llm/{args.llm}", world_dirs=worlds)


def cmd_shard_train(args: argparse.Namespace) -> None:
    cfg = _config(args)
    source = _lookup(cfg, "train_data", args.data)["source"]
    index = stages.shard_train_data(
        source,
        args.out or f"shards/train/{args.data}",
        raw_dir=f"data/raw/train/{args.data}",
        world_dirs=[f"data/synthetic/{w}" for w in source.get("worlds", [])],
        samples_per_shard=(cfg.get("training") or {}).get("samples_per_shard", 10000),
    )
    print(f"{len(index['shards'])} shards, {index['total']} samples")


def cmd_train(args: argparse.Namespace) -> None:
    """One pretraining (--pretrain KEY) or finetuning (--run NAME) job, resumable."""
    cfg = _config(args)
    training = cfg.get("training") or {}
    if args.pretrain:
        jobs = fc.pretrain_jobs(cfg)
        if args.pretrain not in jobs:
            raise fc.ConfigError(f"no pretraining job {args.pretrain!r} (known: {', '.join(jobs)})")
        spec, out = jobs[args.pretrain], f"runs/{args.pretrain}/pretrain"
        inputs = {
            "clip_dir": f"models/clip/{fc.encoder_clip(cfg, spec['encoder'])}",
            "llm_dir": f"models/llm/{spec['llm']}",
            "data_dir": f"shards/train/{spec['data']}",
        }
    else:
        rows = {row["name"]: row for row in fc.trained_rows(cfg)}
        if args.run not in rows:
            raise fc.ConfigError(f"no trained ablation row {args.run!r}")
        row = rows[args.run]
        spec, out = fc.finetune_spec(cfg, row), f"runs/{args.run}/finetune"
        inputs = {"data_dir": f"shards/train/{spec['data']}"}
        if row["arch"] == "qwen2_vl":
            inputs["base_dir"] = f"models/base/{row['base']}"
        else:
            inputs["clip_dir"] = f"models/clip/{fc.encoder_clip(cfg, row['vision_encoder'])}"
            inputs["llm_dir"] = f"models/llm/{row['llm']}"
            key = fc.pretrain_key_of(cfg, row)
            if key:
                inputs["init_dir"] = f"runs/{key}/pretrain"
    stages.train_stage(
        spec,
        args.out or out,
        state_dir=f"{args.out or out}.state",
        device=fc.device_of(cfg),
        checkpoint_every=training.get("checkpoint_every", 500),
        dataloader_workers=training.get("dataloader_workers", 0),
        **inputs,
    )


def cmd_eval_vlm(args: argparse.Namespace) -> None:
    cfg = _config(args)
    if args.model not in fc.vlm_models(cfg):
        raise fc.ConfigError(f"no VLM {args.model!r} (known: {', '.join(fc.vlm_models(cfg))})")
    if args.benchmark not in fc.vlm_benchmarks(cfg):
        raise fc.ConfigError(f"no benchmark {args.benchmark!r}")
    evaluation = cfg.get("evaluation") or {}
    fine = args.benchmark in cfg["benchmarks"]
    stem = f"results/{{}}/{args.model}/{args.benchmark}"
    metrics = stages.eval_vlm(
        fc.vlm_eval_spec(cfg, args.model, args.benchmark),
        args.model_dir or fc.vlm_model_dir(cfg, args.model),
        f"shards/questions/{args.benchmark}" if fine else f"data/vqa/{args.benchmark}.tsv",
        stem.format("predictions") + ".parquet",
        stem.format("metrics") + ".json",
        stem.format("metrics") + ".details.json",
        parts_dir=stem.format("parts"),
        questions_path=f"results/questions/{args.benchmark}.parquet" if fine else None,
        batch_size=evaluation.get("batch_size", 16),
        part_size=evaluation.get("part_size", 512),
        device=fc.device_of(cfg),
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


def _lookup(cfg: dict, table: str, name: str) -> dict:
    entries = cfg.get(table) or {}
    if name not in entries:
        raise fc.ConfigError(f"{table}: no entry {name!r} (known: {', '.join(sorted(entries))})")
    return entries[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fgvlm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_text: str, *, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config:
            p.add_argument("--config", default="config/config.yaml", type=Path)
        p.set_defaults(func=func)
        return p

    p = add("validate-config", cmd_validate_config, "Validate a study config.", config=False)
    p.add_argument("path", type=Path)

    p = add("synthesize", cmd_synthesize, "Draw a synthetic world (demo data).")
    p.add_argument("--world", required=True)
    p.add_argument("--out")

    p = add("manifest", cmd_manifest, "Download and normalize a benchmark into its manifest.")
    p.add_argument("--benchmark", required=True)
    for opt in ("--out", "--classes", "--negatives", "--raw-dir", "--world-dir"):
        p.add_argument(opt)

    p = add("vqa-benchmark", cmd_vqa_benchmark, "Fetch (or synthesize) a general-VQA TSV.")
    p.add_argument("--name", required=True)
    p.add_argument("--out")

    p = add("fetch-clip", cmd_fetch_clip, "Fetch or materialize a CLIP model's weights.")
    p.add_argument("--clip", required=True)
    p.add_argument("--out")

    p = add("mine", cmd_mine, "Mine 5-way questions with CLIP hard negatives.")
    p.add_argument("--benchmark", required=True)
    for opt in ("--manifest", "--classes", "--negatives", "--clip-dir", "--out"):
        p.add_argument(opt)

    p = add("shard", cmd_shard, "Write a question set as WebDataset shards.")
    p.add_argument("--benchmark", required=True)
    for opt in ("--questions", "--manifest", "--out"):
        p.add_argument(opt)

    p = add("eval-clip", cmd_eval_clip, "Zero-shot CLIP baseline on one benchmark.")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--clip", required=True)
    for opt in ("--shards", "--classes", "--clip-dir", "--predictions", "--metrics"):
        p.add_argument(opt)

    p = add("materialize-llm", cmd_materialize_llm, "Fetch an LLM or create a tiny one.")
    p.add_argument("--llm", required=True)
    p.add_argument("--out")

    p = add("shard-train", cmd_shard_train, "Write a training-data source as shards.")
    p.add_argument("--data", required=True)
    p.add_argument("--out")

    p = add("train", cmd_train, "Run one pretraining or finetuning job (resumable).")
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
    except (fc.ConfigError, ValueError, FileNotFoundError) as err:
        print(f"fgvlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
