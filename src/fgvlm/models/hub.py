"""Released VLMs through transformers (``AutoModelForImageTextToText`` + ``AutoProcessor``).

``fetch_hub_vlm`` downloads a hub repository (safetensors only), ``load_hub_vlm`` loads a local
folder into a ``HubVLM``, which implements ``fgvlm.evaluate.scoring.MCQModel``: prompts go
through the processor's own chat template, generation is batched and greedy with left padding,
and continuation log-probabilities come from one forward pass with the continuation appended.

``materialize_tiny_hub_vlm`` writes tiny transformers-native LLaVA and Qwen2-VL models
(model + processor + chat template, ``save_pretrained``), so the demo evaluates them through
exactly the code path a released model takes.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

from fgvlm.evaluate.scoring import MCQItem
from fgvlm.io import atomic_path, write_json

log = logging.getLogger(__name__)

# what a model folder needs: configs, weights, tokenizer and processor files, chat templates
HUB_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")
# pickled weights are never downloaded (arbitrary code on load); remote code only on opt-in
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.h5")
REMOTE_CODE_PATTERNS = ("*.py",)
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "*.model", "added_tokens.json")
SOURCE_FILE = "fgvlm_source.json"

TINY_KINDS = ("llava", "qwen2_vl")
TINY_IMAGE_SIZE = 32
TINY_PATCH = 8
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
QWEN2_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# chatml with the image before the text, as llava-hf's Qwen-based LLaVA models (interleave,
# onevision) format it; the processor expands "<image>" to one token per patch
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2-VL-Instruct's template without its default system turn (tiny vocabularies lack its words)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class HubVLM:
    """A transformers image-text-to-text model and its processor, as an ``MCQModel``.

    ``model``: in eval mode, on its device; ``processor``: its tokenizer pads on the left.
    ``answer_prefix``: text that starts the assistant turn before the answer (VLMEvalKit's
    "Answer:" for Idefics2, ``fgvlm.evaluate.prompts.ASSISTANT_PREFIX``); empty for most models.
    """

    def __init__(
        self, model: PreTrainedModel, processor: Any, *, name: str, answer_prefix: str = ""
    ) -> None:
        self.model = model.eval()
        self.answer_prefix = answer_prefix
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues every row at the same column
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # Llama-style tokenizers lack one
        self.name = name
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # image/video placeholders are input-only: generated, they would stand for no features
        self.placeholder_ids = sorted(
            {
                value
                for attr in ("image_token_id", "video_token_id", "audio_token_id")
                if isinstance(value := getattr(processor, attr, None), int)
            }
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def chat_prompt(self, item: MCQItem) -> str:
        """The item as one user turn (image first, then the text) in the model's chat template,
        followed by the assistant header (and ``answer_prefix``) the answer comes after."""
        content: list[dict[str, Any]] = [{"type": "image"}] if item.image is not None else []
        content.append({"type": "text", "text": item.prompt})
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        if not self.answer_prefix:
            return prompt
        # "Assistant:" + "Answer:" -> "Assistant: Answer:"; "assistant\n" + "Answer:" as is
        joined = prompt[-1:].isspace() or self.answer_prefix[:1].isspace()
        return prompt + ("" if joined else " ") + self.answer_prefix

    def encode(self, items: list[MCQItem]) -> Any:
        """Processor inputs of ``items`` (left-padded), on the model's device and dtype."""
        if not items:
            raise ValueError("cannot encode an empty batch")
        texts = [self.chat_prompt(item) for item in items]
        images = [_rgb(item.image) for item in items if item.image is not None]
        bos = self.tokenizer.bos_token
        # templates that write the BOS themselves must not get a second one from the tokenizer
        add_special = not (bos and texts[0].startswith(bos))
        encoded = self.processor(
            images=images or None,
            text=texts,
            padding=True,
            return_tensors="pt",
            add_special_tokens=add_special,
        )
        return encoded.to(self.device, dtype=self.model.dtype)

    @torch.inference_mode()
    def generate(self, items: list[MCQItem], *, max_new_tokens: int) -> list[str]:
        """Greedy answers (new tokens only, special tokens dropped, stripped), one per item.

        Image/video placeholder tokens are never generated (``placeholder_ids``).
        """
        encoded = self.encode(items)
        output = self.model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
            suppress_tokens=self.placeholder_ids or None,
        )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def continuation_ids(self, item: MCQItem, text: str) -> list[int]:
        """Token ids of ``text`` as the model would write it after the prompt."""
        return continuation_token_ids(self.tokenizer, text, item.qid)

    @torch.inference_mode()
    def continuation_logprobs(
        self, items: list[MCQItem], continuations: list[list[str]]
    ) -> list[list[float]]:
        """Per item, the summed log-probability of each continuation right after the prompt.

        Items whose continuations are all single tokens (option letters) take one forward pass
        of the prompt; the others one pass per continuation index. Which path an item takes
        depends on the item alone, never on its batch.
        """
        if len(items) != len(continuations):
            raise ValueError(f"{len(items)} items but {len(continuations)} continuation lists")
        ids = [
            [self.continuation_ids(item, text) for text in conts]
            for item, conts in zip(items, continuations, strict=True)
        ]
        results: list[list[float]] = [[] for _ in items]
        single = [i for i, rows in enumerate(ids) if all(len(r) == 1 for r in rows)]
        multi = [i for i in range(len(items)) if i not in set(single)]
        if single:
            encoded = self.encode([items[i] for i in single])
            logps = self._answer_logprobs(encoded, [[] for _ in single])
            for logp, i in zip(logps, single, strict=True):
                results[i] = [float(logp[0, r[0]]) for r in ids[i]]
        if multi:
            encoded = self.encode([items[i] for i in multi])
            for j in range(max(len(ids[i]) for i in multi)):
                # an item with fewer continuations repeats its first one; that score is dropped
                conts = [ids[i][j] if j < len(ids[i]) else ids[i][0] for i in multi]
                logps = self._answer_logprobs(encoded, conts)
                for logp, cont, i in zip(logps, conts, multi, strict=True):
                    if j < len(ids[i]):
                        results[i].append(float(logp[torch.arange(len(cont)), cont].sum()))
        return results

    def _answer_logprobs(self, encoded: Any, continuations: list[list[int]]) -> list[torch.Tensor]:
        """Next-token log-probs [max(1, len(continuation)), vocab] (float32, CPU) per row, at
        the prompt's last position and each continuation position but the last.

        Rows are rebuilt right-padded (prompt, continuation, padding), so every real token sits
        at the position it has in an unpadded batch of one, for any model's position scheme.
        """
        inputs, prompt_lens = _append_right(encoded, continuations, self.tokenizer.pad_token_id)
        length = inputs["input_ids"].shape[1]
        kwargs: dict[str, Any] = {"use_cache": False}
        offset = 0
        if self._keeps_logits:
            # only positions from the shortest prompt's last token on are ever read
            kwargs["logits_to_keep"] = length - (min(prompt_lens) - 1)
            offset = min(prompt_lens) - 1
        logits = self.model(**inputs, **kwargs).logits
        rows = []
        for row, (n, cont) in enumerate(zip(prompt_lens, continuations, strict=True)):
            start = n - 1 - offset
            # slice before the softmax: only a few positions of a large vocabulary leave the GPU
            picked = logits[row, start : start + max(1, len(cont))].float()
            rows.append(torch.log_softmax(picked, dim=-1).cpu())
        return rows


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _append_right(
    encoded: Any, continuations: list[list[int]], pad_id: int
) -> tuple[dict[str, Any], list[int]]:
    """Processor inputs with each row's padding removed, its continuation appended, and the
    rows right-padded again. Token-aligned integer tensors (input_ids, attention_mask,
    mm_token_type_ids, ...) are rebuilt; image tensors pass through unchanged."""
    input_ids = encoded["input_ids"]
    mask = encoded["attention_mask"].bool()
    rows, width = input_ids.shape
    if len(continuations) != rows:
        raise ValueError(f"{rows} prompts but {len(continuations)} continuations")
    prompt_lens = [int(mask[r].sum()) for r in range(rows)]
    length = max(n + len(c) for n, c in zip(prompt_lens, continuations, strict=True))
    out: dict[str, Any] = {}
    for key, value in encoded.items():
        aligned = (
            torch.is_tensor(value)
            and value.dim() == 2
            and tuple(value.shape) == (rows, width)
            and not torch.is_floating_point(value)
        )
        if not aligned:
            out[key] = value
            continue
        fill = {"input_ids": pad_id, "attention_mask": 0}.get(key, 0)
        rebuilt = torch.full((rows, length), fill, dtype=value.dtype, device=value.device)
        for r, cont in enumerate(continuations):
            real = value[r][mask[r]]
            if key == "input_ids":
                tail = torch.tensor(cont, dtype=value.dtype, device=value.device)
            else:
                tail = torch.full((len(cont),), 1 if key == "attention_mask" else 0)
                tail = tail.to(dtype=value.dtype, device=value.device)
            rebuilt[r, : len(real) + len(cont)] = torch.cat([real, tail])
        out[key] = rebuilt
    return out, prompt_lens


def continuation_token_ids(tokenizer: Any, text: str, qid: str) -> list[int]:
    """Token ids of a continuation ``text`` (no special tokens); an error naming question
    ``qid`` when it has none."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"question {qid}: continuation {text!r} has no tokens")
    return list(ids)


def _torch_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    """A torch dtype from its name; None means the checkpoint's own dtype ("auto")."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return value


def load_hub_vlm(
    local_dir: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    name: str | None = None,
    answer_prefix: str = "",
) -> HubVLM:
    """Load a local model folder (``fetch_hub_vlm`` or ``materialize_tiny_hub_vlm`` output).

    Weights must be safetensors. ``trust_remote_code`` runs the folder's own Python code: only
    set it for models the config opts in. ``dtype``: e.g. "bfloat16"; None keeps the
    checkpoint's dtype. ``name`` defaults to the folder name. ``answer_prefix``: see ``HubVLM``.
    """
    local_dir = Path(local_dir)
    if not (local_dir / "config.json").is_file():
        raise FileNotFoundError(f"{local_dir}: no config.json (not a transformers model folder)")
    model = AutoModelForImageTextToText.from_pretrained(
        local_dir,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        dtype=_torch_dtype(dtype),
        device_map=device,
    )
    processor = AutoProcessor.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
    return HubVLM(model, processor, name=name or local_dir.name, answer_prefix=answer_prefix)


def fetch_hub_vlm(
    repo: str,
    revision: str,
    out_dir: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    tokenizer: dict[str, str] | None = None,
) -> None:
    """Download hub repository ``repo`` at ``revision`` into ``out_dir`` (atomically).

    Only configs, safetensors weights, tokenizer/processor files and chat templates are fetched,
    plus the repository's Python files when ``trust_remote_code``; never pickled weights. A repo
    without safetensors weights is an error. ``tokenizer`` ({"repo", "revision"}): a separate
    repository whose tokenizer files go to ``out_dir/tokenizer/`` (CogVLM-chat ships none and
    uses Vicuna's). ``out_dir/fgvlm_source.json`` records the sources.
    """
    patterns = list(HUB_PATTERNS) + (list(REMOTE_CODE_PATTERNS) if trust_remote_code else [])
    with atomic_path(out_dir, is_dir=True) as tmp:
        snapshot_download(
            repo_id=repo,
            revision=revision,
            local_dir=tmp,
            allow_patterns=patterns,
            ignore_patterns=list(PICKLE_PATTERNS),
        )
        if tokenizer:
            snapshot_download(
                repo_id=tokenizer["repo"],
                revision=tokenizer.get("revision", "main"),
                local_dir=tmp / "tokenizer",
                allow_patterns=list(TOKENIZER_PATTERNS),
                ignore_patterns=list(PICKLE_PATTERNS),
            )
            shutil.rmtree(tmp / "tokenizer" / ".cache", ignore_errors=True)
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
        if not any(tmp.rglob("*.safetensors")):
            raise FileNotFoundError(
                f"hub repo {repo!r} ({revision=}) has no *.safetensors weights; "
                "pickled weights are not loaded"
            )
        write_json(
            {
                "repo": repo,
                "revision": revision,
                "trust_remote_code": trust_remote_code,
                **({"tokenizer": tokenizer} if tokenizer else {}),
            },
            tmp / SOURCE_FILE,
        )


def _tiny_tokenizer(kind: str, tokenizer_dir: Path) -> Any:
    """The word-level tokenizer with the special tokens the kind's processor and template need."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    needed = list(CHAT_TOKENS) + (["<image>"] if kind == "llava" else list(QWEN2_VL_TOKENS))
    tokenizer.add_special_tokens(
        {"additional_special_tokens": needed}, replace_extra_special_tokens=False
    )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": "<|im_end|>"})
    return tokenizer


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of the rotary half-dimension into (time, height, width): [16, 24, 24]
    for head_dim 128, the same proportions for tiny heads."""
    half = head_dim // 2
    height = (half - half // 4) // 2
    return [half - 2 * height, height, height]


def _tiny_text_config(kind: str, text_model_dir: Path | None, tokenizer: Any) -> Any:
    """The language model's config: the given tiny LM's, or a small default."""
    if text_model_dir is not None:
        base = AutoConfig.from_pretrained(text_model_dir)
        if kind == "llava":
            return base
        if base.model_type != "qwen2":
            raise ValueError(
                f"{text_model_dir}: qwen2_vl needs a qwen2-family language model, "
                f"got {base.model_type!r}"
            )
        head_dim = base.hidden_size // base.num_attention_heads
        fields = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_act",
            "max_position_embeddings",
            "rms_norm_eps",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        )
        rope = dict(base.rope_parameters or {})
        return Qwen2VLTextConfig(
            **{f: getattr(base, f) for f in fields},
            rope_parameters={
                "rope_type": "default",
                "rope_theta": rope.get("rope_theta", 10000.0),
                "mrope_section": _mrope_section(head_dim),
            },
        )
    common = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
    }
    if kind == "llava":
        return LlamaConfig(**common)
    return Qwen2VLTextConfig(
        **common,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )


def _tiny_model_and_processor(
    kind: str, tokenizer: Any, text_config: Any
) -> tuple[PreTrainedModel, Any]:
    """A randomly initialised tiny VLM of ``kind`` and its processor (tiny vision tower:
    32 px images, 8 px patches)."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    if kind == "llava":
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TINY_IMAGE_SIZE,
            patch_size=TINY_PATCH,
            projection_dim=32,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text_config,
            image_token_index=ids["<image>"],
            image_seq_length=(TINY_IMAGE_SIZE // TINY_PATCH) ** 2,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": TINY_IMAGE_SIZE},
            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        )
        # CLIP adds a CLS token that the "default" feature strategy drops again
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=TINY_PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
        return model, processor
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": text_config.hidden_size,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": TINY_PATCH,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config)
    # sizes snap to multiples of patch x merge = 16 px; the default minimum (56 x 56 px) would
    # upscale 32 px images, so the pixel range is set around them (32 px -> 2 x 2 tokens)
    pixels = {
        "patch_size": TINY_PATCH,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "min_pixels": TINY_IMAGE_SIZE**2,
        "max_pixels": (2 * TINY_IMAGE_SIZE) ** 2,
    }
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    return model, processor


def _load_language_model(model: PreTrainedModel, text_model_dir: Path) -> None:
    """Copy a tiny causal LM's weights into the VLM's language model and LM head."""
    lm = AutoModelForCausalLM.from_pretrained(text_model_dir, use_safetensors=True, dtype="float32")
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(lm.lm_head.state_dict(), strict=True)


def build_tiny_hub_vlm(
    kind: str, *, tokenizer_dir: Path, seed: int, text_model_dir: Path | None = None
) -> tuple[PreTrainedModel, Any]:
    """The model and processor ``materialize_tiny_hub_vlm`` saves (in memory, eval mode)."""
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny hub VLM kind {kind!r}; choose one of {TINY_KINDS}")
    tokenizer = _tiny_tokenizer(kind, Path(tokenizer_dir))
    text_config = _tiny_text_config(
        kind, Path(text_model_dir) if text_model_dir else None, tokenizer
    )
    torch.manual_seed(seed)
    model, processor = _tiny_model_and_processor(kind, tokenizer, text_config)
    if text_model_dir is not None:
        _load_language_model(model, Path(text_model_dir))
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # rows for the added special tokens, drawn under the same seed
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=sorted({i for i in eos if i is not None}),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model.eval(), processor


def materialize_tiny_hub_vlm(
    kind: str,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike,
    seed: int,
    text_model_dir: str | os.PathLike | None = None,
) -> None:
    """Save a tiny transformers-native VLM that ``load_hub_vlm(out_dir)`` loads like a released one.

    ``kind``: "llava" (LlavaForConditionalGeneration: CLIP vision tower, 32 px images, 8 px
    patches -> 16 image tokens) or "qwen2_vl" (Qwen2VLForConditionalGeneration: 32 px -> 4
    merged image tokens). ``tokenizer_dir``: a word-level tokenizer (``materialize_tiny_llm``'s);
    the special tokens the processor and chat template need are added. ``text_model_dir``: a
    tiny causal LM whose weights initialise the language model (qwen2 family for qwen2_vl);
    else a random 2-layer one. Same inputs and seed -> byte-identical files.
    """
    model, processor = build_tiny_hub_vlm(
        kind,
        tokenizer_dir=Path(tokenizer_dir),
        seed=seed,
        text_model_dir=Path(text_model_dir) if text_model_dir is not None else None,
    )
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
