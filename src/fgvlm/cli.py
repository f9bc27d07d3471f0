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


def cmd_aggregate(args: argparse.Namespace) -> None:
    from fgvlm.report.aggregate import aggregate

    out = aggregate(
        args.metrics,
        args.runs,
        args.out,
        fine_grained=args.fine_grained,
        general=args.general,
        exclude=args.exclude,
        chain_start=args.chain_start,
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
    p.add_argument("--chain-start", metavar="RUN")
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
