"""Tiny local assets for the benchmarks, built with the library's own functions (no network).

``build_assets(root)`` writes, under ``root``: synthetic worlds (``generate_world``), a random
tiny CLIP (``materialize_random_clip``), a tiny Llama-family LM pre-trained briefly on the
worlds' text (``materialize_tiny_llm``) and its untrained twin, and the worlds' instructions as
conversation shards (``write_conversation_shards``): the chain the demo workflow runs. Existing
pieces are reused, so ``--workdir`` makes a second benchmark run skip the build.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fgvlm.data.conversations import read_synthetic_instructions
from fgvlm.data.shards import write_conversation_shards
from fgvlm.data.synthetic import class_folder, generate_world, text_corpus
from fgvlm.models.tiny import materialize_random_clip, materialize_tiny_llm

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP_CONFIG = ROOT / "src" / "fgvlm" / "resources" / "clip_configs" / "tiny-vit.json"
FAMILIES = ("shapes", "patterns")


@dataclass(frozen=True)
class Assets:
    """Paths of the built assets."""

    world_dirs: list[Path]
    clip_dir: Path
    llm_dir: Path
    random_llm_dir: Path  # the same tokenizer and architecture, never trained
    shard_dir: Path
    build_s: float


def build_assets(
    root: Path,
    *,
    families: tuple[str, ...] = FAMILIES,
    train_per_class: int = 40,
    test_per_class: int = 10,
    clip_config: Path = TINY_CLIP_CONFIG,
    llm_family: str = "llama",
    llm_hidden: int = 96,
    llm_layers: int = 2,
    llm_steps: int = 300,
    samples_per_shard: int = 250,
    seed: int = 0,
) -> Assets:
    """Build (or reuse) the assets under ``root``; defaults are the demo's sizes.

    Worlds: 32 px images, ``train_per_class`` / ``test_per_class`` per class, 20% 5-option
    instructions as in ``config/demo.yaml``. LM: the demo's tiny Llama (hidden 96, 2 layers;
    the demo pre-trains it for 300 text steps, the benchmarks pass fewer), and the same LM
    untrained (random outputs: near-ties stress batch-size invariance). Shards: the worlds'
    instructions, ``samples_per_shard`` per tar.
    """
    start = time.perf_counter()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    worlds = []
    for i, family in enumerate(families):
        world = root / "worlds" / family
        if not world.exists():
            generate_world(
                world,
                family=family,
                seed=seed + 11 + i,
                image_size=32,
                train_per_class=train_per_class,
                test_per_class=test_per_class,
                mc_fraction=0.2,
                naming_fraction=0.75,
            )
        worlds.append(world)
    clip_dir = root / "clip"
    if not clip_dir.exists():
        materialize_random_clip(Path(clip_config), clip_dir, seed=seed + 2)
    llm_dir = root / "llm"
    if not llm_dir.exists():
        materialize_tiny_llm(
            llm_dir,
            arch=llm_family,
            corpus=text_corpus([Path(w) for w in worlds]),
            seed=seed + 5,
            hidden_size=llm_hidden,
            layers=llm_layers,
            text_pretrain_steps=llm_steps,
        )
    random_llm_dir = root / "llm-random"
    if not random_llm_dir.exists():
        materialize_tiny_llm(
            random_llm_dir,
            arch=llm_family,
            corpus=text_corpus([Path(w) for w in worlds]),
            seed=seed + 5,
            hidden_size=llm_hidden,
            layers=llm_layers,
            text_pretrain_steps=0,
        )
    shard_dir = root / "shards" / "instructions"
    if not shard_dir.exists():
        samples = (s for world in worlds for s in read_synthetic_instructions(world))
        write_conversation_shards(samples, shard_dir, samples_per_shard=samples_per_shard)
    return Assets(worlds, clip_dir, llm_dir, random_llm_dir, shard_dir, time.perf_counter() - start)


def world_test_images(world: Path, per_class: int) -> list[tuple[Path, int, str]]:
    """(image path, label, class name) of a world's test split, ``per_class`` per class."""
    names = json.loads((world / "classes.json").read_text())
    out = []
    for label, name in enumerate(names):
        for path in sorted((world / "test" / class_folder(name)).glob("*.png"))[:per_class]:
            out.append((path, label, name))
    return out


def mcq_options(names: list[str], label: int, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` options: the answer and ``n - 1`` random other classes, in a seeded order."""
    others = [i for i in range(len(names)) if i != label]
    chosen = [label, *rng.choice(others, size=n - 1, replace=False).tolist()]
    rng.shuffle(chosen)
    return [names[i] for i in chosen]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (the benchmarks' own random choices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def machine() -> dict:
    """What the numbers were measured on, and how busy it was (1/5/15-min load averages)."""
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
