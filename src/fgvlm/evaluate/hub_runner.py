"""Released VLMs through transformers, as ``fgvlm.mcq.MCQModel``s.

``HubVLM`` wraps a model and processor of ``fgvlm.models.hub.load_hub_model``: prompts go
through the processor's own chat template, generation is batched and greedy with left padding,
and continuation log-probabilities come from the prompt's forward pass (one token each) or from
the prompt's KV cache shared by the item's continuations.
``load_hub_vlm`` loads a local model folder into one.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel

from fgvlm.mcq import MCQItem
from fgvlm.models.clip import PadToSquare, pad_colour
from fgvlm.models.hub import load_hub_model


class HubVLM:
    """A transformers image-text-to-text model and its processor, as an ``MCQModel``.

    ``model``: in eval mode, on its device; ``processor``: its tokenizer pads on the left.
    ``answer_prefix``: text that starts the assistant turn before the answer (VLMEvalKit's
    "Answer:" for Idefics2, ``fgvlm.evaluate.prompts.ASSISTANT_PREFIX``); empty for most models.
    ``system_prompt``: a system turn before the question (None: the template's own default).
    ``pad_to_square``: pad images to a square in the image processor's mean colour before the
    processor sees them (LLaVA-1.5's ``expand2square``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: Any,
        *,
        name: str,
        answer_prefix: str = "",
        system_prompt: str | None = None,
        pad_to_square: bool = False,
    ) -> None:
        self.model = model.eval()
        self.answer_prefix = answer_prefix
        self.system_prompt = system_prompt
        self.pad = (
            PadToSquare(pad_colour(processor.image_processor.image_mean)) if pad_to_square else None
        )
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues every row at the same column
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # Llama-style tokenizers lack one
        self.name = name
        forward_args = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in forward_args
        # transformers >= 5.25 names the KV cache argument ``cache`` (``past_key_values`` before)
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
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
        """The item as one user turn (its images first, in order, then the text: VLMEvalKit's
        message order) in the model's chat template, followed by the assistant header (and
        ``answer_prefix``) the answer comes after."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in item.images]
        content.append({"type": "text", "text": item.prompt})
        messages = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            system = [{"type": "text", "text": self.system_prompt}]
            messages.insert(0, {"role": "system", "content": system})
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        if not self.answer_prefix:
            return prompt
        # "Assistant:" + "Answer:" -> "Assistant: Answer:"; "assistant\n" + "Answer:" as is
        joined = prompt[-1:].isspace() or self.answer_prefix[:1].isspace()
        return prompt + ("" if joined else " ") + self.answer_prefix

    def image(self, image: Image.Image) -> Image.Image:
        """The image as the processor receives it: RGB, padded to a square when asked."""
        return self.pad(image) if self.pad is not None else rgb(image)

    def encode(self, items: list[MCQItem]) -> Any:
        """Processor inputs of ``items`` (left-padded), on the model's device and dtype."""
        if not items:
            raise ValueError("cannot encode an empty batch")
        texts = [self.chat_prompt(item) for item in items]
        # one flat list in prompt order: processors split it by each prompt's image tokens
        images = [self.image(image) for item in items for image in item.images]
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

    def prompt_length(self, item: MCQItem) -> int:
        """Tokens of the item's encoded prompt, image tokens included (Qwen2-VL's dynamic
        resolution, LLaVA-NeXT's anyres tiles): the key ``fgvlm.evaluate.scoring`` sorts a
        part's batches by. From the processor's token count where it has one, else by encoding."""
        text = self.tokenizer(self.chat_prompt(item), add_special_tokens=False)["input_ids"]
        if item.image is None:
            return len(text)
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        try:
            sizes = [(image.height, image.width) for image in item.images]
            tokens = count(image_sizes=sizes).num_image_tokens
            return len(text) - len(sizes) + sum(int(n) for n in tokens)
        except Exception:  # a processor without (a working) token count: measure it
            return int(self.encode([item])["input_ids"].shape[1])

    def continuation_ids(self, item: MCQItem, text: str) -> list[int]:
        """Token ids of ``text`` as the model would write it after the prompt."""
        return continuation_token_ids(self.tokenizer, text, item.qid)

    @torch.inference_mode()
    def continuation_logprobs(
        self, items: list[MCQItem], continuations: list[list[str]]
    ) -> list[list[float]]:
        """Per item, the summed log-probability of each continuation right after the prompt.

        Items whose continuations are all single tokens (option letters) take one batched
        forward pass of their prompts. Every other item runs its prompt (image included) once,
        unpadded, and its continuations together after the prompt's repeated KV cache. Which
        path an item takes depends on the item alone, never on its batch.
        """
        if len(items) != len(continuations):
            raise ValueError(f"{len(items)} items but {len(continuations)} continuation lists")
        ids = [
            [self.continuation_ids(item, text) for text in conts]
            for item, conts in zip(items, continuations, strict=True)
        ]
        results: list[list[float]] = [[] for _ in items]
        single = [i for i, rows in enumerate(ids) if all(len(r) == 1 for r in rows)]
        if single:
            encoded = self.encode([items[i] for i in single])
            logps = self._answer_logprobs(encoded, [[] for _ in single])
            for logp, i in zip(logps, single, strict=True):
                results[i] = [float(logp[0, r[0]]) for r in ids[i]]
        for i in sorted(set(range(len(items))) - set(single)):
            results[i] = self._shared_prefix_scores(items[i], ids[i])
        return results

    def _shared_prefix_scores(self, item: MCQItem, continuations: list[list[int]]) -> list[float]:
        """Summed log-probs of ``continuations`` after the item's prompt: the prompt in one
        cached pass, then every continuation but its last token in one pass of
        ``len(continuations)`` rows after the cache, right-padded (padding after a row's real
        tokens cannot change them: attention is causal)."""
        encoded = self.encode([item])
        inner = getattr(self.model, "model", None)
        if hasattr(inner, "rope_deltas"):
            inner.rope_deltas = None  # Qwen2-VL: M-RoPE offsets of the previous prompt
        kwargs: dict[str, Any] = {"use_cache": True}
        if self._keeps_logits:
            kwargs["logits_to_keep"] = 1
        out = self.model(**encoded, **kwargs)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()
        scores = [float(first[cont[0]]) for cont in continuations]
        longest = max(len(cont) for cont in continuations)
        if longest == 1:
            return scores
        cache = out.cache if "cache" in out else out.past_key_values  # renamed in 5.25
        cache.batch_repeat_interleave(len(continuations))
        pad = self.tokenizer.pad_token_id
        feed = torch.tensor(
            [cont[:-1] + [pad] * (longest - len(cont)) for cont in continuations],
            device=self.device,
        )
        cached = {self._cache_arg: cache}
        logits = self.model(input_ids=feed, use_cache=True, **cached).logits
        logps = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, cont in enumerate(continuations):
            scores[row] += float(logps[row, torch.arange(len(cont) - 1), cont[1:]].sum())
        return scores

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


def rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB (converted when it is not)."""
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


def load_hub_vlm(
    local_dir: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    name: str | None = None,
    answer_prefix: str = "",
    system_prompt: str | None = None,
    pad_to_square: bool = False,
    processor_kwargs: dict[str, Any] | None = None,
) -> HubVLM:
    """A ``HubVLM`` of a local model folder (``fgvlm.models.hub.load_hub_model``'s arguments).

    ``name`` defaults to the folder name. ``answer_prefix``, ``system_prompt``,
    ``pad_to_square``: see ``HubVLM``; ``processor_kwargs`` (e.g. Qwen2-VL's ``min_pixels``)
    go to the processor.
    """
    model, processor = load_hub_model(
        local_dir,
        trust_remote_code=trust_remote_code,
        device=device,
        dtype=dtype,
        processor_kwargs=processor_kwargs,
    )
    return HubVLM(
        model,
        processor,
        name=name or Path(local_dir).name,
        answer_prefix=answer_prefix,
        system_prompt=system_prompt,
        pad_to_square=pad_to_square,
    )
