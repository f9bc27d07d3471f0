"""Finetuning a released Qwen2-VL through transformers: the paper's "FT Qwen2-VL base on LLaVA" row.

``load_trainable_hub_vlm`` wraps a ``Qwen2VLForConditionalGeneration`` folder (a hub snapshot or
``materialize_tiny_hub_vlm`` output) in a ``TrainableHubVLM``, which has the trainer interface of
``fgvlm.models.vlm.LlavaVLM`` (``parameter_groups``, ``forward(**batch)``, ``collate_fn``,
``save``), so ``fgvlm.training`` runs it with an ``updating: llm`` recipe (``group_schedules`` in
``fgvlm.training.recipe``: the LLM learns; vision tower and merger stay frozen).

Conversations (LLaVA format) are rendered through the processor's own chat template, exactly as
``fgvlm.models.hub.HubVLM`` renders evaluation prompts: a user turn holding the image is
``[image, text]`` (LLaVA's own preprocessing also moves ``"<image>"`` to the front of the turn),
which Qwen2-VL's template writes as ``<|vision_start|><|image_pad|><|vision_end|>{text}``; the
processor expands ``<|image_pad|>`` to one token per merged patch. Only the assistant answers
and their ``<|im_end|>`` carry loss: their character spans in the rendered text are mapped to
tokens through the tokenizer's offset mapping (a token is a label when it starts in a span).
The saved folder is a plain transformers model folder, so ``fgvlm.models.hub.load_hub_vlm``
evaluates the finetuned model exactly like a released one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
)

from fgvlm.io import atomic_path, write_json
from fgvlm.models.llm import publish_modes
from fgvlm.models.templates import (
    IGNORE_INDEX,
    IM_END,
    IMAGE_PLACEHOLDER,
    QWEN2_VL_CHAT_TEMPLATE,
    TemplateMismatchError,
    conversation_turns,
)

log = logging.getLogger(__name__)

HUB_META_FILE = "fgvlm_vlm.json"
SUPPORTED_ARCHS = ("qwen2_vl",)
_RESERVED_META = ("kind", "arch")
# processor outputs that are not one entry per token (never cut by max_length)
_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def conversation_messages(
    conversations: list[dict[str, Any]], *, sample_id: str, has_image: bool
) -> list[dict[str, Any]]:
    """A LLaVA conversation -> chat-template messages (user/assistant, content parts).

    The human turn holding ``"<image>"`` becomes ``[{"type": "image"}, {"type": "text"}]`` with
    the placeholder removed and the text stripped (LLaVA moves the image to the front too).
    Raises ``TemplateMismatchError`` naming ``sample_id`` when roles do not alternate
    human/gpt, or the sample has an image but not exactly one placeholder, or a placeholder
    but no image.
    """
    turns = conversation_turns(conversations, sample_id=sample_id)
    count = sum(human.count(IMAGE_PLACEHOLDER) for human, _ in turns)
    if has_image and count != 1:
        raise TemplateMismatchError(
            f"sample {sample_id!r}: has an image but {count} {IMAGE_PLACEHOLDER!r} placeholders "
            f"(needs exactly one)"
        )
    if not has_image and count:
        raise TemplateMismatchError(
            f"sample {sample_id!r}: {IMAGE_PLACEHOLDER!r} in the conversation but no image"
        )
    messages: list[dict[str, Any]] = []
    for human, answer in turns:
        content: list[dict[str, Any]] = []
        if IMAGE_PLACEHOLDER in human:
            content.append({"type": "image"})
            human = human.replace(IMAGE_PLACEHOLDER, "").strip()
        content.append({"type": "text", "text": human})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def render_with_spans(
    processor: Any, messages: list[dict[str, Any]], *, sample_id: str
) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's text of ``messages`` and the character spans [start, end) of each
    assistant answer plus its ``<|im_end|>``.

    A span starts where the generation prompt of its turn ends (the prefix an evaluation
    prompt has); a template whose rendering is not prefix-stable there, or that does not
    write the answer verbatim followed by ``<|im_end|>``, raises ``TemplateMismatchError``.
    """
    text = processor.apply_chat_template(messages, tokenize=False)
    spans = []
    for k in range(0, len(messages), 2):
        prompt = processor.apply_chat_template(
            messages[: k + 1], tokenize=False, add_generation_prompt=True
        )
        answer = messages[k + 1]["content"][0]["text"]
        expected = answer + IM_END
        if not (text.startswith(prompt) and text.startswith(expected, len(prompt))):
            raise TemplateMismatchError(
                f"sample {sample_id!r}: the chat template does not write answer {k // 2} as "
                f"'<answer>{IM_END}' right after its generation prompt"
            )
        spans.append((len(prompt), len(prompt) + len(expected)))
    return text, spans


def _shift_spans(
    spans: list[tuple[int, int]], text: str, token: str, copies: int
) -> list[tuple[int, int]]:
    """Spans in ``text`` -> spans in the text with its one ``token`` repeated ``copies`` times
    (the processor's image-token expansion)."""
    at = text.find(token)
    if at < 0 or copies <= 1:
        return spans
    shift = (copies - 1) * len(token)
    return [(s + shift, e + shift) if s > at else (s, e) for s, e in spans]


class QwenVLCollator:
    """Training batches for a Qwen2-VL model from (LLaVA record, PIL image | None) pairs.

    Holds only the processor (picklable: data-loader workers get a copy). ``max_length`` cuts
    right-padded rows to that many tokens (image tokens count); cutting into the image, or
    every label of a sample, raises ValueError naming the sample. ``count_truncated``: the batch
    also holds ``truncated``, how many samples were cut (for the train log; not a model input).
    """

    def __init__(
        self, processor: Any, *, max_length: int | None = None, count_truncated: bool = False
    ) -> None:
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.count_truncated = count_truncated
        self.processor = processor
        self.max_length = max_length
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        tokenizer = processor.tokenizer
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
        # literal special tokens in data would be parsed as control tokens (e.g. extra images)
        special = {str(t) for t in tokenizer.all_special_tokens} | {IM_END}
        self.reserved = sorted(special - {IMAGE_PLACEHOLDER})

    def _check_text(self, record: dict[str, Any], sample_id: str) -> None:
        for turn in record.get("conversations") or []:
            value = turn.get("value") if isinstance(turn, dict) else None
            found = [t for t in self.reserved if isinstance(value, str) and t in value]
            if found:
                raise TemplateMismatchError(
                    f"sample {sample_id!r}: conversation text holds special tokens {found}"
                )

    def __call__(
        self, samples: list[tuple[dict[str, Any], Image.Image | None]]
    ) -> dict[str, torch.Tensor]:
        """-> ``input_ids``, ``attention_mask``, ``labels``, ``mm_token_type_ids`` [B, T] (right
        padding), plus ``pixel_values`` and ``image_grid_thw`` when a sample has an image."""
        if not samples:
            raise ValueError("collate: empty batch")
        texts, spans, names, images = [], [], [], []
        for record, image in samples:
            name = str(record.get("id", "<no id>"))
            self._check_text(record, name)
            messages = conversation_messages(
                record.get("conversations"), sample_id=name, has_image=image is not None
            )
            text, row_spans = render_with_spans(self.processor, messages, sample_id=name)
            texts.append(text)
            spans.append(row_spans)
            names.append(name)
            if image is not None:
                images.append(image if image.mode == "RGB" else image.convert("RGB"))
        encoded = self.processor(
            text=texts,
            images=images or None,
            padding=True,
            padding_side="right",
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        if "offset_mapping" not in encoded:
            raise ValueError(
                "collate: the tokenizer gives no offset mapping (not a fast tokenizer)"
            )
        offsets = encoded.pop("offset_mapping")
        batch = dict(encoded)
        batch["labels"] = self._labels(batch, offsets, texts, spans, names)
        truncated = 0
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            truncated = int((batch["attention_mask"].sum(1) > self.max_length).sum())
            batch = self._truncate(batch, names)
        if self.count_truncated:
            batch["truncated"] = truncated
        return batch

    def _labels(
        self,
        batch: dict[str, torch.Tensor],
        offsets: torch.Tensor,
        texts: list[str],
        spans: list[list[tuple[int, int]]],
        names: list[str],
    ) -> torch.Tensor:
        """Token ids inside the answer spans, ``IGNORE_INDEX`` elsewhere (checked per answer:
        at least one token, ending with ``<|im_end|>``)."""
        input_ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        starts = offsets[..., 0]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (text, row_spans, name) in enumerate(zip(texts, spans, names, strict=True)):
            copies = int((input_ids[row] == self.image_token_id).sum())
            for s, e in _shift_spans(row_spans, text, self.image_token, copies):
                inside = (starts[row] >= s) & (starts[row] < e) & mask[row]
                positions = torch.nonzero(inside).flatten()
                if len(positions) == 0 or int(input_ids[row, positions[-1]]) != self.im_end_id:
                    raise TemplateMismatchError(
                        f"sample {name!r}: an answer's tokens do not end with {IM_END} "
                        f"(tokenizer offsets disagree with the rendered text)"
                    )
                labels[row, positions] = input_ids[row, positions]
        labels[input_ids == self.image_token_id] = IGNORE_INDEX
        return labels

    def _truncate(self, batch: dict[str, torch.Tensor], names: list[str]) -> dict[str, Any]:
        """Cut every token-aligned tensor to ``max_length`` columns (rows are right-padded)."""
        limit = self.max_length
        assert limit is not None
        rows, width = batch["input_ids"].shape
        for row, name in enumerate(names):
            if bool((batch["input_ids"][row, limit:] == self.image_token_id).any()):
                raise ValueError(
                    f"sample {name!r}: truncating to max_length={limit} would cut its image tokens"
                )
            if bool((batch["labels"][row, :limit] == IGNORE_INDEX).all()):
                raise ValueError(
                    f"sample {name!r}: truncating to max_length={limit} leaves no answer token"
                )
        out: dict[str, Any] = {}
        for key, value in batch.items():
            aligned = torch.is_tensor(value) and tuple(value.shape[:2]) == (rows, width)
            out[key] = value[:, :limit] if aligned and key not in _VISION_KEYS else value
        return out


class TrainableHubVLM(nn.Module):
    """A transformers Qwen2-VL with the trainer interface of ``LlavaVLM``.

    ``model``: the ``Qwen2VLForConditionalGeneration``; ``processor``: its processor (with a
    chat template); ``meta``: stored in ``fgvlm_vlm.json`` on save (e.g. the base folder).
    """

    def __init__(
        self, model: PreTrainedModel, processor: Any, *, meta: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        arch = model.config.model_type
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"model type {arch!r} is not supported ({list(SUPPORTED_ARCHS)})")
        if processor.chat_template is None:
            # a base snapshot without a chat template: Qwen's chatml with vision tokens
            log.warning("processor has no chat template; using the Qwen2-VL one")
            processor.chat_template = QWEN2_VL_CHAT_TEMPLATE
        self.model = model
        self.processor = processor
        self.arch = arch
        self.meta = dict(meta or {})
        self._check_groups()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"vision": visual blocks + patch embedding, "connector": the visual merger (Qwen2-VL's
        projector), "llm": language model + LM head}; each parameter once (tied ones too)."""
        visual = self.model.model.visual
        connector = list(visual.merger.parameters())
        in_connector = {id(p) for p in connector}
        vision = [p for p in visual.parameters() if id(p) not in in_connector]
        llm, seen = [], set()
        for module in (self.model.model.language_model, self.model.lm_head):
            for param in module.parameters():
                if id(param) not in seen:  # a tied LM head shares the embedding matrix
                    seen.add(id(param))
                    llm.append(param)
        return {"vision": vision, "connector": connector, "llm": llm}

    def _check_groups(self) -> None:
        """Every parameter in exactly one group (a new submodule would otherwise never train)."""
        counts: dict[int, int] = {}
        for params in self.parameter_groups().values():
            for param in params:
                counts[id(param)] = counts.get(id(param), 0) + 1
        for name, param in self.model.named_parameters():
            if counts.get(id(param)) != 1:
                raise ValueError(
                    f"parameter {name} is in {counts.get(id(param), 0)} parameter groups, not 1"
                )

    def collate_fn(
        self, *, max_length: int | None = None, count_truncated: bool = False
    ) -> QwenVLCollator:
        """The trainer's batch builder for this model (picklable: no weights inside)."""
        return QwenVLCollator(
            self.processor, max_length=max_length, count_truncated=count_truncated
        )

    def forward(self, **batch: Any):
        """``model(**batch)`` -> transformers output (``loss`` when ``labels`` are given).

        No KV cache: training never continues a sequence.
        """
        batch.setdefault("use_cache", False)
        return self.model(**batch)

    def save(
        self,
        out_dir: Path,
        extra_meta: dict[str, Any] | None = None,
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write a transformers model folder atomically: safetensors weights, configs, the
        processor with its chat template, and ``fgvlm_vlm.json`` {"kind": "hub", "arch", ...}.

        ``extra_meta`` may not set "kind" or "arch". ``state_dict`` (keys as this module's
        ``state_dict()``, i.e. "model.…") replaces the model's own tensors, e.g. the full
        weights gathered from FSDP / ZeRO-3 shards.
        """
        extra = dict(extra_meta or {})
        clash = sorted(set(extra) & set(_RESERVED_META))
        if clash:
            raise ValueError(f"save: extra_meta may not set {clash}")
        record = {**self.meta, **extra, "kind": "hub", "arch": self.arch}
        model_state = None
        if state_dict is not None:
            prefix = "model."
            model_state = {
                k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)
            }
            if not model_state:
                raise ValueError("save: state_dict holds no 'model.' tensors")
        with atomic_path(out_dir, is_dir=True) as tmp:
            self.model.save_pretrained(tmp, state_dict=model_state)
            self.processor.save_pretrained(tmp)
            write_json(record, tmp / HUB_META_FILE)
            publish_modes(tmp)


def load_trainable_hub_vlm(
    model_dir: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> TrainableHubVLM:
    """Load a Qwen2-VL model folder (safetensors weights, processor files) for training.

    ``dtype``: the weights' dtype in training (float32 master weights; mixed precision comes
    from the accelerator). Raises FileNotFoundError without ``config.json``, ValueError for
    another architecture.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a transformers model folder)")
    arch = AutoConfig.from_pretrained(model_dir).model_type
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"{model_dir}: model type {arch!r} is not a supported trainable hub VLM "
            f"({list(SUPPORTED_ARCHS)})"
        )
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, use_safetensors=True, dtype=dtype
    )
    processor = AutoProcessor.from_pretrained(model_dir)
    vlm = TrainableHubVLM(model, processor, meta={"base": str(model_dir)})
    return vlm.to(device)
