"""Batched greedy evaluation against batch-1 generation (VLMEvalKit's way), tiny VLMs, CPU.

    python bench/eval_batching.py [--questions 96] [--rounds 2] [--workdir DIR]

Two tiny models on the same questions: a ``LlavaVLM`` (tiny-vit CLIP + tiny Llama, through
``LlavaRunner``) and a transformers-native ``LlavaForConditionalGeneration`` (``HubVLM``, the
runner released VLMs take). For each, ``fgvlm.evaluate.scoring.score(..., mode="generate")``
runs once with batch 16 (left padding) and once with batch 1, in alternating order over
``--rounds`` rounds (the machine is shared; medians are reported). Out: questions/s of both,
their ratio, and the agreement of the two: extracted answers (the metric's input) and raw
generated text (stricter). The code promises identical answers; any disagreement is listed.
Questions are 5-option multiple choice on the synthetic worlds' test images.

Then the speed items of evaluation on the ``LlavaRunner`` (``compare_speedups``), half the
prompts lengthened by a hint: ``option_likelihood`` with one shared prompt pass per question
against one full sequence per option (speed, largest score difference, answer agreement), and
``generate`` in length-sorted against item-order batches (speed, output agreement, padding
fraction). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _assets import build_assets, machine, mcq_options, seed_everything, world_test_images
from PIL import Image

from fgvlm.evaluate.hub_runner import HubVLM
from fgvlm.evaluate.prompts import mcq_prompt
from fgvlm.evaluate.runners import LlavaRunner
from fgvlm.evaluate.scoring import agreement, length_order, score
from fgvlm.mcq import FINE_GRAINED_QUESTION, MCQItem, MCQModel
from fgvlm.models.templates import answer_ids
from fgvlm.models.tiny import build_tiny_hub_vlm
from fgvlm.models.vlm import build_vlm


def make_items(world_dirs: list[Path], n: int, seed: int) -> list[MCQItem]:
    """``n`` 5-option questions on test images, spread over the worlds and classes."""
    rng = np.random.default_rng(seed)
    pool = []
    for world in world_dirs:
        names = json.loads((world / "classes.json").read_text())
        for path, label, _ in world_test_images(world, per_class=10):
            pool.append((world.name, path, label, names))
    picked = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    items = []
    for i, index in enumerate(sorted(picked.tolist())):
        world, path, label, names = pool[index]
        options = mcq_options(names, label, rng)
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        prompt = mcq_prompt(FINE_GRAINED_QUESTION, options, style="llava")
        items.append(MCQItem(f"{world}-{i:04d}", rgb, prompt, options))
    return items


class FullSequenceRunner(LlavaRunner):
    """``LlavaRunner`` scoring options the way it did before the shared prefix: one full
    sequence (image, prompt, option) per option, each prompt encoded five times."""

    @torch.no_grad()
    def continuation_logprobs(
        self, items: list[MCQItem], continuations: list[list[str]]
    ) -> list[list[float]]:
        prompts, conts, images = [], [], []
        for item, texts in zip(items, continuations, strict=True):
            for text in texts:
                prompts.append(self._prompt(item))
                conts.append(answer_ids(self.vlm.template, self.vlm.tokenizer, text))
                images.append(item.image)
        scores = self.vlm.sequence_logprobs(prompts, conts, self.vlm.pixel_batch(images)).tolist()
        out, start = [], 0
        for texts in continuations:
            out.append(scores[start : start + len(texts)])
            start += len(texts)
        return out


def with_hints(items: list[MCQItem], seed: int, words: int = 40) -> list[MCQItem]:
    """Half the items get a hint of 1..``words`` words before the question (as VQA
    benchmarks' context), so prompt lengths vary the way sorting is for."""
    rng = np.random.default_rng(seed)
    vocabulary = "the a small large red blue shape photo image object colour which".split()
    out = []
    for i, item in enumerate(items):
        if i % 2:
            hint = " ".join(rng.choice(vocabulary, int(rng.integers(1, words + 1))).tolist())
            item = MCQItem(item.qid, item.image, f"{hint}\n{item.prompt}", item.options)
        out.append(item)
    return out


def padding_fraction(model: MCQModel, items: list[MCQItem], batch: int, sort: bool) -> float:
    """Share of a batch's positions that are padding (prompt lengths per the runner's
    ``prompt_length``), with batches in item order or sorted by length."""
    lengths = [model.prompt_length(item) for item in items]
    order = length_order(model, items, "generate") if sort else list(range(len(items)))
    padded = real = 0
    for start in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[start : start + batch]]
        padded += max(chunk) * len(chunk)
        real += sum(chunk)
    return round(1 - real / padded, 4)


def timed(call) -> tuple:
    """(result, seconds) of ``call()``."""
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def compare_speedups(vlm, items: list[MCQItem], *, batch: int, rounds: int, max_new: int) -> dict:
    """The speed items of evaluation on one ``LlavaVLM``, each against its baseline, rounds in
    alternating order: option_likelihood with the shared prefix vs one full sequence per
    option (scores and answers compared), and generate in length-sorted vs item-order batches
    (answers compared; padding fractions)."""
    shared, full = LlavaRunner(vlm, "shared"), FullSequenceRunner(vlm, "full")
    mode = "option_likelihood"
    speeds: dict[str, list[float]] = {"shared": [], "full": [], "sorted": [], "unsorted": []}
    rows: dict[str, list[dict]] = {}
    for r in range(rounds):
        for name in ("shared", "full") if r % 2 == 0 else ("full", "shared"):
            runner = shared if name == "shared" else full
            rows[name], seconds = timed(
                lambda runner=runner: score(runner, items, mode=mode, batch_size=batch)
            )
            speeds[name].append(len(items) / seconds)
        for name in ("sorted", "unsorted") if r % 2 == 0 else ("unsorted", "sorted"):
            rows[name], seconds = timed(
                lambda name=name: score(
                    shared,
                    items,
                    mode="generate",
                    batch_size=batch,
                    max_new_tokens=max_new,
                    sort_by_length=name == "sorted",
                )
            )
            speeds[name].append(len(items) / seconds)
    diff = max(
        abs(a - b)
        for x, y in zip(rows["shared"], rows["full"], strict=True)
        for a, b in zip(x["scores"], y["scores"], strict=True)
    )
    median = {name: round(statistics.median(values), 2) for name, values in speeds.items()}
    return {
        "questions": len(items),
        "batch_size": batch,
        "option_likelihood_questions_per_s": {
            "shared_prefix": median["shared"],
            "full": median["full"],
        },
        "option_likelihood_speedup": round(median["shared"] / median["full"], 2),
        "option_likelihood_max_abs_score_diff": diff,
        "option_likelihood_answer_agreement": agreement(
            [r["pred"] for r in rows["shared"]], [r["pred"] for r in rows["full"]]
        ),
        "generate_questions_per_s": {"sorted": median["sorted"], "unsorted": median["unsorted"]},
        "generate_sorted_speedup": round(median["sorted"] / median["unsorted"], 2),
        "generate_sorted_output_agreement": agreement(
            [r["output"] for r in rows["sorted"]], [r["output"] for r in rows["unsorted"]]
        ),
        "generate_sorted_disagreements": [
            a["qid"]
            for a, b in zip(rows["sorted"], rows["unsorted"], strict=True)
            if a["output"] != b["output"]
        ],
        "padding_fraction": {
            "sorted": padding_fraction(shared, items, batch, True),
            "unsorted": padding_fraction(shared, items, batch, False),
        },
    }


def timed_score(model: MCQModel, items: list[MCQItem], batch_size: int, max_new: int) -> tuple:
    """(rows, questions/s) of greedy generation at ``batch_size``."""
    start = time.perf_counter()
    rows = score(model, items, mode="generate", batch_size=batch_size, max_new_tokens=max_new)
    return rows, len(items) / (time.perf_counter() - start)


def compare(
    model: MCQModel, items: list[MCQItem], *, batch: int, rounds: int, max_new: int
) -> dict:
    """Batched vs batch-1 generation on ``items``: speeds per round, ratio, agreement."""
    score(model, items[:batch], mode="generate", batch_size=batch, max_new_tokens=max_new)  # warm
    speeds: dict[int, list[float]] = {batch: [], 1: []}
    outputs: dict[int, list[dict]] = {}
    for r in range(rounds):
        order = (batch, 1) if r % 2 == 0 else (1, batch)  # alternate: drift hits both
        for size in order:
            rows, rate = timed_score(model, items, size, max_new)
            speeds[size].append(rate)
            if size in outputs and [x["output"] for x in outputs[size]] != [
                x["output"] for x in rows
            ]:
                raise AssertionError(f"batch {size}: two runs gave different outputs")
            outputs[size] = rows
    batched, single = outputs[batch], outputs[1]
    ratio = statistics.median(b / s for b, s in zip(speeds[batch], speeds[1], strict=True))
    differ = [
        {"qid": b["qid"], "batched": b["output"], "batch1": s["output"]}
        for b, s in zip(batched, single, strict=True)
        if b["output"] != s["output"] or b["pred"] != s["pred"]
    ]
    preds = [row["pred"] for row in single]
    return {
        "questions": len(items),
        f"batch{batch}_questions_per_s": round(statistics.median(speeds[batch]), 2),
        "batch1_questions_per_s": round(statistics.median(speeds[1]), 2),
        f"batch{batch}_per_round": [round(v, 2) for v in speeds[batch]],
        "batch1_per_round": [round(v, 2) for v in speeds[1]],
        "speedup": round(ratio, 2),
        "answer_agreement": agreement([r["pred"] for r in batched], preds),
        "output_agreement": agreement(
            [r["output"] for r in batched], [r["output"] for r in single]
        ),
        "disagreements": differ,
        "distinct_outputs": len({row["output"] for row in single}),
        "unparsable_rate": round(sum(p is None for p in preds) / len(preds), 3),
        "example_outputs": [row["output"] for row in single[:3]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8, help="paper config: 8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--llm-steps", type=int, default=60, help="tiny LM text pretraining")
    parser.add_argument("--workdir", type=Path, help="build/reuse assets here (default: temp)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="fgvlm-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        assets = build_assets(workdir, llm_steps=args.llm_steps)
        seed_everything(0)
        items = make_items(assets.world_dirs, args.questions, seed=0)
        runners = {}
        for lm, llm_dir in (
            ("text-pretrained LM", assets.llm_dir),
            ("random LM", assets.random_llm_dir),
        ):
            vlm = build_vlm(assets.clip_dir, llm_dir, template="vicuna_v1", seed=0)
            runners[f"LlavaRunner, {lm}"] = LlavaRunner(vlm, f"llava-style-{lm}")
            # the hub stand-in's LM: the same weights, or (random) its own fresh 2-layer LM
            text_model = llm_dir if llm_dir == assets.llm_dir else None
            model, processor = build_tiny_hub_vlm(
                "llava", tokenizer_dir=assets.llm_dir, seed=8, text_model_dir=text_model
            )
            runners[f"HubVLM, {lm}"] = HubVLM(model, processor, name=f"hub-llava-{lm}")
        before = machine()
        results = {}
        for name, runner in runners.items():
            results[name] = compare(
                runner,
                items,
                batch=args.batch_size,
                rounds=args.rounds,
                max_new=args.max_new_tokens,
            )
            print(f"{name} done, load {machine()['loadavg']}", file=sys.stderr)
        vlm = build_vlm(assets.clip_dir, assets.llm_dir, template="vicuna_v1", seed=0)
        speedups = compare_speedups(
            vlm,
            with_hints(items, seed=1),
            batch=args.batch_size,
            rounds=args.rounds,
            max_new=args.max_new_tokens,
        )
        print(f"speed items done, load {machine()['loadavg']}", file=sys.stderr)
        summary = {
            "benchmark": "eval_batching",
            "machine": before,
            "loadavg_after": machine()["loadavg"],
            "assets_build_s": round(assets.build_s, 1),
            "setup": {
                "LlavaRunner": "LlavaVLM: tiny-vit CLIP (16 patches) + fresh mlp2x_gelu + "
                "tiny Llama (hidden 96, 2 layers; text-pretrained or random), vicuna_v1",
                "HubVLM": "LlavaForConditionalGeneration: 2-layer CLIP tower (32 px, 16 patches) "
                "+ the text-pretrained tiny Llama, or a random 2-layer Llama (hidden 64), chatml",
                "mode": "generate (greedy, then extract_answer)",
                "max_new_tokens": args.max_new_tokens,
                "batch_size": args.batch_size,
                "rounds": args.rounds,
            },
            "results": results,
            "speed_items (LlavaRunner, text-pretrained LM, half the prompts with hints)": speedups,
        }
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
