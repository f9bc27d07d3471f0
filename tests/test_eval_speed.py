"""Evaluation speed-ups keep answers: bf16 weights, loader workers, length-sorted batches."""

from __future__ import annotations

import json
from functools import partial
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgvlm.data.synthetic import class_folder, generate_world
from fgvlm.evaluate.prompts import cloze_prompt, mcq_prompt
from fgvlm.evaluate.run import QuestionItems, load_items
from fgvlm.evaluate.runners import eval_dtype, load_runner
from fgvlm.evaluate.scoring import agreement, score
from fgvlm.mcq import FINE_GRAINED_QUESTION, MCQItem
from fgvlm.models.tiny import materialize_random_clip, materialize_tiny_llm
from fgvlm.models.vlm import build_vlm, save_vlm

TINY_CFG = Path(str(resources.files("fgvlm") / "resources" / "clip_configs" / "tiny-vit.json"))


def _train_briefly(vlm, samples: list[tuple[dict, Image.Image]], steps: int) -> None:
    """Connector + LM on the questions' own images and answers: a model whose answers depend
    on the image, with option margins like the demo's trained rows (a random connector's
    options nearly tie, and a tie is flipped by any rounding)."""
    torch.manual_seed(0)
    collate = vlm.collate_fn()
    params = [*vlm.connector.parameters(), *vlm.llm.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    rng = np.random.default_rng(0)
    vlm.train()
    for _ in range(steps):
        batch = collate([samples[i] for i in rng.choice(len(samples), 16, replace=False)])
        loss = vlm(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    vlm.eval()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """A demo-sized trained-row checkpoint (tiny-vit CLIP, a tiny Llama; connector and LM
    trained briefly) and 5-option questions on a synthetic world's test images."""
    root = tmp_path_factory.mktemp("demo")
    world = root / "world"
    generate_world(world, family="shapes", seed=0, train_per_class=1, test_per_class=24)
    # five classes apart in colour, shape and size: what a few steps can learn
    names = json.loads((world / "classes.json").read_text())[::5][:5]
    corpus = [f"It is a {name}." for name in names]
    materialize_random_clip(TINY_CFG, root / "clip", seed=0)
    materialize_tiny_llm(root / "llm", arch="llama", corpus=corpus, seed=0, text_pretrain_steps=5)
    vlm = build_vlm(root / "clip", root / "llm", template="vicuna_v1", seed=0)
    rng = np.random.default_rng(0)
    cloze = cloze_prompt(FINE_GRAINED_QUESTION)
    items, samples = [], []
    for name in names:
        for path in sorted((world / "test" / class_folder(name)).glob("*.png")):
            options = list(names)
            rng.shuffle(options)
            with Image.open(path) as image:
                picture = image.convert("RGB")
            prompt = mcq_prompt(FINE_GRAINED_QUESTION, options, style="llava")
            items.append(MCQItem(f"q-{len(items):04d}", picture, prompt, options, cloze))
            turns = [
                {"from": "human", "value": f"<image>\n{cloze}"},
                {"from": "gpt", "value": name},
            ]
            samples.append(({"id": items[-1].qid, "conversations": turns}, picture))
    _train_briefly(vlm, samples, steps=300)
    save_vlm(vlm, root / "model")
    return {"model": root / "model", "items": items}


def test_evaluation_dtype_resolves_per_device():
    assert eval_dtype("auto", "cuda") == "bfloat16"
    assert eval_dtype("auto", "cpu") is None
    assert eval_dtype("float32", "cuda") == "float32"
    with pytest.raises(ValueError, match="choose one of"):
        eval_dtype("float16", "cpu")


def test_bf16_and_fp32_answers_agree_on_the_demo(demo):
    """The demo's scoring mode; generate's answers are compared by the GPU benchmark (CPU
    bf16 generation is slow)."""
    mode = "option_likelihood"
    spec = {"runner": "trained", "name": "demo-row"}
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runner = load_runner(spec, demo["model"], device="cpu", dtype=dtype)
        assert next(runner.vlm.llm.parameters()).dtype == getattr(torch, dtype)
        runs[dtype] = score(runner, demo["items"], mode=mode, batch_size=16, max_new_tokens=4)
    preds = {dtype: [row["pred"] for row in rows] for dtype, rows in runs.items()}
    assert len(preds["float32"]) >= 100
    assert agreement(preds["float32"], preds["bfloat16"]) >= 0.99
    fp32 = np.array([row["scores"] for row in runs["float32"]])
    bf16 = np.array([row["scores"] for row in runs["bfloat16"]])
    assert np.abs(fp32 - bf16).max() > 0  # bf16 did run: its scores are rounded, not equal


def test_batch_16_answers_equal_batch_1_in_fp32(demo):
    runner = load_runner({"runner": "trained", "name": "demo-row"}, demo["model"], dtype="float32")
    items = demo["items"][::4]
    for mode in ("option_likelihood", "generate"):
        one = score(runner, items, mode=mode, batch_size=1, max_new_tokens=4)
        many = score(runner, items, mode=mode, batch_size=16, max_new_tokens=4)
        assert [(r["qid"], r["output"], r["pred"]) for r in many] == [
            (r["qid"], r["output"], r["pred"]) for r in one
        ]
        if mode == "option_likelihood":
            np.testing.assert_allclose(
                [r["scores"] for r in many], [r["scores"] for r in one], atol=1e-5
            )


def _record(index: int) -> dict:
    return {"qid": f"q-{index:03d}", "question": "what?", "options": list("vwxyz"), "n": index}


def _decode(record: dict) -> tuple[dict, Image.Image]:
    shade = record["n"] * 20 % 256
    return record, Image.new("RGB", (8, 8), (shade, 0, 0))


@pytest.mark.parametrize("workers", [2, 3])
def test_loader_workers_keep_the_question_order(workers):
    records = [_record(i) for i in range(11)]  # 11: the workers' shares differ in length
    dataset = QuestionItems(partial(iter, records), _decode, style="llava", option_prompt="cloze")
    sequential = list(load_items(dataset, workers=0))
    loaded = list(load_items(dataset, workers=workers))
    assert [item.qid for item in loaded] == [r["qid"] for r in records]
    assert [item.prompt for item in loaded] == [item.prompt for item in sequential]
    assert [item.image.getpixel((0, 0)) for item in loaded] == [
        item.image.getpixel((0, 0)) for item in sequential
    ]
