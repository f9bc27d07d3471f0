"""Finetuning a tiny transformers Qwen2-VL (LLM only) through fgvlm.training: the Qwen2-VL row."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_hub import make_items, tokenizer_dir  # noqa: F401  (a session fixture, reused)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fgvlm.evaluate.hub_runner import HubVLM, load_hub_vlm
from fgvlm.mcq import MCQItem
from fgvlm.models.hub_train import TrainableHubVLM, load_trainable_hub_vlm
from fgvlm.models.templates import IGNORE_INDEX, TemplateMismatchError
from fgvlm.models.tiny import materialize_tiny_hub_vlm
from fgvlm.training.loop import train
from fgvlm.training.recipe import Recipe, make_plan

QUESTION = "what type of object is in this photo ?"
# Qwen2-VL-Instruct's released chat_template.json (default system turn, images as content parts)
QWEN2_VL_RELEASED_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def image(seed: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def record(sample_id: str, turns: list[tuple[str, str]]) -> dict:
    conversations = []
    for human, answer in turns:
        conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    return {"id": sample_id, "conversations": conversations}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("qwen2vl") / "base"
    materialize_tiny_hub_vlm("qwen2_vl", out, tokenizer_dir=tokenizer_dir, seed=0)
    return out


@pytest.fixture(scope="module")
def vlm(base_dir) -> TrainableHubVLM:
    return load_trainable_hub_vlm(base_dir)


def test_two_turn_masking_token_by_token(vlm):
    sample = record(
        "two-turns",
        [(f"<image>\n{QUESTION}", "red square"), (f"{QUESTION} answer", "blue circle")],
    )
    batch = vlm.collate_fn()([(sample, image(0))])
    tokens = vlm.processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    q = QUESTION.split()
    user = ["<|im_start|>", "user"]
    assistant = ["<|im_start|>", "assistant"]
    image_tokens = ["<|vision_start|>"] + ["<|image_pad|>"] * 4 + ["<|vision_end|>"]  # 32 px
    expected = (
        user + image_tokens + q + ["<|im_end|>"] + assistant + ["red", "square", "<|im_end|>"]
    )
    expected += user + q + ["answer", "<|im_end|>"] + assistant + ["blue", "circle", "<|im_end|>"]
    assert tokens == expected
    loss_at = {expected.index("red"), expected.index("red") + 1, expected.index("red") + 2}
    loss_at |= {len(expected) - 3, len(expected) - 2, len(expected) - 1}
    labels = batch["labels"][0].tolist()
    for i, token_id in enumerate(batch["input_ids"][0].tolist()):
        assert labels[i] == (token_id if i in loss_at else IGNORE_INDEX), (i, tokens[i])
    # image tokens (and everything else outside the answers) carry no loss
    image_positions = [i for i, t in enumerate(tokens) if t == "<|image_pad|>"]
    assert len(image_positions) == 4 and not loss_at & set(image_positions)
    assert batch["mm_token_type_ids"][0].tolist() == [int(t == "<|image_pad|>") for t in tokens]
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]


ANSWERS = ["red square", "blue circle", "green triangle"]


def fixed_batch_samples() -> list[tuple[dict, Image.Image | None]]:
    """Three image questions whose answer depends on the image, and one text-only turn."""
    samples = [
        (record(f"img-{i}", [(f"<image>\n{QUESTION}", answer)]), image(10 + i))
        for i, answer in enumerate(ANSWERS)
    ]
    samples.append((record("text-only", [("what type of object", "small large")]), None))
    return samples


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_dir):
    """The base model trained 8 steps on one fixed batch with an ``updating: llm`` recipe."""
    model = load_trainable_hub_vlm(base_dir)
    batch = model.collate_fn(max_length=64)(fixed_batch_samples())
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        loss_before = float(model(**batch).loss)
    steps = 8
    recipe = Recipe.from_config(
        dict(
            stage="finetune",
            updating="llm",
            llm_lr=5e-3,
            global_batch=4,
            per_device_batch=4,
            max_steps=steps,
        )
    )
    plan = make_plan(recipe, 1, n_samples=4 * steps)

    def batches(epoch: int, skip: int):
        for _ in range(skip, steps):
            yield batch

    state = tmp_path_factory.mktemp("state")
    result = train(model, batches, recipe, plan, state, seed=0, checkpoint_every=100)
    with torch.no_grad():
        loss_after = float(model(**batch).loss)
    return model, before, loss_before, loss_after, result


def test_llm_only_training_changes_only_the_llm_and_lowers_the_loss(trained):
    model, before, loss_before, loss_after, result = trained
    assert result.steps == 8
    names = {id(p): n for n, p in model.named_parameters()}
    groups = model.parameter_groups()
    for group in ("vision", "connector"):
        for param in groups[group]:
            assert torch.equal(param, before[names[id(param)]]), names[id(param)]
    changed = [torch.equal(p, before[names[id(p)]]) for p in groups["llm"]]
    assert not any(changed)  # every LLM tensor learned (the embeddings too)
    assert loss_after < 0.5 * loss_before


def test_save_then_load_hub_vlm_generates_like_the_in_memory_model(trained, tmp_path):
    model, _, _, _, result = trained
    out = tmp_path / "finetuned"
    model.save(out, extra_meta={"training": {"steps": result.steps}})
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "chat_template.jinja", "fgvlm_vlm.json"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) or ".tmp-" in name for name in names)
    meta = json.loads((out / "fgvlm_vlm.json").read_text())
    assert meta["kind"] == "hub" and meta["arch"] == "qwen2_vl"
    assert meta["training"] == {"steps": 8}
    with pytest.raises(ValueError, match="may not set"):
        model.save(tmp_path / "bad", extra_meta={"kind": "trained"})

    loaded = load_hub_vlm(out)
    in_memory = HubVLM(model.model, model.processor, name="in-memory")
    seen = [MCQItem(f"train-{i}", image(10 + i), QUESTION, []) for i in range(len(ANSWERS))]
    items = seen + make_items(4)
    answers = in_memory.generate(items, max_new_tokens=4)
    assert loaded.generate(items, max_new_tokens=4) == answers
    # the evaluation prompt is the training prefix: the memorised answers come back
    assert answers[: len(ANSWERS)] == ANSWERS
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, model.model.state_dict()[name]), name


def test_parameter_groups_partition_the_model(base_dir, vlm):
    groups = vlm.parameter_groups()
    owner = {}
    for group, params in groups.items():
        for param in params:
            assert id(param) not in owner, group
            owner[id(param)] = group
    prefixes = {
        "vision": ("model.visual.patch_embed.", "model.visual.blocks."),
        "connector": ("model.visual.merger.",),
        "llm": ("model.language_model.", "lm_head."),
    }
    named = list(vlm.model.named_parameters())
    assert len(owner) == len(named)
    for name, param in named:
        assert name.startswith(prefixes[owner[id(param)]]), (name, owner[id(param)])
    assert all(groups[g] for g in prefixes)

    # a tied LM head (Qwen2-VL-2B) is the embedding matrix: listed once, in "llm"
    tied = load_trainable_hub_vlm(base_dir)
    tied.model.lm_head.weight = tied.model.model.language_model.embed_tokens.weight
    tied = TrainableHubVLM(tied.model, tied.processor)
    assert len(tied.parameter_groups()["llm"]) == len(groups["llm"]) - 1


def test_mixed_batch_right_pads_and_pickles(vlm):
    samples = [
        (record("wide", [(f"{QUESTION}\n<image>", "red square")]), image(1, (32, 48))),
        (record("text", [("what type of object", "blue")]), None),
        (record("small", [(f"<image> {QUESTION}", "green triangle")]), image(2).convert("L")),
    ]
    collate = vlm.collate_fn()
    batch = collate(samples)
    again = pickle.loads(pickle.dumps(collate))(samples)
    assert batch.keys() == again.keys()
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    tokens = [vlm.processor.tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"]]
    assert [row.count("<|image_pad|>") for row in tokens] == [6, 0, 4]  # 32x48 px, none, 32x32
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4]]
    assert batch["pixel_values"].shape[0] == 24 + 16
    # the image moves to the front of its turn, as the evaluation prompt has it
    assert tokens[0][2:4] == ["<|vision_start|>", "<|image_pad|>"]
    lengths = batch["attention_mask"].sum(dim=1)
    for row, n in enumerate(lengths.tolist()):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (len(tokens[row]) - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        answer = samples[row][0]["conversations"][1]["value"].split()
        assert [tokens[row][i] for i in torch.nonzero(batch["labels"][row] >= 0).flatten()] == [
            *answer,
            "<|im_end|>",
        ]
    text_only = collate([samples[1]])
    assert "pixel_values" not in text_only and "image_grid_thw" not in text_only
    with torch.no_grad():
        assert float(vlm(**batch).loss) > 0


@pytest.mark.parametrize(
    ("sample", "img", "message"),
    [
        (
            {"id": "s-roles", "conversations": [{"from": "gpt", "value": "red"}]},
            None,
            "'s-roles'.*do not alternate",
        ),
        (record("s-noimage", [(f"<image>\n{QUESTION}", "red")]), None, "'s-noimage'.*no image"),
        (record("s-noplace", [(QUESTION, "red")]), image(0), "'s-noplace'.*0 '<image>'"),
        (
            record("s-special", [("<image> red <|im_end|>", "red")]),
            image(0),
            "'s-special'.*special tokens",
        ),
    ],
)
def test_bad_samples_raise_naming_the_sample(vlm, sample, img, message):
    good = (record("good", [(QUESTION, "red")]), None)
    with pytest.raises(TemplateMismatchError, match=message):
        vlm.collate_fn()([good, (sample, img)])


def test_max_length_cuts_text_but_never_the_image_or_every_answer(vlm):
    two_turns = record("long", [("what type", "red square"), ("what object", "blue circle")])
    full = vlm.collate_fn()([(two_turns, None)])
    cut = vlm.collate_fn(max_length=10)([(two_turns, None)])
    assert cut["input_ids"].shape == (1, 10)
    assert torch.equal(cut["labels"], full["labels"][:, :10])
    assert int((cut["labels"] >= 0).sum()) == 3  # "red square <|im_end|>" of the first turn
    with pytest.raises(ValueError, match="'long'.*leaves no answer"):
        vlm.collate_fn(max_length=5)([(two_turns, None)])
    pictured = record("pic", [(f"<image>\n{QUESTION}", "red")])
    with pytest.raises(ValueError, match="'pic'.*cut its image"):
        vlm.collate_fn(max_length=4)([(pictured, image(0))])


@pytest.fixture(scope="module")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (Qwen2's kind: spaces and newlines are tokens too)."""
    corpus = [
        "You are a helpful assistant.",
        "What type of object is in this photo? A red square, 12 blue circles.",
        "system user assistant\n answer: the photo shows a small green triangle.",
    ] * 5
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=specials[1:],
    )
    out = tmp_path_factory.mktemp("bpe")
    tokenizer.save_pretrained(out)
    return out


def test_offsets_map_answers_through_a_byte_level_bpe_and_the_released_template(
    bpe_tokenizer_dir,
):
    from fgvlm.models.tiny import build_tiny_hub_vlm

    model, processor = build_tiny_hub_vlm("qwen2_vl", tokenizer_dir=bpe_tokenizer_dir, seed=0)
    processor.chat_template = QWEN2_VL_RELEASED_TEMPLATE
    vlm = TrainableHubVLM(model, processor)
    answers = [" A red square,\n 12 circles.", "the photo shows\n\nsmall green"]
    sample = record(
        "bpe",
        [("<image>\nWhat type of object is in this photo?", answers[0]), ("And?", answers[1])],
    )
    batch = vlm.collate_fn()([(sample, image(3))])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    tokenizer = processor.tokenizer
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.")
    picked = [int(t) for t in labels if t >= 0]
    assert tokenizer.decode(picked) == "".join(a + "<|im_end|>" for a in answers)
    # the tokens before the first label are exactly the evaluation prompt of HubVLM
    first = int(torch.nonzero(labels >= 0)[0])
    item = MCQItem("q", image(3), "What type of object is in this photo?", [])
    prompt = HubVLM(model, processor, name="tiny").encode([item])["input_ids"][0]
    assert ids[:first].tolist() == prompt.tolist()


def test_load_rejects_other_folders(tmp_path):
    from transformers import LlavaConfig

    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_trainable_hub_vlm(tmp_path)
    LlavaConfig().save_pretrained(tmp_path / "llava")
    with pytest.raises(ValueError, match="'llava' is not a supported"):
        load_trainable_hub_vlm(tmp_path / "llava")


def test_run_training_finetunes_the_base_folder_end_to_end(base_dir, tmp_path):
    """run_training with base_dir: shards -> DataLoader workers -> save -> eval load."""
    from fgvlm.data.shards import write_conversation_shards
    from fgvlm.training.stage import run_training

    samples = []
    for i, (rec, img) in enumerate(fixed_batch_samples() * 2):
        rec, source = {**rec, "id": f"{rec['id']}-{i}"}, None
        if img is not None:
            source = tmp_path / f"{i}.png"
            img.save(source)
            rec["image"] = source.name
        samples.append((rec, source))
    write_conversation_shards(samples, tmp_path / "shards", samples_per_shard=4)
    recipe = dict(stage="finetune", updating="llm", llm_lr=5e-3, global_batch=4, epochs=1)
    summary = run_training(
        {"recipe": recipe, "seed": 0},
        tmp_path / "out",
        state_dir=tmp_path / "state",
        data_dir=tmp_path / "shards",
        base_dir=base_dir,
        dataloader_workers=2,
    )
    assert summary["result"]["steps"] == 2
    meta = json.loads((tmp_path / "out" / "fgvlm_vlm.json").read_text())
    assert (meta["kind"], meta["arch"], meta["base"]) == ("hub", "qwen2_vl", str(base_dir))
    assert meta["training"]["result"]["steps"] == 2
    base, tuned = load_hub_vlm(base_dir).model, load_hub_vlm(tmp_path / "out").model
    for name, tensor in base.state_dict().items():
        same = torch.equal(tensor, tuned.state_dict()[name])
        assert same == (not name.startswith(("model.language_model.", "lm_head."))), name


def test_save_writes_a_gathered_state_dict_in_place_of_the_modules_tensors(trained, tmp_path):
    """Under FSDP / ZeRO-3 the trainer saves weights gathered from shards, not the module's."""
    from safetensors.torch import load_file

    model = trained[0]
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    model.save(tmp_path / "gathered", state_dict=state)
    saved = load_file(tmp_path / "gathered" / "model.safetensors")
    assert saved and all(torch.all(t == 0.5) for t in saved.values())
    with pytest.raises(ValueError, match="no 'model.' tensors"):
        model.save(tmp_path / "bad", state_dict={"other.weight": torch.zeros(1)})
