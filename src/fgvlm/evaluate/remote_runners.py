"""Released VLMs that ship their own modelling code (``trust_remote_code``), as ``MCQModel``s.

InternVL2, Phi-3/3.5-vision, Molmo and CogVLM-chat do not load through
``AutoModelForImageTextToText``: each exposes its own API, called here the way VLMEvalKit
(github.com/open-compass/VLMEvalKit, ``vlmeval/vlm/``) calls it, which is how the paper
evaluates them (§3.3, Appendix B). One adapter per family:

- ``InternVL2VLM`` (``internvl/internvl_chat.py``): ``AutoModel`` + ``AutoTokenizer``; images
  cut into 448 px tiles (at most 6, plus a thumbnail) with ImageNet normalisation; the prompt
  in the model's own conversation template with ``<img><IMG_CONTEXT>…</img>`` per image;
  ``model.generate(pixel_values=, input_ids=, attention_mask=)``. Batched with left padding,
  as the model's ``batch_chat`` does.
- ``Phi3VisionVLM`` (``phi3_vision.py``): ``AutoModelForCausalLM`` + ``AutoProcessor``; the
  chat template around ``<|image_k|>\\n`` per image + prompt; ``processor(prompt, images)``;
  ``model.generate(**inputs)``. The processor takes one prompt at a time: per-item loop.
- ``MolmoVLM`` (``molmo.py``): ``AutoModelForCausalLM`` + ``AutoProcessor``;
  ``processor.process(images=, text=)``; ``model.generate_from_batch`` stopping at
  ``<|endoftext|>``. Per-item loop, as VLMEvalKit runs it.
- ``CogVLMVLM`` (``cogvlm.py``): ``AutoModelForCausalLM`` + Vicuna's Llama tokenizer;
  ``model.build_conversation_input_ids(tokenizer, query=, history=[], images=)`` (chat mode);
  ``model.generate(input_ids=, token_type_ids=, attention_mask=, images=)``. Per-item loop.

Per-item loops make answers independent of the batch size by construction; InternVL2's
batched path relies on left padding as ``HubVLM`` does. ``continuation_logprobs`` runs, per
item, one forward pass over the prompt with each continuation appended (right-padded rows);
when every continuation is a single token (option letters) the prompt alone is enough. The
prompt is not cached and shared as in ``HubVLM``: each family's own forward takes its image
inputs (InternVL2's ``image_flags``, CogVLM's ``token_type_ids``, Molmo's ``image_input_idx``)
in its own way, and a prompt repeated per option is what its code is known to support.

``load_remote_vlm`` loads a folder (``fgvlm.models.remote.load_remote_model``, which refuses
unless the config opts the model in to running its code) into its family's adapter.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import normalize, resize, to_tensor
from transformers import GenerationConfig

from fgvlm.evaluate.hub_runner import continuation_token_ids, rgb
from fgvlm.evaluate.prompts import ONE_IMAGE_FAMILIES
from fgvlm.mcq import MCQItem
from fgvlm.models.remote import load_remote_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERNVL_MAX_TILES = 6  # VLMEvalKit's InternVLChat.set_max_num default (12 for MMMU: config)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
MOLMO_STOP = "<|endoftext|>"
COGVLM_LANGUAGE_TYPE = 0  # token_type_ids value of text tokens (VISION_TOKEN_TYPE is 1)


class RemoteVLM:
    """Shared half of the adapters: batch-of-one prompt inputs and continuation scoring.

    A family implements ``prompt_inputs`` (model inputs of one item, batch dimension 1),
    ``_generate_one`` (or ``generate`` for a batched path) and ``_forward_rows`` (logits of
    the prompt with several continuations appended, one row each).
    """

    family = ""
    answer_lead = ""  # text the model writes before its answer (Molmo: a space)
    image_settings: tuple[str, ...] = ()  # keys of the config's `image` this adapter takes

    def __init__(self, model: Any, tokenizer: Any, *, name: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # Llama-style tokenizers lack one
        self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def prompt_inputs(self, item: MCQItem) -> dict[str, Any]:
        raise NotImplementedError

    def images(self, item: MCQItem) -> list[Image.Image] | None:
        """The item's images in RGB (None: a text-only question); an error naming the model
        and question when it has several and the model takes one."""
        if item.extra_images and self.family in ONE_IMAGE_FAMILIES:
            raise ValueError(
                f"{self.name}: question {item.qid} has {len(item.images)} images; "
                f"{self.family} takes one (set its image.all_images to false)"
            )
        return [rgb(image) for image in item.images] or None

    def _generate_one(self, item: MCQItem, max_new_tokens: int) -> str:
        raise NotImplementedError

    def _forward_rows(self, inputs: dict[str, Any], rows: list[list[int]]) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def generate(self, items: list[MCQItem], *, max_new_tokens: int) -> list[str]:
        """Greedy answers (new text only, stripped), one item at a time."""
        return [self._generate_one(item, max_new_tokens) for item in items]

    def continuation_ids(self, item: MCQItem, text: str) -> list[int]:
        """Token ids of ``text`` as the model would write it after the prompt."""
        return continuation_token_ids(self.tokenizer, self.answer_lead + text, item.qid)

    @torch.inference_mode()
    def continuation_logprobs(
        self, items: list[MCQItem], continuations: list[list[str]]
    ) -> list[list[float]]:
        """Per item, the summed log-probability of each continuation right after the prompt
        (one forward pass per item: the prompt alone when every continuation is one token)."""
        if len(items) != len(continuations):
            raise ValueError(f"{len(items)} items but {len(continuations)} continuation lists")
        results = []
        for item, texts in zip(items, continuations, strict=True):
            ids = [self.continuation_ids(item, text) for text in texts]
            inputs = self.prompt_inputs(item)
            prompt_len = inputs["input_ids"].shape[1]
            if all(len(c) == 1 for c in ids):
                logp = torch.log_softmax(self._forward_rows(inputs, [[]])[0, -1].float(), -1)
                results.append([float(logp[c[0]]) for c in ids])
                continue
            logits = self._forward_rows(inputs, ids)
            scores = []
            for row, cont in enumerate(ids):
                # the token at position p is predicted by the logits at p - 1
                picked = logits[row, prompt_len - 1 : prompt_len - 1 + len(cont)].float()
                logp = torch.log_softmax(picked, dim=-1)
                scores.append(float(logp[torch.arange(len(cont)), cont].sum()))
            results.append(scores)
        return results

    def _right_padded(
        self, prompt_ids: torch.Tensor, rows: list[list[int]], pad_id: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [len(rows), T + longest row]: the one-row prompt
        ``prompt_ids`` [1, T] followed by each row's tokens, padded on the right (so every
        real token keeps the position it has in a batch of one)."""
        width = prompt_ids.shape[1] + max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=prompt_ids.dtype)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, cont in enumerate(rows):
            full = torch.cat([prompt_ids[0].cpu(), torch.tensor(cont, dtype=prompt_ids.dtype)])
            ids[r, : len(full)] = full
            mask[r, : len(full)] = 1
        return ids.to(self.device), mask.to(self.device)


def _repeat_rows(value: torch.Tensor, rows: int) -> torch.Tensor:
    """``value`` [n, ...] (one prompt's n images, or its batch of one) repeated to
    [rows * n, ...], prompt after prompt."""
    return value.repeat(rows, *([1] * (value.dim() - 1)))


# --- InternVL2 ---------------------------------------------------------------------------------


def internvl_grid(width: int, height: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of InternVL's dynamic tiling: the grid of at most ``max_tiles`` tiles
    whose aspect ratio is closest to the image's; on a tie the larger grid wins when the image
    has more than half its pixels."""
    grids = sorted(
        {
            (c, r)
            for c in range(1, max_tiles + 1)
            for r in range(1, max_tiles + 1)
            if c * r <= max_tiles
        },
        key=lambda g: g[0] * g[1],
    )
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def internvl_tiles(image: Image.Image, tile: int, max_tiles: int) -> list[Image.Image]:
    """The image resized to its grid and cut into ``tile`` px squares, row by row, plus a
    ``tile`` px thumbnail of the whole image when there is more than one tile."""
    image = rgb(image)
    cols, rows = internvl_grid(image.width, image.height, tile, max_tiles)
    resized = image.resize((cols * tile, rows * tile))
    tiles = [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]
    if len(tiles) > 1:
        tiles.append(image.resize((tile, tile)))
    return tiles


def internvl_pixels(image: Image.Image, tile: int, max_tiles: int) -> torch.Tensor:
    """[tiles, 3, tile, tile] float32: each tile bicubic-resized and ImageNet-normalised."""
    tensors = []
    for part in internvl_tiles(image, tile, max_tiles):
        resized = resize(part, [tile, tile], interpolation=InterpolationMode.BICUBIC)
        tensors.append(normalize(to_tensor(resized), IMAGENET_MEAN, IMAGENET_STD))
    return torch.stack(tensors)


def _config_value(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


class InternVL2VLM(RemoteVLM):
    """InternVL2 (``InternVLChatModel``): batched greedy generation with left padding."""

    family = "internvl2"
    image_settings = ("tiles", "upscale")

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        tiles: int = INTERNVL_MAX_TILES,
        upscale: int = 1,
    ) -> None:
        super().__init__(model, tokenizer, name=name)
        self.tokenizer.padding_side = "left"
        self.max_tiles = tiles
        self.upscale = upscale  # VLMEvalKit enlarges MMMU images 2x (bilinear) before tiling
        config = model.config
        self.tile = int(
            _config_value(config, "force_image_size")
            or _config_value(_config_value(config, "vision_config"), "image_size")
        )
        self.context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        # what model.chat sets before generating: the id the image features replace
        model.img_context_token_id = self.context_id
        self.sep = model.conv_template.sep

    def query(self, item: MCQItem, tiles: list[int]) -> str:
        """The prompt text in the model's conversation template (its system message included),
        each "<image>" replaced by its image's context tokens (``tiles``: per image).

        One image: "<image>\\n" before the question. Several (VLMEvalKit's
        ``InternVLChat.generate_v2``): "Image-k: <image>" lines, then the question followed by
        "<Image-1><Image-2>…" (its message puts the text before the images)."""
        conversation = copy.deepcopy(self.model.conv_template)
        conversation.system_message = self.model.system_message
        n = len(item.images)
        if n <= 1:
            question = item.prompt if n == 0 else f"<image>\n{item.prompt}"
        else:
            header = "\n".join(f"Image-{k}: <image>" for k in range(1, n + 1))
            marks = "".join(f"<Image-{k}>" for k in range(1, n + 1))
            question = f"{header}\n{item.prompt}{marks}"
        conversation.append_message(conversation.roles[0], question)
        conversation.append_message(conversation.roles[1], None)
        text = conversation.get_prompt()
        for count in tiles:
            context = IMG_CONTEXT * (self.model.num_image_token * count)
            text = text.replace("<image>", f"{IMG_START}{context}{IMG_END}", 1)
        return text

    def _pixels(self, item: MCQItem) -> list[torch.Tensor]:
        """Each image's tiles; VLMEvalKit upscales only the first of several."""
        pixels = []
        for index, image in enumerate(self.images(item) or []):
            if self.upscale != 1 and index == 0:
                size = (image.width * self.upscale, image.height * self.upscale)
                image = image.resize(size, Image.Resampling.BILINEAR)
            pixels.append(internvl_pixels(image, self.tile, self.max_tiles))
        return pixels

    def _batch(self, items: list[MCQItem]) -> dict[str, Any]:
        pixels = [self._pixels(item) for item in items]
        queries = [
            self.query(item, [p.shape[0] for p in per_image])
            for item, per_image in zip(items, pixels, strict=True)
        ]
        encoded = self.tokenizer(queries, padding=True, return_tensors="pt")
        present = [p for per_image in pixels for p in per_image]
        return {
            "input_ids": encoded["input_ids"].to(self.device),
            "attention_mask": encoded["attention_mask"].to(self.device),
            "pixel_values": (torch.cat(present).to(self.device, self.dtype) if present else None),
        }

    def prompt_inputs(self, item: MCQItem) -> dict[str, Any]:
        return self._batch([item])

    @torch.inference_mode()
    def generate(self, items: list[MCQItem], *, max_new_tokens: int) -> list[str]:
        """Greedy answers of the whole batch in one ``model.generate`` call (left padding),
        cut at the template's separator as ``model.chat`` does."""
        if not items:
            return []
        inputs = self._batch(items)
        output = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.tokenizer.convert_tokens_to_ids(self.sep),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        # generation from input embeddings returns the new tokens only
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [text.split(self.sep)[0].strip() for text in texts]

    def _forward_rows(self, inputs: dict[str, Any], rows: list[list[int]]) -> torch.Tensor:
        ids, mask = self._right_padded(inputs["input_ids"], rows, self.tokenizer.pad_token_id)
        pixels = inputs["pixel_values"]
        if pixels is None:  # the model's forward always encodes images; text goes to the LLM
            return self.model.language_model(input_ids=ids, attention_mask=mask).logits
        pixels = pixels.repeat(len(rows), 1, 1, 1)
        flags = torch.ones((pixels.shape[0], 1), dtype=torch.long, device=self.device)
        return self.model(
            pixel_values=pixels,
            input_ids=ids,
            attention_mask=mask,
            image_flags=flags,
            return_dict=True,
        ).logits


# --- Phi-3 / Phi-3.5-vision --------------------------------------------------------------------


class Phi3VisionVLM(RemoteVLM):
    """Phi-3-vision and Phi-3.5-vision (``Phi3VForCausalLM`` + ``Phi3VProcessor``): per-item
    generation (the processor encodes one prompt with its images at a time)."""

    family = "phi3_vision"

    def __init__(self, model: Any, processor: Any, *, name: str) -> None:
        super().__init__(model, processor.tokenizer, name=name)
        self.processor = processor

    def chat_prompt(self, item: MCQItem) -> str:
        """The question after one "<|image_k|>\\n" per image, in the tokenizer's chat template."""
        marks = "".join(f"<|image_{k}|>\n" for k in range(1, len(item.images) + 1))
        content = marks + item.prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def prompt_inputs(self, item: MCQItem) -> dict[str, Any]:
        encoded = self.processor(self.chat_prompt(item), self.images(item), return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in encoded.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def _generate_one(self, item: MCQItem, max_new_tokens: int) -> str:
        inputs = self.prompt_inputs(item)
        output = self.model.generate(
            **inputs,
            eos_token_id=self.tokenizer.eos_token_id,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        text = self.processor.batch_decode(
            new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )[0]
        return text.strip()

    def _forward_rows(self, inputs: dict[str, Any], rows: list[list[int]]) -> torch.Tensor:
        ids, mask = self._right_padded(inputs["input_ids"], rows, self.tokenizer.pad_token_id)
        extra = {
            key: _repeat_rows(inputs[key], len(rows))
            for key in ("pixel_values", "image_sizes")
            if key in inputs
        }
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits


# --- Molmo -------------------------------------------------------------------------------------


class MolmoVLM(RemoteVLM):
    """Molmo (``MolmoForCausalLM`` + ``MolmoProcessor``): per-item ``generate_from_batch``."""

    family = "molmo"
    answer_lead = " "  # the prompt ends with " Assistant:"; the answer starts with a space
    image_settings = ("max_crops",)

    def __init__(
        self, model: Any, processor: Any, *, name: str, max_crops: int | None = None
    ) -> None:
        super().__init__(model, processor.tokenizer, name=name)
        self.processor = processor
        # VLMEvalKit (from 2024-12-29) passes images_kwargs={"max_crops": 36}
        self.images_kwargs = (
            {} if max_crops is None else {"images_kwargs": {"max_crops": max_crops}}
        )

    def prompt_inputs(self, item: MCQItem) -> dict[str, Any]:
        images = self.images(item)
        encoded = self.processor.process(images=images, text=item.prompt, **self.images_kwargs)
        inputs = {key: value.to(self.device).unsqueeze(0) for key, value in encoded.items()}
        if "images" in inputs:
            inputs["images"] = inputs["images"].to(self.dtype)
        return inputs

    def _generate_one(self, item: MCQItem, max_new_tokens: int) -> str:
        inputs = self.prompt_inputs(item)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, stop_strings=MOLMO_STOP, do_sample=False
        )
        output = self.model.generate_from_batch(inputs, config, tokenizer=self.tokenizer)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    def _forward_rows(self, inputs: dict[str, Any], rows: list[list[int]]) -> torch.Tensor:
        # Molmo pads with -1 and derives its attention mask and positions from that
        ids, _ = self._right_padded(inputs["input_ids"], rows, -1)
        extra = {
            key: _repeat_rows(inputs[key], len(rows))
            for key in ("images", "image_masks", "image_input_idx")
            if key in inputs
        }
        return self.model(input_ids=ids, **extra).logits


# --- CogVLM ------------------------------------------------------------------------------------


class CogVLMVLM(RemoteVLM):
    """CogVLM-chat (``CogVLMForCausalLM``, chat mode): per-item generation, as VLMEvalKit."""

    family = "cogvlm"

    def prompt_inputs(self, item: MCQItem) -> dict[str, Any]:
        images = self.images(item)
        built = self.model.build_conversation_input_ids(
            self.tokenizer, query=item.prompt, history=[], images=images
        )
        inputs = {
            key: built[key].unsqueeze(0).to(self.device)
            for key in ("input_ids", "token_type_ids", "attention_mask")
        }
        inputs["images"] = (
            [[built["images"][0].to(self.device, self.dtype)]] if built.get("images") else None
        )
        return inputs

    def _generate_one(self, item: MCQItem, max_new_tokens: int) -> str:
        inputs = self.prompt_inputs(item)
        output = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        eos = self.tokenizer.eos_token
        return (text.split(eos)[0] if eos else text).strip()  # VLMEvalKit cuts at "</s>"

    def _forward_rows(self, inputs: dict[str, Any], rows: list[list[int]]) -> torch.Tensor:
        ids, mask = self._right_padded(inputs["input_ids"], rows, self.tokenizer.pad_token_id)
        types = torch.full_like(ids, COGVLM_LANGUAGE_TYPE)
        types[:, : inputs["token_type_ids"].shape[1]] = inputs["token_type_ids"]
        images = None if inputs["images"] is None else inputs["images"] * len(rows)
        return self.model(
            input_ids=ids,
            token_type_ids=types,
            attention_mask=mask,
            images=images,
            use_cache=False,
            return_dict=True,
        ).logits


# --- loading -----------------------------------------------------------------------------------

ADAPTERS: dict[str, type[RemoteVLM]] = {
    adapter.family: adapter for adapter in (InternVL2VLM, Phi3VisionVLM, MolmoVLM, CogVLMVLM)
}


def load_remote_vlm(
    local_dir: str | os.PathLike,
    family: str | None,
    *,
    trust_remote_code: bool = False,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    name: str | None = None,
    processor_kwargs: dict[str, Any] | None = None,
    image: dict[str, Any] | None = None,
) -> RemoteVLM:
    """Load a model folder whose code ships with it into the adapter of its ``family``.

    The arguments but ``name`` and ``image`` are ``fgvlm.models.remote.load_remote_model``'s;
    ``name`` is the results name (default: the folder name); ``image``: the config's image
    settings, of which the adapter takes its ``image_settings`` (InternVL2 ``tiles``, Molmo
    ``max_crops``). Out: an ``MCQModel``.
    """
    model, tokenizer_or_processor = load_remote_model(
        local_dir,
        family,
        trust_remote_code=trust_remote_code,
        device=device,
        dtype=dtype,
        processor_kwargs=processor_kwargs,
    )
    adapter = ADAPTERS[family]
    settings = {k: v for k, v in (image or {}).items() if k in adapter.image_settings}
    return adapter(model, tokenizer_or_processor, name=name or Path(local_dir).name, **settings)
