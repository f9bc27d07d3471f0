"""Proof that image features reach the LM: a tiny VLM trained to name the object (visible only in
the image) answers held-out 5-way questions well above chance, through the real trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgvlm import stages
from fgvlm.data.shards import write_conversation_shards
from fgvlm.data.synthetic import generate_world
from fgvlm.evaluate.runners import LlavaRunner
from fgvlm.evaluate.scoring import score
from fgvlm.mcq import FINE_GRAINED_QUESTION, MCQItem
from fgvlm.mining import build_questions
from fgvlm.models.tiny import materialize_random_clip
from fgvlm.models.vlm import load_vlm

ROOT = Path(__file__).resolve().parents[1]
CHANCE = 0.2


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("learns")
    world = root / "world"
    generate_world(world, family="shapes", seed=4, train_per_class=16, test_per_class=4)
    # a frozen, randomly initialised tower: its features carry the class (demo-calibration.md)
    materialize_random_clip(
        ROOT / "config" / "demo" / "clip" / "tiny-vit-p8.json", root / "clip", 0
    )
    stages.materialize_llm(
        {
            "type": "tiny",
            "arch": "qwen2",
            "seed": 0,
            "hidden_size": 96,
            "layers": 2,
            "text_pretrain_steps": 100,
        },
        root / "llm",
        worlds=[world],
    )
    classes = json.loads((world / "classes.json").read_text())
    folders = sorted(p.name for p in (world / "train").iterdir())
    samples = []
    for label, folder in enumerate(folders):
        for image in sorted((world / "train" / folder).glob("*.png")):
            conversation = [
                {"from": "human", "value": f"<image>\n{FINE_GRAINED_QUESTION}"},
                {"from": "gpt", "value": classes[label]},
            ]
            samples.append(
                (
                    {
                        "id": f"{folder}-{image.stem}",
                        "conversations": conversation,
                        "image": image.name,
                    },
                    image,
                )
            )
    write_conversation_shards(samples, root / "shards", samples_per_shard=128)
    spec = {
        "run": "learns",
        "arch": "llava",
        "template": "chatml",
        "image_aspect": "pad",
        "seed": 0,
        "recipe": {
            "stage": "finetune",
            "updating": "full",
            "connector_lr": 1e-3,
            "llm_lr": 1e-3,
            "global_batch": 32,
            "per_device_batch": 32,
            "max_steps": 250,
        },
    }
    stages.train_stage(
        spec,
        root / "model",
        state_dir=root / "state",
        data_dir=root / "shards",
        clip_dir=root / "clip",
        llm_dir=root / "llm",
        checkpoint_every=1000,
    )
    return world, root / "model"


def test_tiny_vlm_names_held_out_images_well_above_chance(trained, tmp_path):
    world, model_dir = trained
    classes = json.loads((world / "classes.json").read_text())
    folders = sorted(p.name for p in (world / "test").iterdir())
    keys, labels, images = [], [], []
    for label, folder in enumerate(folders):
        for image in sorted((world / "test" / folder).glob("*.png")):
            keys.append(f"{folder}-{image.stem}")
            labels.append(label)
            images.append(image)
    # 4 random wrong classes per image (seeded), shuffled with the answer into 5 options
    rng = np.random.default_rng(0)
    similarity = rng.random((len(keys), len(classes)))
    questions = build_questions(keys, np.array(labels), classes, similarity, benchmark="t", seed=0)
    items = [
        MCQItem(row["qid"], Image.open(path).convert("RGB"), FINE_GRAINED_QUESTION, row["options"])
        for row, path in zip(questions.iter_rows(named=True), images, strict=True)
    ]
    runner = LlavaRunner(load_vlm(model_dir), "learns")
    results = score(runner, items, mode="option_likelihood", batch_size=32)
    accuracy = np.mean([r["pred"] == a for r, a in zip(results, questions["answer"], strict=True)])
    assert accuracy >= 2 * CHANCE, accuracy
