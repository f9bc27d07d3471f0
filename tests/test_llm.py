"""Tiny causal LMs (tokenizer, config, text pre-training, save) and fetching real ones."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import fgvlm.models.hub as hub_module
from fgvlm.models.llm import fetch_llm
from fgvlm.models.templates import (
    IGNORE_INDEX,
    TEMPLATE_NAMES,
    render_conversation,
    tokenize_conversation,
)
from fgvlm.models.tiny import materialize_tiny_llm, train_tokenizer

COLOURS = ["red", "green", "blue", "azure", "crimson", "navy"]
SHAPES = ["circle", "square", "triangle", "hexagon"]
CORPUS = [
    f"A {size} {colour} {shape} on a grey background. <image>"
    for size in ("small", "large")
    for colour in COLOURS
    for shape in SHAPES
] + ["What type of object is in this photo?", "", "It is a small navy square."]
CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat type of object is in this photo?"},
    {"from": "gpt", "value": "It is a small navy square."},
    {"from": "human", "value": "What colour is it?"},
    {"from": "gpt", "value": "navy"},
]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    summaries = {}
    for arch in ("llama", "qwen2"):
        summaries[arch] = materialize_tiny_llm(
            root / arch, arch=arch, corpus=CORPUS, seed=0, text_pretrain_steps=25
        )
    return root, summaries


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_serves_every_template_and_decodes_exactly(arch):
    tokenizer = train_tokenizer(CORPUS, arch=arch)
    # corpus words are single tokens (short sequences, as a word-level vocabulary)
    for word in [" hexagon", " crimson", " background", "What"]:
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
    text = "A large azure hexagon,\nunseen words: zebra 42!"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    for template in TEMPLATE_NAMES:
        turns = CONVERSATION[:2] if template == "plain" else CONVERSATION
        ids, labels = tokenize_conversation(template, tokenizer, turns, sample_id="x")
        assert any(label != IGNORE_INDEX for label in labels)
        assert tokenizer.unk_token_id not in ids or tokenizer.unk_token_id is None
    for token in ["<|im_start|>", "<|im_end|>", "[INST]", "<</SYS>>"]:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert "<image>" not in tokenizer.get_vocab()  # the placeholder is never a token


def test_architecture_special_tokens():
    llama = train_tokenizer(CORPUS, arch="llama")
    qwen = train_tokenizer(CORPUS, arch="qwen2")
    assert (llama.bos_token, llama.eos_token, llama.pad_token) == ("<s>", "</s>", "<pad>")
    # Llama tokenizers add <s> when asked for special tokens; Qwen2 has no beginning token
    assert llama.encode("red")[0] == llama.bos_token_id
    assert qwen.bos_token_id is None and qwen.eos_token == "<|endoftext|>"
    # Qwen2's chat template writes the same text as the chatml template
    messages = [
        {"role": "user", "content": CONVERSATION[0]["value"]},
        {"role": "assistant", "content": CONVERSATION[1]["value"]},
    ]
    rendered = render_conversation("chatml", CONVERSATION[:2], bos=None, eos=None)
    assert qwen.apply_chat_template(messages, tokenize=False) == rendered
    with pytest.raises(ValueError, match="unknown LLM architecture 'gpt2'"):
        train_tokenizer(CORPUS, arch="gpt2")


def test_tokenizer_training_is_deterministic():
    first = train_tokenizer(CORPUS, arch="qwen2").backend_tokenizer.to_str()
    assert train_tokenizer(CORPUS, arch="qwen2").backend_tokenizer.to_str() == first


def test_materialized_llm_loads_and_learned_the_corpus(tiny_dirs):
    root, summaries = tiny_dirs
    for arch, tied in [("llama", False), ("qwen2", True)]:
        summary = summaries[arch]
        assert summary["final_loss"] < 0.5 * summary["first_loss"]
        model = AutoModelForCausalLM.from_pretrained(root / arch)
        tokenizer = AutoTokenizer.from_pretrained(root / arch)
        config = model.config
        assert config.model_type == arch
        assert (config.hidden_size, config.num_hidden_layers) == (96, 2)
        assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
        assert config.vocab_size == len(tokenizer)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        assert summary["params"] == sum(p.numel() for p in model.parameters())
        assert summary["params"] < 1_000_000
        assert {p.name for p in (root / arch).iterdir()} >= {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "pretraining.json",
        }
        # the pre-trained LM prefers corpus text to a shuffled version of it
        good = tokenizer("A small red circle on a grey background.", return_tensors="pt")
        bad = tokenizer("background small circle grey a red A on.", return_tensors="pt")
        with torch.no_grad():
            good_loss = model(**good, labels=good["input_ids"]).loss
            bad_loss = model(**bad, labels=bad["input_ids"]).loss
        assert good_loss < bad_loss


def test_materialize_is_deterministic_per_seed(tmp_path):
    kwargs = {"arch": "qwen2", "corpus": CORPUS, "text_pretrain_steps": 5}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        materialize_tiny_llm(tmp_path / name, seed=seed, **kwargs)
    weights = "model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()
    assert (tmp_path / "a" / weights).read_bytes() != (tmp_path / "c" / weights).read_bytes()
    for name in ("tokenizer.json", "config.json", "pretraining.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_materialize_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    materialize_tiny_llm(tmp_path / "m", arch="llama", corpus=CORPUS, seed=0, text_pretrain_steps=2)
    assert torch.equal(torch.rand(3), expected)


def _fake_snapshot(files: dict[str, bytes], calls: list):
    def fake(*, repo_id, revision, local_dir, allow_patterns):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns})
        for name, data in files.items():
            path = local_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (local_dir / ".cache" / "huggingface").mkdir(parents=True)
        return str(local_dir)

    return fake


def test_fetch_llm_keeps_safetensors_and_tokenizer(tmp_path, monkeypatch):
    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    files = {
        "config.json": json.dumps({"model_type": "llama"}).encode(),
        "model.safetensors": weights.read_bytes(),
        "tokenizer.json": b"{}",
    }
    calls: list = []
    monkeypatch.setattr(hub_module, "snapshot_download", _fake_snapshot(files, calls))
    fetch_llm("lmsys/vicuna-7b-v1.5", "abc123", tmp_path / "vicuna")
    names = sorted(p.name for p in (tmp_path / "vicuna").iterdir())
    assert names == sorted([*files, "fgvlm_source.json"])
    assert calls[0]["repo_id"] == "lmsys/vicuna-7b-v1.5" and calls[0]["revision"] == "abc123"
    patterns = calls[0]["allow_patterns"]
    assert "*.safetensors" in patterns and not any(p.endswith((".bin", ".pt")) for p in patterns)


def test_fetch_llm_refuses_repos_without_safetensors(tmp_path, monkeypatch):
    files = {"config.json": b"{}", "tokenizer.json": b"{}"}
    monkeypatch.setattr(hub_module, "snapshot_download", _fake_snapshot(files, []))
    with pytest.raises(FileNotFoundError, match="org/pickled.*safetensors"):
        fetch_llm("org/pickled", "main", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
