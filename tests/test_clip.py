"""CLIP weights dirs (materialize, fetch, load), encoders and the zero-shot baseline."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from PIL import Image
from safetensors.torch import load_file

import fgvlm.models.clip as clip_module
from fgvlm.evaluate.clip_zeroshot import evaluate_clip
from fgvlm.mining import build_questions
from fgvlm.models.clip import (
    LoadedClip,
    encode_class_prompts,
    encode_images,
    fetch_pretrained_clip,
    load_clip,
)
from fgvlm.models.tiny import contrastive_pretrain, materialize_random_clip

TINY_CFG = Path(str(resources.files("fgvlm") / "resources" / "clip_configs" / "tiny-vit.json"))
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "tiny"
    materialize_random_clip(TINY_CFG, out, seed=0)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> LoadedClip:
    return load_clip(tiny_dir)


def _random_images(n: int, seed: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)) for _ in range(n)
    ]


# --- materialize / load ------------------------------------------------------------------


def test_materialize_is_deterministic_per_seed(tmp_path, tiny_dir):
    materialize_random_clip(TINY_CFG, tmp_path / "again", seed=0)
    materialize_random_clip(TINY_CFG, tmp_path / "other", seed=1)
    weights = "open_clip_model.safetensors"
    assert (tmp_path / "again" / weights).read_bytes() == (tiny_dir / weights).read_bytes()
    assert (tmp_path / "again" / "clip.json").read_text() == (tiny_dir / "clip.json").read_text()
    first, other = load_file(tiny_dir / weights), load_file(tmp_path / "other" / weights)
    assert first.keys() == other.keys()
    assert not torch.equal(first["visual.conv1.weight"], other["visual.conv1.weight"])
    # no temporary directories left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]


def test_materialize_writes_contract_config(tiny_dir):
    entry = json.loads((tiny_dir / "clip.json").read_text())
    assert entry["arch"] == "tiny-vit"
    assert entry["pretrained"] is None
    assert entry["model_cfg"] == json.loads(TINY_CFG.read_text())
    assert entry["quick_gelu"] is False
    assert entry["preprocess"] == {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def test_materialize_keeps_callers_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    materialize_random_clip(TINY_CFG, tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_load_gives_saved_weights_exactly(tiny_dir, tiny):
    saved = load_file(tiny_dir / "open_clip_model.safetensors")
    state = tiny.model.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    assert not tiny.model.training
    assert tiny.name == "tiny-vit"
    assert tiny.preprocess(_random_images(1, 0)[0]).shape == (3, 32, 32)
    assert tiny.tokenizer(["a photo of a cat"]).shape == (1, 32)


def test_load_applies_stored_preprocessing_and_quick_gelu(tmp_path, tiny_dir):
    out = tmp_path / "edited"
    materialize_random_clip(TINY_CFG, out, seed=0)
    entry = json.loads((out / "clip.json").read_text())
    entry["preprocess"] = {
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bilinear",
        "resize_mode": "squash",
    }
    entry["quick_gelu"] = True
    (out / "clip.json").write_text(json.dumps(entry))
    loaded = load_clip(out)
    assert loaded.model.visual.preprocess_cfg["mean"] == (0.5, 0.5, 0.5)
    assert loaded.model.visual.preprocess_cfg["resize_mode"] == "squash"
    activations = {type(m).__name__ for m in loaded.model.modules()}
    assert "QuickGELU" in activations
    # a gray image maps to (0.5 - 0.5) / 0.25 = 0 everywhere under the stored mean/std
    gray = Image.new("RGB", (50, 20), (128, 128, 128))
    assert loaded.preprocess(gray).abs().max() < 0.02


def test_load_missing_files_name_the_dir(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_clip(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "clip.json").write_text((tiny_dir / "clip.json").read_text())
    with pytest.raises(FileNotFoundError, match="partial.*open_clip_model.safetensors"):
        load_clip(partial)


# --- encoders ----------------------------------------------------------------------------


def test_encode_images_normalised_and_batch_independent(tiny):
    images = _random_images(5, seed=1)
    whole = encode_images(tiny, images, batch_size=5, device="cpu")
    batched = encode_images(tiny, iter(images), batch_size=2, device="cpu", workers=2)
    assert whole.dtype == np.float32 and whole.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(whole, batched, atol=1e-5)
    assert not np.allclose(whole[0], whole[1])
    assert encode_images(tiny, [], batch_size=4, device="cpu").shape == (0, 64)


def test_encode_class_prompts_averages_normalised_templates(tiny):
    classnames = ["cat", "dog", "red panda"]
    got = encode_class_prompts(tiny, classnames, TEMPLATES, "cpu")
    assert got.shape == (3, 64) and got.dtype == np.float32
    with torch.no_grad():
        for row, name in zip(got, classnames, strict=True):
            texts = [t.format(c=name) for t in TEMPLATES]
            emb = tiny.model.encode_text(tiny.tokenizer(texts))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            np.testing.assert_allclose(row, (mean / mean.norm()).numpy(), atol=1e-5)


# --- fetch -------------------------------------------------------------------------------


class FakeHub:
    """Stands in for hf_hub_download: serves files from a dict, records requests."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files, self.calls = files, []

    def __call__(self, repo_id: str, filename: str, revision: str | None = None) -> str:
        self.calls.append((repo_id, filename, revision))
        if filename not in self.files:
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(self.files[filename])


def test_fetch_pretrained_copies_safetensors_and_tag_preprocessing(tmp_path, monkeypatch, tiny_dir):
    source = tiny_dir / "open_clip_model.safetensors"
    hub = FakeHub({"open_clip_model.safetensors": source})
    monkeypatch.setattr(clip_module, "hf_hub_download", hub)
    out = tmp_path / "laion"
    fetch_pretrained_clip("ViT-L-14", "laion2b_s32b_b82k", out, revision="abc123")
    assert hub.calls == [
        ("laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "open_clip_model.safetensors", "abc123")
    ]
    assert (out / "open_clip_model.safetensors").read_bytes() == source.read_bytes()
    entry = json.loads((out / "clip.json").read_text())
    assert entry["arch"] == "ViT-L-14" and entry["pretrained"] == "laion2b_s32b_b82k"
    assert entry["model_cfg"] is None
    assert entry["preprocess"]["mean"] == [0.5, 0.5, 0.5]  # this tag uses Inception stats
    assert entry["quick_gelu"] is False
    # provenance: the file's sha256 (the fake hub keeps no snapshots/<commit> folder)
    assert entry["hub"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert entry["hub"]["repo"] == "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"
    assert entry["hub"]["sha"] is None


@pytest.mark.parametrize(
    ("arch", "tag", "repo", "quick_gelu", "resize_mode"),
    [
        ("ViT-L-14", "openai", "timm/vit_large_patch14_clip_224.openai", True, "shortest"),
        ("ViT-H-14-378", "dfn5b", "apple/DFN5B-CLIP-ViT-H-14-378", True, "squash"),
    ],
)
def test_fetch_records_quick_gelu_and_resize_mode(
    tmp_path, monkeypatch, tiny_dir, arch, tag, repo, quick_gelu, resize_mode
):
    hub = FakeHub({"open_clip_model.safetensors": tiny_dir / "open_clip_model.safetensors"})
    monkeypatch.setattr(clip_module, "hf_hub_download", hub)
    fetch_pretrained_clip(arch, tag, tmp_path / "w")
    entry = json.loads((tmp_path / "w" / "clip.json").read_text())
    assert hub.calls[0][0] == repo
    assert entry["quick_gelu"] is quick_gelu
    assert entry["preprocess"]["resize_mode"] == resize_mode


def test_fetch_falls_back_to_pickled_state_dict(tmp_path, monkeypatch):
    shared = torch.arange(6, dtype=torch.float32)
    state = {"a": shared, "b": shared.view(2, 3), "c": torch.ones(2, 2).t()}
    pickle = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"state_dict": state}, pickle)
    hub = FakeHub({"open_clip_pytorch_model.bin": pickle})
    monkeypatch.setattr(clip_module, "hf_hub_download", hub)
    fetch_pretrained_clip("ViT-B-32", "laion2b_s34b_b79k", tmp_path / "w")
    assert [call[1] for call in hub.calls] == [
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
    ]
    saved = load_file(tmp_path / "w" / "open_clip_model.safetensors")
    assert saved.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(saved[key], tensor)


def test_fetch_missing_everywhere_names_repo(tmp_path, monkeypatch):
    monkeypatch.setattr(clip_module, "hf_hub_download", FakeHub({}))
    with pytest.raises(FileNotFoundError, match="laion/CLIP-ViT-B-32-laion2B-s34B-b79K"):
        fetch_pretrained_clip("ViT-B-32", "laion2b_s34b_b79k", tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_fetch_offline_error_is_not_hidden_by_fallback(tmp_path, monkeypatch):
    def offline(repo_id, filename, revision=None):
        raise LocalEntryNotFoundError(f"offline: {repo_id}/{filename} not cached")

    monkeypatch.setattr(clip_module, "hf_hub_download", offline)
    with pytest.raises(LocalEntryNotFoundError, match="open_clip_model.safetensors not cached"):
        fetch_pretrained_clip("ViT-B-32", "laion2b_s34b_b79k", tmp_path / "w")


@pytest.mark.parametrize(("arch", "tag"), [("ViT-L-14", "no_such_tag"), ("No-Such-Arch", "openai")])
def test_fetch_unknown_weights_name_arch_and_tag(tmp_path, monkeypatch, arch, tag):
    monkeypatch.setattr(clip_module, "hf_hub_download", FakeHub({}))
    with pytest.raises(ValueError, match=f"{arch}.*{tag}"):
        fetch_pretrained_clip(arch, tag, tmp_path / "w")


# --- zero-shot evaluation ----------------------------------------------------------------

COLOURS = {
    "red": (1, 0, 0),
    "green": (0, 1, 0),
    "blue": (0, 0, 1),
    "yellow": (1, 1, 0),
    "cyan": (0, 1, 1),
    "magenta": (1, 0, 1),
    "white": (1, 1, 1),
}
NAMES = list(COLOURS)


class Identity(torch.nn.Module):
    """A 'CLIP' whose embeddings are mean RGB (images) and the named colour (texts)."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


def _colour_clip() -> LoadedClip:
    def preprocess(image: Image.Image) -> torch.Tensor:
        return torch.tensor(np.asarray(image, dtype=np.float32) / 255).mean(dim=(0, 1))

    def tokenizer(texts: list[str]) -> torch.Tensor:
        return torch.tensor(
            [COLOURS[t.split()[-1].rstrip(".")] for t in texts], dtype=torch.float32
        )

    return LoadedClip(Identity().eval(), preprocess, tokenizer, "colours")


def _record(qid: str, label: str, options: list[str], answer_at: int | None = None) -> dict:
    answer = options.index(label)
    return {
        "qid": qid,
        "options": options,
        "option_labels": [NAMES.index(o) for o in options],
        "answer": "ABCDE"[answer if answer_at is None else answer_at],
        "label": NAMES.index(label),
    }


def test_evaluate_clip_on_a_model_with_knowable_answers():
    yellowish = Image.new("RGB", (4, 4), (255, 230, 0))
    samples = [
        # nearest class overall is yellow, which is not an option: 5-way right, N-way wrong
        (_record("b-2", "red", ["green", "red", "blue", "cyan", "magenta"]), yellowish),
        (
            _record("b-0", "red", ["blue", "red", "green", "cyan", "white"]),
            Image.new("RGB", (4, 4), (255, 0, 0)),
        ),
        # yellow is an option: both wrong
        (_record("b-1", "red", ["yellow", "green", "red", "blue", "cyan"]), yellowish),
        (
            _record("b-3", "cyan", ["cyan", "blue", "red", "green", "white"]),
            Image.new("RGB", (4, 4), (0, 0, 255)),
        ),
    ]
    predictions, metrics = evaluate_clip(
        samples, _colour_clip(), NAMES, ["a photo of a {c}."], batch_size=3
    )
    assert predictions["qid"].to_list() == ["b-0", "b-1", "b-2", "b-3"]
    assert predictions["pred"].to_list() == ["B", "A", "B", "B"]
    assert predictions["output"].to_list() == ["red", "yellow", "red", "blue"]
    assert predictions["correct"].to_list() == [True, False, True, False]
    assert predictions["nway_pred"].to_list() == [0, 3, 3, 2]
    assert predictions["nway_correct"].to_list() == [True, False, False, False]
    assert predictions["label"].to_list() == [0, 0, 0, 4]
    assert metrics["accuracy"] == 0.5 and metrics["nway_accuracy"] == 0.25
    assert metrics["mean_per_class"] == pytest.approx((2 / 3 + 0) / 2)
    assert metrics["nway_mean_per_class"] == pytest.approx((1 / 3 + 0) / 2)
    assert metrics["n"] == 4 and metrics["unparsable"] == 0.0 and metrics["primary"] == "accuracy"
    assert metrics["ci95"][0] <= 0.5 <= metrics["ci95"][1]
    assert metrics["nway_ci95"][0] <= 0.25 <= metrics["nway_ci95"][1]
    json.dumps(metrics)


def test_evaluate_clip_rejects_options_that_do_not_match_classnames():
    record = _record("b-0", "red", ["blue", "red", "green", "cyan", "white"])
    record["options"] = ["blue", "crimson", "green", "cyan", "white"]
    with pytest.raises(ValueError, match="crimson"):
        evaluate_clip(
            [(record, Image.new("RGB", (4, 4)))], _colour_clip(), NAMES, ["{c}"], batch_size=2
        )


def test_evaluate_clip_on_tiny_model_restricting_to_options_never_hurts(tiny):
    classnames = [f"class {i}" for i in range(12)]
    images = _random_images(16, seed=3)
    labels = np.arange(16) % 12
    similarity = np.random.default_rng(0).random((16, 12))
    questions = build_questions(
        [f"img{i}" for i in range(16)], labels, classnames, similarity, benchmark="t", seed=0
    )
    samples = zip(questions.to_dicts(), images, strict=True)
    predictions, metrics = evaluate_clip(
        samples, tiny, classnames, TEMPLATES, batch_size=5, primary="mean_per_class"
    )
    by_qid = {row["qid"]: row for row in questions.to_dicts()}
    for row in predictions.to_dicts():
        question = by_qid[row["qid"]]
        assert row["output"] == question["options"]["ABCDE".index(row["pred"])]
        assert row["correct"] == (row["pred"] == question["answer"])
        if row["nway_correct"]:
            assert row["correct"]
    assert metrics["accuracy"] >= metrics["nway_accuracy"]
    assert metrics["primary"] == "mean_per_class"
    assert metrics["ci95"][0] <= metrics["mean_per_class"] <= metrics["ci95"][1]


def test_contrastive_pretraining_learns_and_reloads(tmp_path):
    from fgvlm.data.synthetic import caption_pairs, generate_world

    world = tmp_path / "world"
    generate_world(world, family="shapes", seed=0, train_per_class=2, test_per_class=1)
    config = resources.files("fgvlm.resources").joinpath("clip_configs/tiny-vit.json")
    materialize_random_clip(Path(str(config)), tmp_path / "init", seed=0)
    pairs = caption_pairs([world])
    assert len(pairs) == 2 * 24 * 2  # class prompt + long caption per train image
    summary = contrastive_pretrain(
        tmp_path / "init", tmp_path / "trained", pairs, steps=25, seed=0, batch_size=32, lr=2e-3
    )
    assert summary["last_loss"] < summary["first_loss"]
    trained = load_clip(tmp_path / "trained")
    init = load_clip(tmp_path / "init")
    changed = [
        name
        for name, value in trained.model.state_dict().items()
        if not torch.equal(value, init.model.state_dict()[name])
    ]
    assert changed  # the saved weights are the trained ones, loaded through pretrained=<file>
    assert (
        json.loads((tmp_path / "trained" / "clip.json").read_text())["pretraining"]["steps"] == 25
    )
