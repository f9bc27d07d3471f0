"""Does the training data loader keep up with the training step? Tiny VLM, CPU, one run.

    python bench/train_throughput.py [--rounds 3] [--steps 10] [--workdir DIR]

Side by side, in alternating rounds (the machine is shared: each round measures everything
once, and the medians over rounds are reported):

- loader: ``conversation_dataset`` + ``DataLoader`` + the model's ``Collator`` over one epoch
  of the demo's instruction shards, with 0 and 2 worker processes (samples/s, worker start-up
  included);
- step: ``fgvlm.training.loop.train`` (forward + backward + AdamW, connector and LLM trainable, the
  demo's finetuning batch: 16 per micro-batch, global batch 32) on batches collated
  beforehand, so no loading is timed (samples/s, tokens/s);
- end to end: the same ``train`` fed by the real loader, as ``run_training`` feeds it.

The ratio loader / step > 1 means the loader produces samples faster than the step consumes
them. With 0 workers the two run one after the other in one process, so the end-to-end rate
is about 1 / (1/loader + 1/step). Assets (synthetic worlds, tiny CLIP, tiny Llama, shards) are
built with the library's own functions in a temporary dir (or ``--workdir``, reused).
Prints a JSON summary; results go to BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from _assets import build_assets, machine, seed_everything
from accelerate import Accelerator
from torch.utils.data import DataLoader

from fgvlm.data.shards import conversation_dataset
from fgvlm.models.templates import IMAGE_TOKEN_ID
from fgvlm.models.vlm import LlavaVLM, build_vlm
from fgvlm.training.loop import train
from fgvlm.training.recipe import Recipe, make_plan


class _Measured(Exception):
    """Raised from ``on_step`` after the last measured step: skips the final checkpoint save."""


def loader_rate(
    shard_dir: Path, collate: Callable, *, batch_size: int, workers: int, epoch: int
) -> dict:
    """One epoch through conversation_dataset + DataLoader + collate -> samples/s."""
    dataset = conversation_dataset(
        shard_dir, rank=0, world_size=1, seed=0, epoch=epoch, batch_size=batch_size
    )
    start = time.perf_counter()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers)
    samples, first = 0, None
    for batch in loader:
        samples += batch["input_ids"].shape[0]
        if first is None:
            first = time.perf_counter() - start  # worker start-up + first batch
    seconds = time.perf_counter() - start
    return {
        "samples": samples,
        "seconds": round(seconds, 3),
        "first_batch_s": round(first or 0.0, 3),
        "samples_per_s": samples / seconds,
    }


def batch_tokens(batch: dict, num_patches: int) -> tuple[int, int]:
    """(text tokens as the trainer counts them, LM positions after splicing the image patches)."""
    text = int(batch["attention_mask"].sum())
    images = int(((batch["input_ids"] == IMAGE_TOKEN_ID) & batch["attention_mask"].bool()).sum())
    return text, text - images + images * num_patches


def step_rate(
    vlm: LlavaVLM,
    batches: Callable[[int, int], Iterator[dict]],
    recipe: Recipe,
    n_samples: int,
    *,
    warmup: int,
    steps: int,
    workdir: Path,
) -> dict:
    """Time ``steps`` optimizer steps of ``fgvlm.training.loop.train`` after ``warmup`` steps.

    ``batches`` is what ``train`` iterates; every micro-batch it yields is recorded, so the
    tokens of the measured steps are exact. Out: samples/s, tokens/s, seconds per step.
    """
    plan = make_plan(recipe, 1, n_samples=n_samples)
    seen: list[dict] = []

    def recorded(epoch: int, skip: int) -> Iterator[dict]:
        for batch in batches(epoch, skip):
            seen.append(batch)
            yield batch

    stamps: dict[int, float] = {}

    def on_step(step: int, model) -> None:  # noqa: ARG001
        stamps[step] = time.perf_counter()
        if step == warmup + steps:
            raise _Measured

    state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=workdir))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=plan.grad_accum)
    try:
        train(
            vlm,
            recorded,
            recipe,
            plan,
            state_dir,
            seed=0,
            checkpoint_every=10**9,
            accelerator=accelerator,
            on_step=on_step,
        )
    except _Measured:
        pass
    seconds = stamps[warmup + steps] - stamps[warmup]
    micro = seen[warmup * plan.grad_accum : (warmup + steps) * plan.grad_accum]
    counts = [batch_tokens(b, vlm.vision.num_patches) for b in micro]
    samples = sum(int(b["input_ids"].shape[0]) for b in micro)
    return {
        "steps": steps,
        "samples": samples,
        "seconds": round(seconds, 3),
        "s_per_step": seconds / steps,
        "samples_per_s": samples / seconds,
        "text_tokens_per_s": sum(t for t, _ in counts) / seconds,
        "lm_positions_per_s": sum(p for _, p in counts) / seconds,
    }


def summarize(runs: list[dict], keys: tuple[str, ...]) -> dict:
    """Median over rounds of each key, and each round's value."""
    out: dict = {}
    for key in keys:
        values = [run[key] for run in runs]
        out[key] = round(statistics.median(values), 3)
        out[f"{key}_per_round"] = [round(v, 3) for v in values]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch (demo: 16)")
    parser.add_argument("--global-batch", type=int, default=32, help="global batch (demo: 32)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, torch.get_num_threads()}),
        help="torch intra-op thread counts to compare (default: 1 and torch's default)",
    )
    parser.add_argument("--llm-steps", type=int, default=60, help="tiny LM text pretraining")
    parser.add_argument("--workdir", type=Path, help="build/reuse assets here (default: temp)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fgvlm-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        assets = build_assets(workdir, llm_steps=args.llm_steps)
        seed_everything(0)
        vlm = build_vlm(assets.clip_dir, assets.llm_dir, template="vicuna_v1", seed=0)
        collate = vlm.collate_fn()
        recipe = Recipe(
            stage="finetune",
            updating="full",
            global_batch=args.global_batch,
            per_device_batch=args.batch_size,
            connector_lr=1e-3,
            llm_lr=1e-3,
            max_steps=args.warmup + args.steps + 1,
        )
        # the step alone: one epoch collated beforehand, replayed from memory
        dataset = conversation_dataset(
            assets.shard_dir, rank=0, world_size=1, seed=0, batch_size=args.batch_size
        )
        cached = list(DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate))
        n_samples = sum(int(b["input_ids"].shape[0]) for b in cached)

        def from_memory(epoch: int, skip: int) -> Iterator[dict]:  # noqa: ARG001
            yield from cached[skip:]

        def from_loader(workers: int) -> Callable[[int, int], Iterator[dict]]:
            def batches(epoch: int, skip: int) -> Iterator[dict]:
                dataset = conversation_dataset(
                    assets.shard_dir,
                    rank=0,
                    world_size=1,
                    seed=0,
                    epoch=epoch,
                    skip_batches=skip,
                    batch_size=args.batch_size,
                )
                yield from DataLoader(
                    dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=workers
                )

            return batches

        before = machine()
        timing = {"warmup": args.warmup, "steps": args.steps, "workdir": workdir}
        runs: dict[str, list[dict]] = {}
        loads = []
        for r in range(args.rounds):
            for threads in args.threads:
                torch.set_num_threads(threads)  # intra-op threads of this process
                tag = f"threads_{threads}"
                for w in args.workers:
                    run = loader_rate(
                        assets.shard_dir, collate, batch_size=args.batch_size, workers=w, epoch=r
                    )
                    runs.setdefault(f"{tag}/loader_workers_{w}", []).append(run)
                step = step_rate(vlm, from_memory, recipe, n_samples, **timing)
                runs.setdefault(f"{tag}/step", []).append(step)
                for w in args.workers:
                    e2e = step_rate(vlm, from_loader(w), recipe, n_samples, **timing)
                    runs.setdefault(f"{tag}/end_to_end_workers_{w}", []).append(e2e)
            loads.append(machine()["loadavg"])
            print(f"round {r + 1}/{args.rounds} done, load {loads[-1]}", file=sys.stderr)

        results = {}
        for threads in args.threads:
            tag = f"threads_{threads}"
            steps = runs[f"{tag}/step"]
            out = {
                "step": summarize(
                    steps,
                    ("samples_per_s", "text_tokens_per_s", "lm_positions_per_s", "s_per_step"),
                )
            }
            for w in args.workers:
                loader = runs[f"{tag}/loader_workers_{w}"]
                out[f"loader_workers_{w}"] = summarize(loader, ("samples_per_s",))
                # the ratio within each round (same moment, same load), then the median
                out[f"ratio_loader_workers_{w}_over_step"] = round(
                    statistics.median(
                        a["samples_per_s"] / b["samples_per_s"]
                        for a, b in zip(loader, steps, strict=True)
                    ),
                    1,
                )
                out[f"end_to_end_workers_{w}"] = summarize(
                    runs[f"{tag}/end_to_end_workers_{w}"], ("samples_per_s",)
                )
            results[tag] = out
        summary = {
            "benchmark": "train_throughput",
            "machine": before,
            "loadavg_after_each_round": loads,
            "assets_build_s": round(assets.build_s, 1),
            "setup": {
                "model": "tiny LlavaVLM: tiny-vit CLIP (32 px, 16 patches) + mlp2x_gelu + "
                "tiny Llama (hidden 96, 2 layers), template vicuna_v1",
                "params": {k: sum(p.numel() for p in v) for k, v in vlm.parameter_groups().items()},
                "data": f"{n_samples} synthetic instructions in {len(cached)} batches",
                "micro_batch": args.batch_size,
                "global_batch": args.global_batch,
                "rounds": args.rounds,
                "measured_steps": args.steps,
                "warmup_steps": args.warmup,
            },
            "results": results,
        }
        print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
