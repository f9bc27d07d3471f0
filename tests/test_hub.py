"""Hub VLM runner on tiny transformers-native LLaVA and Qwen2-VL models saved like released ones."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fgvlm.evaluate.hub_runner import HubVLM, load_hub_vlm
from fgvlm.evaluate.scoring import merge_parts, score, score_to_parts
from fgvlm.hub_pins import is_commit
from fgvlm.mcq import MCQItem
from fgvlm.models import hub
from fgvlm.models.hub import fetch_hub_vlm
from fgvlm.models.tiny import build_tiny_hub_vlm, materialize_tiny_hub_vlm

ARCHS = ("llava", "qwen2_vl")
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "what type of object is in this photo ? A B C D E . answer with the option 's letter from "
    "given choices directly user assistant red blue green square circle triangle small large"
).split()
OPTIONS = ["red square", "blue circle", "green triangle", "small red circle", "large blue square"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer like the one ``materialize_tiny_llm`` writes."""
    vocab = {token: i for i, token in enumerate(SPECIAL + sorted(set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIAL[4:],
    )
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    for arch in ARCHS:
        materialize_tiny_hub_vlm(arch, root / arch, tokenizer_dir=tokenizer_dir, seed=0)
    return {arch: root / arch for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_vlms(tiny_dirs) -> dict[str, HubVLM]:
    return {arch: load_hub_vlm(path) for arch, path in tiny_dirs.items()}


def make_items(n: int, seed: int = 0) -> list[MCQItem]:
    """Random images (two sizes, so Qwen2-VL rows differ in image tokens; item 5 has none)
    and prompts of different lengths, so every batch pads."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        size = (32, 32) if i % 3 else (48, 32)
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        options = OPTIONS[i % 5 :] + OPTIONS[: i % 5]
        lines = " ".join(f"{'ABCDE'[k]} . {o}" for k, o in enumerate(options))
        prompt = f"what type of object is in this photo ? {'red ' * (i % 4)}{lines} answer"
        image = None if i == 5 else Image.fromarray(pixels)  # text-only questions mix in
        items.append(MCQItem(f"q-{i:03d}", image, prompt, options))
    return items


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_gives_identical_outputs(arch, tokenizer_dir, tiny_vlms):
    model, processor = build_tiny_hub_vlm(arch, tokenizer_dir=tokenizer_dir, seed=0)
    in_memory = HubVLM(model, processor, name="in-memory")
    items = make_items(4)
    assert in_memory.generate(items, max_new_tokens=5) == tiny_vlms[arch].generate(
        items, max_new_tokens=5
    )
    conts = [item.options for item in items]
    np.testing.assert_allclose(
        in_memory.continuation_logprobs(items, conts),
        tiny_vlms[arch].continuation_logprobs(items, conts),
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_materialize_is_deterministic_and_loads_like_a_released_model(
    arch, tmp_path, tokenizer_dir, tiny_dirs, tiny_vlms
):
    materialize_tiny_hub_vlm(arch, tmp_path / arch, tokenizer_dir=tokenizer_dir, seed=0)
    names = sorted(p.name for p in tiny_dirs[arch].iterdir())
    assert {"config.json", "model.safetensors", "processor_config.json"} <= set(names)
    assert "chat_template.jinja" in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    for name in names:
        assert (tmp_path / arch / name).read_bytes() == (tiny_dirs[arch] / name).read_bytes()
    expected = {
        "llava": "LlavaForConditionalGeneration",
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
    }
    assert type(tiny_vlms[arch].model).__name__ == expected[arch]
    other = tmp_path / "other-seed"
    materialize_tiny_hub_vlm(arch, other, tokenizer_dir=tokenizer_dir, seed=1)
    assert (other / "model.safetensors").read_bytes() != (
        tiny_dirs[arch] / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("arch", ARCHS)
def test_image_tokens_fit_32px_images(arch, tiny_vlms):
    """32 px images: LLaVA 16 patch tokens (CLS dropped), Qwen2-VL 2 x 2 merged tokens (the
    processor's pixel range keeps 32 px instead of upscaling to its 56 px default minimum)."""
    vlm = tiny_vlms[arch]
    (item,) = make_items(2)[1:]
    encoded = vlm.encode([item])
    token = {"llava": "<image>", "qwen2_vl": "<|image_pad|>"}[arch]
    count = int((encoded["input_ids"] == vlm.tokenizer.convert_tokens_to_ids(token)).sum())
    assert count == {"llava": 16, "qwen2_vl": 4}[arch]
    assert vlm.tokenizer.padding_side == "left"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["generate", "letter_likelihood", "option_likelihood"])
def test_predictions_do_not_depend_on_batch_size(arch, mode, tiny_vlms):
    items = make_items(10)
    runs = {
        size: score(tiny_vlms[arch], items, mode=mode, batch_size=size, max_new_tokens=4)
        for size in (1, 3, 8)
    }
    reference = runs[1]
    for size in (3, 8):
        assert [(r["output"], r["pred"]) for r in runs[size]] == [
            (r["output"], r["pred"]) for r in reference
        ], f"batch size {size}"
        if mode != "generate":
            np.testing.assert_allclose(
                [r["scores"] for r in runs[size]], [r["scores"] for r in reference], atol=1e-5
            )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["generate", "option_likelihood"])
def test_every_image_of_a_multi_image_question_reaches_the_model(arch, mode, tiny_vlms):
    """An item's further images follow its first, one image entry each in the chat turn,
    before the text; they change the model's scores; answers do not depend on the batch."""
    vlm = tiny_vlms[arch]
    items = make_items(6)
    second = make_items(7, seed=1)
    multi = [
        MCQItem(f"m-{i}", item.image, item.prompt, item.options, None, (second[i].image,))
        for i, item in enumerate(items)
        if item.image is not None
    ]
    prompt = vlm.chat_prompt(multi[0])
    placeholder = {"llava": "<image>", "qwen2_vl": "<|image_pad|>"}[arch]
    assert prompt.count(placeholder) == 2 and prompt.rindex(placeholder) < prompt.index("what")
    mixed = [multi[0], items[5], multi[1], items[1], multi[2]]  # with one- and no-image items
    runs = {
        size: score(vlm, mixed, mode=mode, batch_size=size, max_new_tokens=4) for size in (1, 2, 5)
    }
    answers = {size: [(r["output"], r["pred"]) for r in run] for size, run in runs.items()}
    assert answers[1] == answers[2] == answers[5]
    if mode == "option_likelihood":
        for size in (2, 5):
            np.testing.assert_allclose(
                [r["scores"] for r in runs[size]], [r["scores"] for r in runs[1]], atol=1e-5
            )
        one_image = score(vlm, [items[0]], mode=mode, batch_size=1, max_new_tokens=4)
        assert not np.allclose(one_image[0]["scores"], runs[1][0]["scores"], atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_returns_the_greedy_continuation_only(arch, tiny_vlms):
    """Batched, cached, left-padded generation equals a plain argmax loop on one sequence
    (image placeholders excluded: a random tiny model does predict them)."""
    vlm = tiny_vlms[arch]
    items = make_items(3)
    generated = vlm.generate(items, max_new_tokens=4)
    stop = set(vlm.model.generation_config.eos_token_id)
    for item, text in zip(items, generated, strict=True):
        inputs = dict(vlm.encode([item]))
        new = []
        with torch.no_grad():
            for _ in range(4):
                logits = vlm.model(**inputs).logits[0, -1]
                logits[vlm.placeholder_ids] = -float("inf")
                token = int(logits.argmax())
                if token in stop:
                    break
                new.append(token)
                inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], 1)
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
                if "mm_token_type_ids" in inputs:
                    inputs["mm_token_type_ids"] = torch.cat(
                        [inputs["mm_token_type_ids"], torch.zeros((1, 1), dtype=torch.long)], 1
                    )
        assert text == vlm.tokenizer.decode(new, skip_special_tokens=True).strip()


def manual_logprob(vlm: HubVLM, item: MCQItem, text: str) -> float:
    """Sum of log-probs of ``text`` after the prompt: one unpadded sequence, no batching."""
    encoded = vlm.encode([item])
    cont = vlm.tokenizer(text, add_special_tokens=False)["input_ids"]
    inputs = dict(encoded)
    n = encoded["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([encoded["input_ids"], torch.tensor([cont])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        zeros = torch.zeros((1, len(cont)), dtype=inputs["mm_token_type_ids"].dtype)
        inputs["mm_token_type_ids"] = torch.cat([encoded["mm_token_type_ids"], zeros], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(vlm.model(**inputs).logits[0].float(), dim=-1)
    return float(sum(logp[n - 1 + t, token] for t, token in enumerate(cont)))


@pytest.mark.parametrize("arch", ARCHS)
def test_continuation_logprobs_match_an_unpadded_forward_pass(arch, tiny_vlms):
    vlm = tiny_vlms[arch]
    items = make_items(3)
    conts = [["small red circle", "A"], ["B", "C"], ["blue circle", "green triangle"]]
    batched = vlm.continuation_logprobs(items, conts)
    # item 1 takes the single-token path, items 0 and 2 the per-continuation path
    for item, texts, row in zip(items, conts, batched, strict=True):
        expected = [manual_logprob(vlm, item, text) for text in texts]
        np.testing.assert_allclose(row, expected, atol=1e-4)
    with pytest.raises(ValueError, match="has no tokens"):
        vlm.continuation_logprobs(items[:1], [["", "A"]])


def test_answer_prefix_starts_the_assistant_turn(tiny_dirs):
    vlm = load_hub_vlm(tiny_dirs["qwen2_vl"], answer_prefix="answer :")
    (item,) = make_items(1)
    assert vlm.chat_prompt(item).endswith("<|im_start|>assistant\nanswer :")
    # the answer is scored after the prefix: the same as scoring prefix + answer after no prefix
    plain = load_hub_vlm(tiny_dirs["qwen2_vl"])
    with_prefix = vlm.continuation_logprobs([item], [["B"]])[0][0]
    np.testing.assert_allclose(
        plain.continuation_logprobs([item], [["answer : B"]])[0][0]
        - plain.continuation_logprobs([item], [["answer :"]])[0][0],
        with_prefix,
        atol=1e-4,
    )


def test_system_prompt_and_pad_to_square_reach_the_processor(tiny_dirs, monkeypatch):
    """The config's system turn is rendered before the question; pad_to_square hands the
    processor a square image in its mean colour (LLaVA-1.5's expand2square), the original
    centred in it."""
    vlm = load_hub_vlm(tiny_dirs["llava"], system_prompt="be brief", pad_to_square=True)
    (item,) = [i for i in make_items(3) if i.image is not None and i.image.size != (32, 32)]
    assert vlm.chat_prompt(item).startswith("<|im_start|>system\nbe brief<|im_end|>\n")
    assert vlm.chat_prompt(item).index("be brief") < vlm.chat_prompt(item).index("<image>")
    seen = []
    original = type(vlm.processor).__call__

    def spy(self, *args, images=None, **kwargs):
        seen.extend(images or [])
        return original(self, *args, images=images, **kwargs)

    monkeypatch.setattr(type(vlm.processor), "__call__", spy)
    vlm.encode([item])
    (image,) = seen
    width, height = item.image.size
    side = max(width, height)
    assert image.size == (side, side)
    fill = tuple(int(m * 255) for m in vlm.processor.image_processor.image_mean)
    pixels = np.asarray(image)
    assert (pixels[0, 0] == fill).all() and (pixels[-1, -1] == fill).all()
    top, left = (side - height) // 2, (side - width) // 2
    assert (pixels[top : top + height, left : left + width] == np.asarray(item.image)).all()
    plain = load_hub_vlm(tiny_dirs["llava"])
    assert "system" not in plain.chat_prompt(item)


@pytest.mark.parametrize("arch", ARCHS)
def test_killed_evaluation_resumes_with_identical_predictions(arch, tiny_vlms, tmp_path):
    items = make_items(7)
    answers = {item.qid: "A" for item in items}
    settings = {"mode": "generate", "batch_size": 2, "part_size": 3, "max_new_tokens": 4}
    score_to_parts(tiny_vlms[arch], items, tmp_path / "full", **settings)

    class Killed(Exception):
        pass

    class Counting:
        """The tiny VLM, counting the questions it generates for; raises after ``limit``."""

        def __init__(self, vlm, limit=None):
            self.vlm, self.name, self.limit, self.seen = vlm, vlm.name, limit, []

        def generate(self, batch, *, max_new_tokens):
            if self.limit is not None and len(self.seen) >= self.limit:
                raise Killed
            self.seen += [item.qid for item in batch]
            return self.vlm.generate(batch, max_new_tokens=max_new_tokens)

        def continuation_logprobs(self, batch, continuations):
            raise AssertionError("not used in generate mode")

    with pytest.raises(Killed):  # stopped inside the third part
        score_to_parts(Counting(tiny_vlms[arch], limit=6), items, tmp_path / "parts", **settings)
    rerun = Counting(tiny_vlms[arch])
    counts = score_to_parts(rerun, items, tmp_path / "parts", **settings)
    assert counts == {"parts": 3, "computed": 1, "reused": 2}
    assert rerun.seen == ["q-006"]
    full = merge_parts(tmp_path / "full", answers)
    assert merge_parts(tmp_path / "parts", answers).equals(full)


def test_trust_remote_code_only_when_opted_in(tiny_dirs, monkeypatch):
    calls = []
    for cls in (hub.AutoModelForImageTextToText, hub.AutoProcessor):
        original = cls.from_pretrained

        def capture(path, *args, _cls=cls, _original=original, **kwargs):
            calls.append((_cls.__name__, kwargs))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", capture)
    load_hub_vlm(tiny_dirs["llava"])
    load_hub_vlm(tiny_dirs["llava"], trust_remote_code=True)
    flags = [(name, kwargs["trust_remote_code"]) for name, kwargs in calls]
    assert flags == [
        ("AutoModelForImageTextToText", False),
        ("AutoProcessor", False),
        ("AutoModelForImageTextToText", True),
        ("AutoProcessor", True),
    ]
    assert all(kw["use_safetensors"] for name, kw in calls if name.startswith("AutoModel"))


def test_load_hub_vlm_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hub_vlm(tmp_path / "absent")


def fake_snapshot_download(files: dict[str, bytes], record: list):
    """Stands in for huggingface_hub.snapshot_download: writes the files its patterns select."""

    def download(*, repo_id, revision, local_dir, allow_patterns, ignore_patterns):
        record.append({"repo_id": repo_id, "revision": revision})
        # huggingface_hub's per-file metadata: first line the commit the branch pointed at
        meta = Path(local_dir) / ".cache" / "huggingface" / "download" / "config.json.metadata"
        meta.parent.mkdir(parents=True, exist_ok=True)
        commit = revision if is_commit(revision) else COMMITS.get(repo_id)
        if commit:
            meta.write_text(f"{commit}\netag\n0\n")
        for name, data in files.items():
            allowed = any(fnmatch.fnmatch(name, p) for p in allow_patterns)
            if allowed and not any(fnmatch.fnmatch(name, p) for p in ignore_patterns):
                path = Path(local_dir) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        (Path(local_dir) / ".cache" / "huggingface" / "download.lock").write_text("")
        return str(local_dir)

    return download


COMMITS = {"org/vlm": "a" * 40, "org/vicuna": "b" * 40}
REPO_FILES = {
    "config.json": b"{}",
    "model-00001-of-00002.safetensors": b"w1",
    "model.safetensors.index.json": b"{}",
    "pytorch_model.bin": b"pickle",
    "training_args.pt": b"pickle",
    "chat_template.jinja": b"{{ messages }}",
    "tokenizer.model": b"spm",
    "modeling_custom.py": b"import os",
    "README.md": b"# model",
}


@pytest.mark.parametrize("trust", [False, True])
def test_fetch_hub_vlm_takes_safetensors_and_code_only_on_opt_in(tmp_path, monkeypatch, trust):
    record = []
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download(REPO_FILES, record))
    out = tmp_path / "model"
    fetch_hub_vlm("org/vlm", "abc123", out, trust_remote_code=trust)
    names = sorted(p.name for p in out.iterdir())
    expected = [
        "chat_template.jinja",
        "config.json",
        "fgvlm_source.json",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.model",
    ]
    assert names == sorted(expected + (["modeling_custom.py"] if trust else []))
    assert record == [{"repo_id": "org/vlm", "revision": "abc123"}]
    source = json.loads((out / "fgvlm_source.json").read_text())
    files = source.pop("files")
    assert source == {
        "repo": "org/vlm",
        "revision": "abc123",
        "sha": COMMITS["org/vlm"],
        "trust_remote_code": trust,
    }
    assert files["config.json"] == hashlib.sha256(b"{}").hexdigest()


def test_fetch_hub_vlm_puts_a_separate_tokenizer_repo_in_tokenizer(tmp_path, monkeypatch):
    """CogVLM-chat ships no tokenizer: the config names Vicuna's, fetched beside the model."""
    tokenizer_files = {
        "tokenizer.model": b"spm",
        "tokenizer_config.json": b"{}",
        "special_tokens_map.json": b"{}",
        "config.json": b"{}",
        "model-00001-of-00002.safetensors": b"vicuna weights",
        "pytorch_model-00001-of-00002.bin": b"pickle",
    }
    record = []
    by_repo = {"org/vlm": REPO_FILES, "org/vicuna": tokenizer_files}

    def download(*, repo_id, **kwargs):
        return fake_snapshot_download(by_repo[repo_id], record)(repo_id=repo_id, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", download)
    out = tmp_path / "model"
    tokenizer = {"repo": "org/vicuna", "revision": "v1.5"}
    fetch_hub_vlm("org/vlm", "main", out, trust_remote_code=True, tokenizer=tokenizer)
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert record[1] == {"repo_id": "org/vicuna", "revision": "v1.5"}
    source = json.loads((out / "fgvlm_source.json").read_text())
    assert source["tokenizer"] == {**tokenizer, "sha": COMMITS["org/vicuna"]}


def test_a_second_fetch_asks_for_the_commit_the_first_resolved(tmp_path, monkeypatch):
    """A branch is resolved once: the lock beside the folder makes later fetches (e.g. after
    the folder was deleted) ask for the recorded commit, not the branch."""
    record = []
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download(REPO_FILES, record))
    out = tmp_path / "model"
    tokenizer = {"repo": "org/vicuna", "revision": "main"}
    fetch_hub_vlm("org/vlm", "main", out, trust_remote_code=True, tokenizer=tokenizer)
    lock = json.loads((tmp_path / "model.lock.json").read_text())
    assert lock == {"org/vlm@main": COMMITS["org/vlm"], "org/vicuna@main": COMMITS["org/vicuna"]}
    shutil.rmtree(out)
    moved = {"org/vlm": "c" * 40}  # the branch moved on the hub meanwhile
    monkeypatch.setattr(sys.modules[__name__], "COMMITS", moved)
    fetch_hub_vlm("org/vlm", "main", out, trust_remote_code=True, tokenizer=tokenizer)
    assert [r["revision"] for r in record] == ["main", "main", "a" * 40, "b" * 40]
    assert json.loads((out / "fgvlm_source.json").read_text())["sha"] == "a" * 40
    # a sha in the config is used as is; another branch name is resolved afresh
    record.clear()
    fetch_hub_vlm("org/vlm", "d" * 40, tmp_path / "pinned")
    fetch_hub_vlm("org/vlm", "v2", tmp_path / "model2")
    assert [r["revision"] for r in record] == ["d" * 40, "v2"]
    assert json.loads((tmp_path / "model2.lock.json").read_text()) == {"org/vlm@v2": "c" * 40}


def test_fetch_hub_vlm_refuses_pickle_only_repos(tmp_path, monkeypatch):
    files = {"config.json": b"{}", "pytorch_model.bin": b"pickle"}
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download(files, []))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        fetch_hub_vlm("org/old", "main", tmp_path / "model")
    assert not (tmp_path / "model").exists()


def save_tiny_lm(arch: str, tokenizer_dir: Path, out: Path) -> Path:
    """A tiny causal LM of ``arch`` with the test tokenizer, as materialize_tiny_llm saves it."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    config_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[arch]
    torch.manual_seed(3)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_cls(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(("arch", "lm_arch"), [("llava", "llama"), ("qwen2_vl", "qwen2")])
def test_language_model_initialised_from_a_tiny_lm(arch, lm_arch, tmp_path, tokenizer_dir):
    lm_dir = save_tiny_lm(lm_arch, tokenizer_dir, tmp_path / "lm")
    materialize_tiny_hub_vlm(
        arch, tmp_path / "vlm", tokenizer_dir=lm_dir, seed=0, text_model_dir=lm_dir
    )
    vlm = load_hub_vlm(tmp_path / "vlm")
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    lm_embed = lm.get_input_embeddings().weight
    vlm_embed = vlm.model.get_input_embeddings().weight
    assert vlm_embed.shape[0] >= lm_embed.shape[0]
    torch.testing.assert_close(vlm_embed[: lm_embed.shape[0]], lm_embed, rtol=0, atol=0)
    lm_layer = lm.model.layers[1].mlp.down_proj.weight
    vlm_layer = vlm.model.model.language_model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(vlm_layer, lm_layer, rtol=0, atol=0)
    assert vlm.generate(make_items(1), max_new_tokens=3)[0] is not None


def test_qwen2_vl_needs_a_qwen2_language_model(tmp_path, tokenizer_dir):
    lm_dir = save_tiny_lm("llama", tokenizer_dir, tmp_path / "lm")
    with pytest.raises(ValueError, match="qwen2-family"):
        materialize_tiny_hub_vlm(
            "qwen2_vl", tmp_path / "vlm", tokenizer_dir=lm_dir, seed=0, text_model_dir=lm_dir
        )
    with pytest.raises(ValueError, match="unknown tiny hub VLM architecture"):
        materialize_tiny_hub_vlm("idefics", tmp_path / "x", tokenizer_dir=tokenizer_dir, seed=0)
    assert not (tmp_path / "vlm").exists()
