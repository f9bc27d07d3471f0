"""Small builders shared by the training tests (not a test module: its name starts with "_")."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from fgvlm import stages
from fgvlm.data.synthetic import generate_world
from fgvlm.models.tiny import materialize_random_clip


class FakeVLM(nn.Module):
    """vision -> connector -> llm, with the VLM's parameter_groups() interface."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vision = nn.Linear(4, 4)
        self.connector = nn.Linear(4, 4)
        self.llm = nn.Linear(4, 1)

    def parameter_groups(self) -> dict:
        return {
            "vision": list(self.vision.parameters()),
            "connector": list(self.connector.parameters()),
            "llm": list(self.llm.parameters()),
        }

    def forward(self, inputs, targets, attention_mask):
        pred = self.llm(torch.tanh(self.connector(self.vision(inputs))))
        return SimpleNamespace(loss=nn.functional.mse_loss(pred.squeeze(-1), targets))


def training_assets(root: Path, *, llm_layers: int, samples_per_shard: int) -> dict[str, str]:
    """A tiny world, a random tiny CLIP, a briefly text-pretrained tiny Llama and instruction
    shards under ``root``: the inputs of ``stages.train_stage`` (clip_dir, llm_dir, data_dir)."""
    world = root / "world"
    generate_world(world, family="shapes", seed=1, train_per_class=3, test_per_class=1)
    config = resources.files("fgvlm.resources").joinpath("clip_configs/tiny-vit.json")
    materialize_random_clip(Path(str(config)), root / "clip", seed=0)
    stages.materialize_llm(
        {
            "type": "tiny",
            "family": "llama",
            "seed": 0,
            "hidden_size": 32,
            "layers": llm_layers,
            "text_pretrain_steps": 5,
        },
        root / "llm",
        worlds=[str(world)],
    )
    stages.shard_train_data(
        {"type": "synthetic_instructions", "worlds": ["world"]},
        root / "shards",
        raw_dir=root / "raw",
        worlds=[str(world)],
        samples_per_shard=samples_per_shard,
    )
    return {
        "clip_dir": str(root / "clip"),
        "llm_dir": str(root / "llm"),
        "data_dir": str(root / "shards"),
    }
