"""LLaVA-style VLM: vision tower, splicing, collate, save/load, generation, a tiny training run."""

from __future__ import annotations

import json
import pickle
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fgvlm.models.clip import PadToSquare, load_clip, pad_colour, read_clip_config
from fgvlm.models.templates import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    TemplateMismatchError,
    answer_ids,
    prompt_ids,
    stop_token_ids,
    tokenize_conversation,
)
from fgvlm.models.tiny import materialize_random_clip, materialize_tiny_llm
from fgvlm.models.vlm import (
    Collator,
    Connector,
    VisionTower,
    _pad_rows,
    build_vlm,
    collate,
    load_vlm,
    save_vlm,
)

TINY_CFG = Path(str(resources.files("fgvlm") / "resources" / "clip_configs" / "tiny-vit.json"))
NAMES = ["red circle", "blue square", "green triangle", "navy hexagon"]
CORPUS = [f"A photo of a {name}." for name in NAMES] + [
    f"It is a {name} on a grey background." for name in NAMES
]


def caption(i: int, name: str) -> dict:
    return {
        "id": f"cap-{i}",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": f"It is a {name}."},
        ],
    }


TEXT_ONLY = {
    "id": "text-0",
    "conversations": [
        {"from": "human", "value": "Name a shape."},
        {"from": "gpt", "value": "A circle."},
    ],
}


def images(n: int, seed: int = 0, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm")
    materialize_random_clip(TINY_CFG, root / "clip", seed=0)
    for family in ("llama", "qwen2"):
        materialize_tiny_llm(
            root / family, arch=family, corpus=CORPUS, seed=0, text_pretrain_steps=30
        )
    return {"root": root, "clip": root / "clip", "llama": root / "llama", "qwen2": root / "qwen2"}


@pytest.fixture(scope="module")
def vlm(dirs):
    return build_vlm(dirs["clip"], dirs["llama"], template="vicuna_v1", seed=0)


# --- vision tower and connector ----------------------------------------------------------


def test_tower_gives_penultimate_patch_tokens_without_cls(dirs):
    tower = VisionTower(dirs["clip"])
    clip = load_clip(dirs["clip"])
    pixels = torch.stack([clip.preprocess(image) for image in images(2)])
    features = tower(pixels)
    assert features.shape == (2, 16, 64)  # (32 / 8)^2 patches, width 64
    assert (tower.num_patches, tower.hidden_size, tower.layer_index) == (16, 64, 0)
    # by hand: embeddings, every block but the last, drop the CLS token
    visual = clip.model.visual
    with torch.no_grad():
        x = visual._embeds(pixels)
        penultimate = visual.transformer.resblocks[0](x)
        last = visual.transformer.resblocks[1](penultimate)
    torch.testing.assert_close(features, penultimate[:, 1:])
    assert not torch.allclose(features, last[:, 1:])
    # a square image: padding changes nothing, so the tower's transform is CLIP's own
    image = images(1, seed=3, size=57)[0]
    assert torch.equal(tower.preprocess(image), clip.preprocess(image))


def edge_object_image() -> Image.Image:
    """A 96x32 grey image with a pure red block at its left edge."""
    pixels = np.full((32, 96, 3), 128, dtype=np.uint8)
    pixels[:, :16] = (255, 0, 0)
    return Image.fromarray(pixels)


def unnormalised(pixels: torch.Tensor, clip_dir: Path) -> torch.Tensor:
    entry = read_clip_config(clip_dir)["preprocess"]
    mean = torch.tensor(entry["mean"]).view(3, 1, 1)
    std = torch.tensor(entry["std"]).view(3, 1, 1)
    return pixels * std + mean


def test_pad_keeps_an_object_at_the_edge_that_a_crop_loses(dirs):
    image = edge_object_image()
    pad = unnormalised(VisionTower(dirs["clip"], aspect="pad").preprocess(image), dirs["clip"])
    crop = unnormalised(VisionTower(dirs["clip"], aspect="crop").preprocess(image), dirs["clip"])
    squash = VisionTower(dirs["clip"], aspect="squash").preprocess(image)
    assert pad.shape == crop.shape == squash.shape == (3, 32, 32)
    red = (pad[0] > 0.9) & (pad[1] < 0.1)
    assert red[12:20, :3].all()  # the block survives at the left edge, mid-height
    assert not ((crop[0] > 0.9) & (crop[1] < 0.1)).any()  # the crop keeps the centre only
    with pytest.raises(ValueError, match="image aspect"):
        VisionTower(dirs["clip"], aspect="letterbox")


def test_padded_border_is_the_normalisation_mean_times_255(dirs):
    mean = read_clip_config(dirs["clip"])["preprocess"]["mean"]
    fill = pad_colour(mean)
    assert fill == tuple(int(m * 255) for m in mean)  # LLaVA's expand2square colour
    padded = PadToSquare(fill)(edge_object_image())
    assert padded.size == (96, 96)
    rows = np.asarray(padded)
    assert (rows[:32] == fill).all() and (rows[64:] == fill).all()  # above and below
    assert (rows[32:64, :16] == (255, 0, 0)).all()  # the image centred vertically
    tensor = unnormalised(VisionTower(dirs["clip"]).preprocess(edge_object_image()), dirs["clip"])
    expected = torch.tensor(fill, dtype=torch.float32).view(3) / 255
    torch.testing.assert_close(tensor[:, 0, 16], expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(tensor[:, -1, 16], expected, atol=2e-6, rtol=0)


def test_training_and_evaluation_share_one_transform_saved_with_the_model(dirs, tmp_path):
    from fgvlm.evaluate.runners import LlavaRunner
    from fgvlm.mcq import MCQItem

    model = build_vlm(dirs["clip"], dirs["llama"], template="vicuna_v1", image_aspect="squash")
    assert Collator(model).preprocess is model.vision.preprocess
    pickle.loads(pickle.dumps(model.vision.preprocess))  # travels to loader workers
    save_vlm(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "fgvlm_vlm.json").read_text())["image_aspect"] == "squash"
    loaded = load_vlm(tmp_path / "m")
    assert loaded.vision.aspect == "squash"
    image = edge_object_image()
    runner = LlavaRunner(loaded, "m")
    train_pixels = Collator(model)([(caption(0, NAMES[0]), image)])["pixel_values"]
    torch.testing.assert_close(runner.vlm.pixel_batch([image]), train_pixels)
    # LLaVA's evaluation code shows one image: a question with more is refused, not cut
    two = MCQItem("q2", image, "what is it", ["a", "b"], extra_images=(image,))
    with pytest.raises(ValueError, match="m: question q2 has several images; it takes one"):
        runner.generate([two], max_new_tokens=1)


def test_tower_stays_frozen(vlm):
    assert not any(p.requires_grad for p in vlm.vision.parameters())
    vlm.train()
    assert not vlm.vision.training and vlm.connector.training
    vlm.eval()
    groups = vlm.parameter_groups()
    assert {k: len(v) > 0 for k, v in groups.items()} == {
        "vision": True,
        "connector": True,
        "llm": True,
    }
    all_ids = [id(p) for group in groups.values() for p in group]
    assert len(all_ids) == len(set(all_ids)) == len(list(vlm.parameters()))


def test_connector_is_mlp2x_gelu():
    connector = Connector("mlp2x_gelu", 64, 96)
    kinds = [type(m).__name__ for m in connector]
    assert kinds == ["Linear", "GELU", "Linear"]
    assert (connector[0].in_features, connector[0].out_features) == (64, 96)
    assert (connector[2].in_features, connector[2].out_features) == (96, 96)
    with pytest.raises(ValueError, match="unknown connector 'qformer'"):
        Connector("qformer", 64, 96)


def test_build_checks_the_template_against_the_tokenizer(dirs, tmp_path):
    materialize_tiny_llm(
        tmp_path / "plain_only",
        arch="llama",
        corpus=CORPUS,
        seed=0,
        text_pretrain_steps=1,
        templates=("plain", "vicuna_v1"),
    )
    with pytest.raises(TemplateMismatchError, match="<\\|im_end\\|>"):
        build_vlm(dirs["clip"], tmp_path / "plain_only", template="chatml")


# --- splicing and collate --------------------------------------------------------------------


def test_features_land_exactly_where_the_placeholder_was(vlm):
    n = vlm.vision.num_patches
    ids = [[5, 6, IMAGE_TOKEN_ID, 7, 8, 9], [10, 11, 12]]
    labels = [[-100, -100, -100, 7, 8, 9], [-100, 11, 12]]
    input_ids = torch.tensor([ids[0], ids[1] + [0, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    label_tensor = torch.tensor([labels[0], labels[1] + [-100] * 3])
    pixels = vlm.pixel_batch([images(1)[0], None])
    assert pixels is not None and torch.equal(pixels[1], torch.zeros_like(pixels[1]))
    with torch.no_grad():
        out = vlm.prepare_inputs(input_ids, mask, label_tensor, pixels)
        embed = vlm.llm.get_input_embeddings()
        features = vlm.connector(vlm.vision(pixels[:1]))[0]
        text0 = embed(torch.tensor([5, 6, 7, 8, 9]))
        text1 = embed(torch.tensor([10, 11, 12]))
    width = 5 + n
    assert out["inputs_embeds"].shape[:2] == (2, width)
    row = out["inputs_embeds"][0]
    assert torch.equal(row[:2], text0[:2])
    assert torch.equal(row[2 : 2 + n], features)
    assert torch.equal(row[2 + n :], text0[2:])
    assert out["labels"][0].tolist() == [-100, -100] + [IGNORE_INDEX] * n + [7, 8, 9]
    assert out["attention_mask"][0].tolist() == [1] * width
    assert out["position_ids"][0].tolist() == list(range(width))
    # the text-only sample: its own embeddings, right-padded
    assert torch.equal(out["inputs_embeds"][1, :3], text1)
    assert out["attention_mask"][1].tolist() == [1, 1, 1] + [0] * (width - 3)
    assert out["labels"][1].tolist() == [-100, 11, 12] + [IGNORE_INDEX] * (width - 3)
    left = vlm.prepare_inputs(input_ids, mask, None, pixels, padding_side="left")
    assert left["attention_mask"][1].tolist() == [0] * (width - 3) + [1, 1, 1]
    assert left["position_ids"][1, -3:].tolist() == [0, 1, 2]


def test_one_image_per_sample_at_most(vlm):
    ids = torch.tensor([[IMAGE_TOKEN_ID, 5, IMAGE_TOKEN_ID]])
    with pytest.raises(ValueError, match="row 0 has 2 image placeholders"):
        vlm.prepare_inputs(ids, torch.ones_like(ids), None, vlm.pixel_batch(images(1)))
    with pytest.raises(ValueError, match="pixel_values"):
        vlm.prepare_inputs(ids[:, :2], torch.ones(1, 2, dtype=torch.long), None, None)


def test_collate_mixes_text_only_and_image_samples(vlm):
    samples = [(caption(0, "red circle"), images(1)[0]), (TEXT_ONLY, None)]
    batch = collate(samples, vlm)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    ids0, labels0 = tokenize_conversation(
        "vicuna_v1", vlm.tokenizer, samples[0][0]["conversations"], sample_id="cap-0"
    )
    assert batch["input_ids"][0, : len(ids0)].tolist() == ids0
    assert batch["labels"][0, : len(ids0)].tolist() == labels0
    assert IMAGE_TOKEN_ID not in batch["input_ids"][1].tolist()
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][1], torch.zeros(3, 32, 32))
    out = vlm(**batch)
    assert torch.isfinite(out.loss)
    only_text = collate([(TEXT_ONLY, None)], vlm)
    assert only_text["pixel_values"] is None and torch.isfinite(vlm(**only_text).loss)
    # a weight-free collator for data-loader workers builds the same batch
    collator = pickle.loads(pickle.dumps(Collator(vlm)))
    again = collator(samples)
    assert all(torch.equal(again[key], batch[key]) for key in batch)


def test_collate_errors_name_the_sample(vlm):
    with pytest.raises(ValueError, match="'text-0'.*exactly one placeholder, got 0"):
        collate([(TEXT_ONLY, images(1)[0])], vlm)
    with pytest.raises(ValueError, match="'cap-3'.*but no image"):
        collate([(caption(3, "red circle"), None)], vlm)
    # max_length counts the image's patch positions: 16 patches leave too little room here
    with pytest.raises(ValueError, match="'cap-1'"):
        collate([(caption(1, "red circle"), images(1)[0])], vlm, max_length=20)


def test_max_length_counts_spliced_positions(vlm):
    sample = (caption(0, "red circle"), images(1)[0])
    full = collate([sample], vlm)
    full_len = int(full["attention_mask"].sum()) + vlm.vision.num_patches - 1
    cut = collate([sample], vlm, max_length=full_len - 2)
    spliced = vlm.prepare_inputs(
        cut["input_ids"], cut["attention_mask"], cut["labels"], cut["pixel_values"]
    )
    assert spliced["inputs_embeds"].shape[1] == full_len - 2
    assert cut["labels"][0].tolist() == full["labels"][0, :-2].tolist()


# --- save / load ----------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "template"), [("llama", "vicuna_v1"), ("qwen2", "chatml")])
def test_save_load_gives_identical_logits(dirs, tmp_path, family, template):
    model = build_vlm(dirs["clip"], dirs[family], template=template, seed=3)
    with torch.no_grad():
        model.connector[0].weight.add_(0.5)  # differs from any fresh init
    batch = collate([(caption(0, "blue square"), images(1)[0]), (TEXT_ONLY, None)], model)
    save_vlm(model, tmp_path / "vlm", {"stage": "pretrain"})
    loaded = load_vlm(tmp_path / "vlm")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    tensors = load_file(str(tmp_path / "vlm" / "model.safetensors"))
    assert all(key.startswith(("connector.", "llm.")) for key in tensors)
    assert "connector.0.weight" in tensors
    record = json.loads((tmp_path / "vlm" / "fgvlm_vlm.json").read_text())
    assert record["encoder"] == str(dirs["clip"]) and record["template"] == template
    assert record["connector"] == "mlp2x_gelu" and record["llm_config"]["model_type"] == family
    assert record["stage"] == "pretrain" and loaded.meta["stage"] == "pretrain"
    assert loaded.template == template
    tied = loaded.llm.lm_head.weight is loaded.llm.model.embed_tokens.weight
    assert tied == (family == "qwen2")
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="may not set \\['template'\\]"):
        save_vlm(model, tmp_path / "bad", {"template": "plain"})
    assert not (tmp_path / "bad").exists()


def test_load_errors_name_the_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="fgvlm_vlm.json"):
        load_vlm(tmp_path)


# --- generation and likelihoods ------------------------------------------------------------


def test_batched_generation_equals_one_by_one(vlm):
    prompts = [
        prompt_ids("vicuna_v1", vlm.tokenizer, "<image>\nWhat is this?"),
        prompt_ids("vicuna_v1", vlm.tokenizer, "Name a shape in one word, please."),
    ]
    picture = images(1, seed=5)[0]
    pixels = vlm.pixel_batch([picture, None])
    batched = vlm.generate_ids(prompts, pixels, max_new_tokens=6)
    single = [
        vlm.generate_ids(prompts[:1], vlm.pixel_batch([picture]), max_new_tokens=6)[0],
        vlm.generate_ids(prompts[1:], None, max_new_tokens=6)[0],
    ]
    assert batched == single
    # the left-padded batch's next-token logits are each prompt's own
    ids, mask = _pad_rows(prompts, vlm.pad_token_id, side="left")
    with torch.no_grad():
        last = vlm.llm(**vlm.prepare_inputs(ids, mask, None, pixels, padding_side="left")).logits
        for row, prompt in enumerate(prompts):
            alone = torch.tensor([prompt])
            pixel = pixels[row : row + 1] if IMAGE_TOKEN_ID in prompt else None
            own = vlm(alone, torch.ones_like(alone), None, pixel).logits
            torch.testing.assert_close(last[row, -1], own[0, -1], atol=1e-5, rtol=1e-4)
    stop = stop_token_ids("vicuna_v1", vlm.tokenizer)
    assert all(len(a) <= 6 and not set(a) & set(stop) for a in batched)
    texts = vlm.generate_text(["<image>\nWhat is this?"], [picture], max_new_tokens=6)
    assert texts == [vlm.tokenizer.decode(batched[0], skip_special_tokens=True).strip()]


def test_sequence_logprobs_match_the_training_loss(vlm):
    prompt = prompt_ids("vicuna_v1", vlm.tokenizer, "<image>\nWhat is this?")
    options = [answer_ids("vicuna_v1", vlm.tokenizer, f"It is a {n}.") for n in NAMES]
    picture = images(1, seed=7)[0]
    pixels = vlm.pixel_batch([picture] * len(options))
    scores = vlm.sequence_logprobs([prompt] * len(options), options, pixels)
    assert scores.shape == (len(options),) and (scores < 0).all()
    # one option by hand: the mean loss over its tokens is -logprob / tokens
    ids = torch.tensor([prompt + options[1]])
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + options[1]])
    with torch.no_grad():
        loss = vlm(ids, torch.ones_like(ids), labels, vlm.pixel_batch([picture])).loss
    torch.testing.assert_close(-scores[1] / len(options[1]), loss)


def test_shared_prefix_logprobs_equal_full_sequence_scores(vlm):
    """Prompts of different lengths (one text-only), unequal option counts and lengths: each
    prompt encoded once with its KV cache shared gives the full-sequence scores."""
    prompts = [
        prompt_ids("vicuna_v1", vlm.tokenizer, "<image>\nWhat is this?"),
        prompt_ids("vicuna_v1", vlm.tokenizer, "Name a shape in one word, please."),
        prompt_ids("vicuna_v1", vlm.tokenizer, "<image>\nWhat shape and colour is this, exactly?"),
    ]
    texts = [[f"It is a {n}." for n in NAMES], ["A", "circle", "It is a navy hexagon."], NAMES]
    conts = [[answer_ids("vicuna_v1", vlm.tokenizer, t) for t in row] for row in texts]
    pictures = images(2, seed=3)
    rows = [pictures[0], None, pictures[1]]
    shared = vlm.shared_prefix_logprobs(prompts, conts, vlm.pixel_batch(rows))
    for prompt, options, picture, got in zip(prompts, conts, rows, shared, strict=True):
        pixels = None if picture is None else vlm.pixel_batch([picture] * len(options))
        full = vlm.sequence_logprobs([prompt] * len(options), options, pixels)
        np.testing.assert_allclose(got, full.numpy(), atol=1e-5, rtol=0)
    assert len({len(c) for row in conts for c in row}) > 2  # continuations do differ in length
    with pytest.raises(ValueError, match="at least one token"):
        vlm.shared_prefix_logprobs(prompts[:1], [[[]]], None)


def test_load_vlm_casts_to_the_evaluation_dtype(dirs, vlm, tmp_path):
    save_vlm(vlm, tmp_path / "saved")
    half = load_vlm(tmp_path / "saved", dtype=torch.bfloat16)
    assert {p.dtype for p in half.llm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.connector.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.vision.parameters()} == {torch.float32}  # TF32 on GPU
    prompt = prompt_ids("vicuna_v1", half.tokenizer, "<image>\nWhat is this?")
    option = answer_ids("vicuna_v1", half.tokenizer, "It is a red circle.")
    pixels = half.pixel_batch(images(1))
    score = half.shared_prefix_logprobs([prompt], [[option]], pixels)[0][0]
    assert np.isfinite(score) and score < 0


# --- a tiny end-to-end training run ---------------------------------------------------------


def test_training_reduces_loss_and_images_reach_the_lm(dirs):
    torch.manual_seed(0)
    model = build_vlm(dirs["clip"], dirs["qwen2"], template="chatml", seed=1)
    pictures = images(len(NAMES), seed=11)
    samples = [(caption(i, name), pictures[i]) for i, name in enumerate(NAMES)]
    batch = collate([*samples, (TEXT_ONLY, None)], model)
    tower_before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    groups = model.parameter_groups()
    optimizer = torch.optim.AdamW(groups["connector"] + groups["llm"], lr=2e-3)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        if not losses:  # image features reach the loss through the connector
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["connector"])
            assert all(p.grad is None for p in groups["vision"])
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    assert losses[-1] < 0.5 * losses[0], losses
    for key, value in model.vision.state_dict().items():
        assert torch.equal(value, tower_before[key]), key
    # the answer depends on the image: other pixels, other logits
    with torch.no_grad():
        logits = model(**batch).logits
        swapped = dict(batch, pixel_values=batch["pixel_values"].flip(0))
        assert not torch.allclose(logits[0], model(**swapped).logits[0])
