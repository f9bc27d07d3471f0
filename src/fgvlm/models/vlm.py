"""LLaVA-style VLMs: a frozen open_clip vision tower, a connector and a causal LM.

The tower gives the penultimate layer's patch tokens (no CLS token), as LLaVA's
``mm_vision_select_layer=-2`` / ``patch`` does; the connector (``mlp2x_gelu``: Linear-GELU-Linear)
maps them to the LM's width; they are spliced into the LM's input embeddings where the
token sequence holds ``IMAGE_TOKEN_ID``, with ignored labels there.

A saved VLM is a directory::

    model.safetensors   connector.* and llm.* tensors (tied LM weights stored once)
    fgvlm_vlm.json      {"encoder": <CLIP weights dir>, "llm_config": {...}, "template",
                         "connector", "image_aspect", "vision": {...}, "llm": <source LLM dir>,
                         ...}
    tokenizer files     the LM's tokenizer

The frozen tower is not copied: ``load_vlm`` reloads it from the CLIP weights dir it names.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import open_clip
import torch
from accelerate import init_empty_weights
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fgvlm.io import atomic_path, read_json, write_json
from fgvlm.models.clip import load_clip, read_clip_config, vlm_image_transform
from fgvlm.models.llm import publish_modes
from fgvlm.models.templates import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    check_template,
    prompt_ids,
    stop_token_ids,
    tokenize_conversation,
)

VLM_CONFIG_FILE = "fgvlm_vlm.json"
VLM_WEIGHTS_FILE = "model.safetensors"
_RESERVED_META = ("encoder", "template", "connector", "image_aspect", "llm_config", "vision")


class VisionTower(nn.Module):
    """A frozen open_clip ViT giving penultimate-layer patch tokens without the CLS token.

    In: a CLIP weights dir (``fgvlm.models.clip`` layout). ``forward(pixel_values [B,3,H,W])``
    -> ``[B, num_patches, hidden_size]``. ``preprocess`` (PIL -> [3,H,W]) is
    ``fgvlm.models.clip.vlm_image_transform`` with the tower's mean/std/interpolation and
    ``aspect`` (pad, crop or squash): the one transform training and evaluation both use.
    """

    def __init__(self, clip_dir: Path, device: str = "cpu", *, aspect: str = "pad") -> None:
        super().__init__()
        clip = load_clip(clip_dir, device)
        visual = clip.model.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise ValueError(
                f"{clip_dir}: vision tower {type(visual).__name__} is not an open_clip "
                f"VisionTransformer (no penultimate-layer patch tokens)"
            )
        n_layers = len(visual.transformer.resblocks)
        if n_layers < 2:
            raise ValueError(f"{clip_dir}: a {n_layers}-layer tower has no penultimate layer")
        self.layer_index = n_layers - 2
        # the last block, final norm and projection are never used: drop them
        visual.prune_intermediate_layers([self.layer_index], prune_norm=True, prune_head=True)
        self.visual = visual
        self.clip_dir = Path(clip_dir)
        self.name = clip.name
        self.image_size = tuple(visual.image_size)
        self.aspect = aspect
        self.preprocess = vlm_image_transform(
            read_clip_config(clip_dir)["preprocess"], self.image_size, aspect
        )
        self.num_patches = visual.grid_size[0] * visual.grid_size[1]
        self.hidden_size = visual.transformer.width
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VisionTower:
        """Always in eval mode (no dropout), whatever the parent module asks: every recipe
        keeps the vision group frozen (``fgvlm.training.recipe.group_schedules``)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            pixel_values,
            indices=[self.layer_index],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
        )
        return out["image_intermediates"][0]


class Connector(nn.Sequential):
    """Vision features -> LM embeddings: ``linear`` or ``mlp{N}x_gelu`` (LLaVA's projectors;
    ``mlp2x_gelu`` = Linear(D_vision, D_llm) - GELU - Linear(D_llm, D_llm))."""

    def __init__(self, kind: str, vision_dim: int, llm_dim: int) -> None:
        if kind == "linear":
            layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
        elif match := re.fullmatch(r"mlp(\d+)x_gelu", kind):
            layers = [nn.Linear(vision_dim, llm_dim)]
            for _ in range(int(match.group(1)) - 1):
                layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        else:
            raise ValueError(f"unknown connector {kind!r}; use 'linear' or 'mlp<N>x_gelu'")
        super().__init__(*layers)
        self.kind = kind


def _pad_rows(rows: list[list[int]], value: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one width -> (ids [B,T], attention_mask [B,T])."""
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _cache_arg(llm: nn.Module) -> str:
    """The KV-cache argument of ``llm.forward``: ``cache`` (transformers >= 5.25) or
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def pixel_batch(
    images: list[Image.Image | None], preprocess: Any, image_size: tuple[int, int]
) -> torch.Tensor | None:
    """Preprocessed images [B,3,H,W] (zeros for text-only samples); None if no image."""
    if all(image is None for image in images):
        return None
    blank = torch.zeros(3, *image_size)
    return torch.stack([blank if image is None else preprocess(image) for image in images])


def _check_image_rows(rows: list[list[int]], has_image: list[bool], names: list[str]) -> None:
    """Each sample with an image has exactly one placeholder; one without has none."""
    for row, image, name in zip(rows, has_image, names, strict=True):
        count = row.count(IMAGE_TOKEN_ID)
        if image and count != 1:
            raise ValueError(
                f"sample {name!r}: an image needs exactly one placeholder, got {count}"
            )
        if not image and count:
            raise ValueError(f"sample {name!r}: {count} image placeholder(s) but no image")


class LlavaVLM(nn.Module):
    """Vision tower + connector + causal LM, with the chat template that formats its inputs.

    Attributes: ``vision`` (frozen ``VisionTower``), ``connector``, ``llm`` (a transformers
    causal LM), ``tokenizer``, ``template`` (a ``TEMPLATE_NAMES`` entry), ``meta`` (provenance,
    saved with the model).
    """

    def __init__(
        self,
        vision: VisionTower,
        connector: Connector,
        llm: nn.Module,
        tokenizer: Any,
        template: str,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_template(template)
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        self.template = template
        self.meta = dict(meta or {})
        # FSDP's transformer auto-wrap looks for the LLM's decoder-layer classes here
        self._no_split_modules = list(getattr(llm, "_no_split_modules", None) or [])

    @property
    def device(self) -> torch.device:
        return next(self.connector.parameters()).device

    @property
    def pad_token_id(self) -> int:
        """The id used for padding (any id works: attention masks are explicit)."""
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        return 0

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by component: {"vision": [...], "connector": [...], "llm": [...]}, the
        groups whose learning ``fgvlm.training.recipe`` schedules."""
        return {
            "vision": list(self.vision.parameters()),
            "connector": list(self.connector.parameters()),
            "llm": list(self.llm.parameters()),
        }

    def collate_fn(
        self, *, max_length: int | None = None, count_truncated: bool = False
    ) -> Collator:
        """The trainer's batch builder for this model (picklable: no weights inside)."""
        return Collator(self, max_length=max_length, count_truncated=count_truncated)

    def save(
        self,
        out_dir: Path,
        extra_meta: dict[str, Any] | None = None,
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """The trainer's save: ``save_vlm`` (``state_dict``: weights gathered from shards)."""
        save_vlm(self, out_dir, extra_meta, state_dict=state_dict)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> connector output [B, num_patches, D_llm]."""
        weight = next(self.connector.parameters())
        features = self.vision(pixel_values.to(weight.device))
        return self.connector(features.to(weight.dtype))

    def pixel_batch(self, images: list[Image.Image | None]) -> torch.Tensor | None:
        """Preprocessed images [B,3,H,W] (zeros for text-only samples); None if no image."""
        return pixel_batch(images, self.vision.preprocess, self.vision.image_size)

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """Splice image features in place of ``IMAGE_TOKEN_ID`` (at most one per sample).

        Out: ``inputs_embeds`` [B,T',D], ``attention_mask``, ``position_ids`` and (with
        ``labels``) ``labels`` with ``IGNORE_INDEX`` on the image positions, re-padded on
        ``padding_side``. Only rows of ``pixel_values`` whose sample has a placeholder are
        encoded; samples without one are text-only.
        """
        device = self.device
        input_ids = input_ids.to(device)
        keep = attention_mask.to(device).bool()
        image_at = (input_ids == IMAGE_TOKEN_ID) & keep
        counts = image_at.sum(dim=1)
        if (counts > 1).any():
            row = int(torch.nonzero(counts > 1)[0])
            raise ValueError(f"batch row {row} has {int(counts[row])} image placeholders (max 1)")
        has_image = counts == 1
        features = None
        if has_image.any():
            if pixel_values is None or pixel_values.shape[0] != input_ids.shape[0]:
                shape = None if pixel_values is None else tuple(pixel_values.shape)
                raise ValueError(
                    f"image placeholders need pixel_values with one row per sample "
                    f"({input_ids.shape[0]}), got {shape}"
                )
            features = self.embed_images(pixel_values[has_image.to(pixel_values.device)])
        embed = self.llm.get_input_embeddings()
        text = embed(input_ids.masked_fill(input_ids < 0, 0))  # the sentinel has no embedding
        rows: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        n_image = 0
        for b, with_image in enumerate(has_image.tolist()):  # one device sync, not one per row
            row_embeds = text[b][keep[b]]
            row_labels = None if labels is None else labels[b].to(device)[keep[b]]
            if with_image:
                at = int(torch.nonzero(input_ids[b][keep[b]] == IMAGE_TOKEN_ID)[0])
                image = features[n_image].to(row_embeds.dtype)
                n_image += 1
                row_embeds = torch.cat([row_embeds[:at], image, row_embeds[at + 1 :]])
                if row_labels is not None:
                    ignored = row_labels.new_full((image.shape[0],), IGNORE_INDEX)
                    row_labels = torch.cat([row_labels[:at], ignored, row_labels[at + 1 :]])
            rows.append((row_embeds, row_labels))
        return self._pad_embeds(rows, padding_side, with_labels=labels is not None)

    def _pad_embeds(
        self, rows: list[tuple[torch.Tensor, torch.Tensor | None]], side: str, *, with_labels: bool
    ) -> dict[str, torch.Tensor]:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        width = max(embeds.shape[0] for embeds, _ in rows)
        first = rows[0][0]
        embeds = first.new_zeros((len(rows), width, first.shape[-1]))
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=first.device)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long, device=first.device)
        for i, (row_embeds, row_labels) in enumerate(rows):
            n = row_embeds.shape[0]
            span = slice(0, n) if side == "right" else slice(width - n, width)
            embeds[i, span] = row_embeds
            mask[i, span] = 1
            if row_labels is not None:
                labels[i, span] = row_labels
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids}
        if with_labels:
            out["labels"] = labels
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **llm_kwargs: Any,
    ):
        """-> the LM's ``CausalLMOutputWithPast`` (``loss`` when ``labels`` are given; logits
        over the spliced sequence). ``llm_kwargs`` go to the LM (e.g. ``num_items_in_batch``)."""
        inputs = self.prepare_inputs(input_ids, attention_mask, labels, pixel_values)
        return self.llm(**inputs, **llm_kwargs)

    @torch.no_grad()
    def generate_ids(
        self,
        input_ids: list[list[int]],
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
    ) -> list[list[int]]:
        """Greedy answers to prompts (``templates.prompt_ids``) -> new token ids per prompt,
        cut before the template's stop token. Prompts are left-padded and run as one batch."""
        pad = self.pad_token_id
        ids, mask = _pad_rows(input_ids, pad, side="left")
        inputs = self.prepare_inputs(ids, mask, None, pixel_values, padding_side="left")
        stop = stop_token_ids(self.template, self.tokenizer)
        out = self.llm.generate(
            inputs_embeds=inputs["inputs_embeds"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=stop or None,
            pad_token_id=pad,
        )
        answers = []
        for row in out.tolist():
            cut = next((i for i, token in enumerate(row) if token in stop), len(row))
            answers.append(row[:cut])
        return answers

    @torch.no_grad()
    def sequence_logprobs(
        self,
        prompts: list[list[int]],
        continuations: list[list[int]],
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum of log-probabilities of each continuation after its prompt -> float32 [B].

        E.g. option likelihoods: ``prompts`` from ``prompt_ids``, ``continuations`` from
        ``templates.answer_ids`` (one row per option, the image row repeated).
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        rows = [p + c for p, c in zip(prompts, continuations, strict=True)]
        targets = [[IGNORE_INDEX] * len(p) + c for p, c in zip(prompts, continuations, strict=True)]
        ids, mask = _pad_rows(rows, self.pad_token_id, side="right")
        labels, _ = _pad_rows(targets, IGNORE_INDEX, side="right")
        inputs = self.prepare_inputs(ids, mask, labels, pixel_values)
        labels = inputs.pop("labels")
        logits = self.llm(**inputs).logits[:, :-1].float()
        targets_next = labels[:, 1:]
        valid = targets_next != IGNORE_INDEX
        logprobs = torch.log_softmax(logits, dim=-1)
        picked = logprobs.gather(-1, targets_next.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * valid).sum(dim=1).cpu()

    @torch.no_grad()
    def shared_prefix_logprobs(
        self,
        prompts: list[list[int]],
        continuations: list[list[list[int]]],
        pixel_values: torch.Tensor | None = None,
    ) -> list[list[float]]:
        """``sequence_logprobs`` of several continuations per prompt, each prompt (image
        included) run once: its KV cache is repeated for its continuations, which then take one
        short pass together. In: one prompt and one image row per question, and per question
        its continuations' ids (non-empty). Out: per question, one summed log-prob per
        continuation (float32 logits, as ``sequence_logprobs``).
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuation lists")
        counts = [len(conts) for conts in continuations]
        if any(not conts or any(not c for c in conts) for conts in continuations):
            raise ValueError("every prompt needs continuations, each with at least one token")
        ids, mask = _pad_rows(prompts, self.pad_token_id, side="left")
        # left padding: every prompt ends at the same column, where its continuations start
        inputs = self.prepare_inputs(ids, mask, None, pixel_values, padding_side="left")
        out = self.llm(**inputs, use_cache=True)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, vocab]
        index = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(counts))
        flat = [cont for conts in continuations for cont in conts]
        scores = first[index.to(first.device), [cont[0] for cont in flat]]
        longest = max(len(cont) for cont in flat)
        if longest > 1:
            # each continuation but its last token is fed after its prompt's cached keys
            cache = out.cache if "cache" in out else out.past_key_values  # renamed in 5.25
            cache.reorder_cache(index.to(self.device))  # prompt rows -> one per continuation
            feed, _ = _pad_rows([cont[:-1] for cont in flat], self.pad_token_id, side="right")
            feed = feed[:, : longest - 1].to(self.device)
            prompt_mask = inputs["attention_mask"][index.to(self.device)]
            full_mask = torch.cat([prompt_mask, torch.ones_like(feed)], dim=1)
            start = inputs["position_ids"][index.to(self.device), -1:] + 1
            positions = start + torch.arange(longest - 1, device=self.device)
            logits = self.llm(
                input_ids=feed,
                attention_mask=full_mask,
                position_ids=positions,
                use_cache=True,
                **{_cache_arg(self.llm): cache},
            ).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            targets, valid = _pad_rows([cont[1:] for cont in flat], 0, side="right")
            targets, valid = targets.to(self.device), valid.to(self.device)
            picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            scores = scores + (picked * valid).sum(dim=1)
        values = scores.cpu().tolist()
        result, start = [], 0
        for count in counts:
            result.append(values[start : start + count])
            start += count
        return result

    def generate_text(
        self,
        user_texts: list[str],
        images: list[Image.Image | None],
        *,
        max_new_tokens: int = 32,
        system: str | None = None,
    ) -> list[str]:
        """Greedy answers as text for user turns (``"<image>"`` marks each sample's image)."""
        rows = [prompt_ids(self.template, self.tokenizer, t, system=system) for t in user_texts]
        _check_image_rows(rows, [image is not None for image in images], user_texts)
        answers = self.generate_ids(rows, self.pixel_batch(images), max_new_tokens)
        return [self.tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]


def build_vlm(
    clip_dir: Path,
    llm_dir: Path,
    *,
    template: str,
    connector: str = "mlp2x_gelu",
    image_aspect: str = "pad",
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LlavaVLM:
    """A new VLM: the CLIP weights dir's tower, a seeded new connector, the LM of ``llm_dir``
    (a Hugging Face model dir: ``materialize_tiny_llm`` or ``fetch_llm``) in ``dtype``.
    ``image_aspect``: how images are fitted to the tower (``VisionTower``); saved with the
    model, so evaluation preprocesses as training did.

    Fails early (``TemplateMismatchError``) when the tokenizer lacks a token ``template`` needs.
    """
    check_template(template)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    stop_token_ids(template, tokenizer)  # the template's end token must exist
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype)
    vision = VisionTower(clip_dir, device="cpu", aspect=image_aspect)
    # a private RNG state: building must not disturb the caller's random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = Connector(
            connector, vision.hidden_size, llm.get_input_embeddings().embedding_dim
        )
    meta = {
        "encoder": str(clip_dir),
        "encoder_name": vision.name,
        "llm": str(llm_dir),
        "template": template,
        "connector": connector,
        "connector_seed": seed,
    }
    vlm = LlavaVLM(vision, projector.to(dtype), llm, tokenizer, template, meta)
    return vlm.to(device)


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors, each storage once (tied weights are re-tied on load)."""
    seen: set[tuple] = set()
    out = {}
    for key, value in state.items():
        identity = (value.device, value.untyped_storage().data_ptr(), value.storage_offset())
        if identity in seen:
            continue
        seen.add(identity)
        out[key] = value.detach().cpu().contiguous()
    return out


def save_vlm(
    vlm: LlavaVLM,
    out_dir: Path,
    extra_meta: dict[str, Any] | None = None,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save ``vlm`` into ``out_dir`` atomically (see the module docstring for the layout).

    ``extra_meta`` is merged into the stored meta (it cannot override the model's own keys).
    ``state_dict`` (keys as ``vlm.state_dict()``) replaces the module's own tensors, e.g. a
    full state dict gathered from sharded training.
    """
    extra = dict(extra_meta or {})
    clash = sorted(set(extra) & set(_RESERVED_META))
    if clash:
        raise ValueError(f"save_vlm: extra_meta may not set {clash}")
    state = vlm.state_dict() if state_dict is None else state_dict
    tensors = _unique_tensors(
        {k: v for k, v in state.items() if k.startswith(("connector.", "llm."))}
    )
    record = {
        **vlm.meta,
        **extra,
        "encoder": str(vlm.vision.clip_dir),
        "template": vlm.template,
        "connector": vlm.connector.kind,
        "image_aspect": vlm.vision.aspect,
        "llm_config": vlm.llm.config.to_dict(),
        "vision": {
            "num_patches": vlm.vision.num_patches,
            "hidden_size": vlm.vision.hidden_size,
            "layer_index": vlm.vision.layer_index,
        },
    }
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_file(tensors, str(tmp / VLM_WEIGHTS_FILE), metadata={"format": "pt"})
        vlm.tokenizer.save_pretrained(tmp)
        write_json(record, tmp / VLM_CONFIG_FILE)
        publish_modes(tmp)


def read_vlm_config(model_dir: Path) -> dict[str, Any]:
    """Read and check ``fgvlm_vlm.json`` of a saved VLM (errors name the dir)."""
    model_dir = Path(model_dir)
    for name in (VLM_CONFIG_FILE, VLM_WEIGHTS_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"VLM dir {model_dir} lacks {name}")
    record = read_json(model_dir / VLM_CONFIG_FILE)
    missing = [key for key in _RESERVED_META if key not in record]
    if missing:
        raise ValueError(f"{model_dir / VLM_CONFIG_FILE}: missing keys {missing}")
    return record


def _load_llm(config_dict: dict[str, Any], state: dict[str, torch.Tensor], source: Path):
    """The LM skeleton without random init, filled from ``state``; tied weights re-tied."""
    config = AutoConfig.for_model(**config_dict)
    with init_empty_weights():
        llm = AutoModelForCausalLM.from_config(config)
    result = llm.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{source}: unexpected LM tensors {result.unexpected_keys[:5]}")
    llm.tie_weights()
    missing = [name for name, p in llm.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{source}: LM tensors missing from the checkpoint: {missing[:5]}")
    return llm.eval()


def load_vlm(
    model_dir: Path,
    device: str = "cpu",
    *,
    clip_dir: Path | None = None,
    dtype: torch.dtype | None = None,
) -> LlavaVLM:
    """Load a VLM saved by ``save_vlm``; the tower comes from the CLIP dir it names (or
    ``clip_dir``). ``dtype`` casts connector and LM (default: as saved)."""
    model_dir = Path(model_dir)
    record = read_vlm_config(model_dir)
    tensors = load_file(str(model_dir / VLM_WEIGHTS_FILE))
    parts: dict[str, dict[str, torch.Tensor]] = {"connector": {}, "llm": {}}
    for key, value in tensors.items():
        prefix, _, name = key.partition(".")
        if prefix not in parts:
            raise ValueError(f"{model_dir / VLM_WEIGHTS_FILE}: unexpected tensor {key!r}")
        parts[prefix][name] = value
    vision = VisionTower(
        Path(clip_dir or record["encoder"]), device="cpu", aspect=record["image_aspect"]
    )
    if vision.hidden_size != record["vision"]["hidden_size"]:
        raise ValueError(
            f"{model_dir}: tower width {vision.hidden_size} != saved "
            f"{record['vision']['hidden_size']} (wrong CLIP dir {vision.clip_dir}?)"
        )
    llm = _load_llm(record["llm_config"], parts["llm"], model_dir)
    width = llm.get_input_embeddings().embedding_dim
    projector = Connector(record["connector"], vision.hidden_size, width)
    projector.load_state_dict(parts["connector"], strict=True)
    meta = {k: v for k, v in record.items() if k not in ("llm_config", "vision")}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vlm = LlavaVLM(vision, projector, llm, tokenizer, record["template"], meta)
    if dtype is not None:
        vlm.connector.to(dtype)
        vlm.llm.to(dtype)
    return vlm.to(device)


class Collator:
    """Builds training batches for a VLM without holding its weights, so that it can be sent to
    data-loader worker processes: ``Collator(vlm, max_length=...)(samples)`` = ``collate``.
    ``count_truncated``: the batch also holds ``truncated``, how many samples were cut to
    ``max_length`` (for the train log; not a model input)."""

    def __init__(
        self, vlm: LlavaVLM, *, max_length: int | None = None, count_truncated: bool = False
    ) -> None:
        self.count_truncated = count_truncated
        self.template = vlm.template
        self.tokenizer = vlm.tokenizer
        self.num_patches = vlm.vision.num_patches
        self.image_size = vlm.vision.image_size
        self.preprocess = vlm.vision.preprocess
        self.pad_token_id = vlm.pad_token_id
        self.max_length = max_length

    def __call__(
        self, samples: list[tuple[dict[str, Any], Image.Image | None]]
    ) -> dict[str, torch.Tensor | None]:
        if not samples:
            raise ValueError("collate: empty batch")
        rows, targets, names, truncated = [], [], [], 0
        for record, image in samples:
            name = str(record.get("id", "<no id>"))
            limit = self.max_length
            if limit is not None and image is not None:
                limit -= self.num_patches - 1  # the image takes num_patches positions
            ids, labels = tokenize_conversation(
                self.template,
                self.tokenizer,
                record.get("conversations"),
                sample_id=name,
                max_length=None if self.count_truncated else limit,
            )
            if self.count_truncated and limit is not None and len(ids) > limit:
                truncated += 1
                ids, labels = tokenize_conversation(
                    self.template,
                    self.tokenizer,
                    record.get("conversations"),
                    sample_id=name,
                    max_length=limit,
                )
            rows.append(ids)
            targets.append(labels)
            names.append(name)
        images = [image for _, image in samples]
        _check_image_rows(rows, [image is not None for image in images], names)
        input_ids, attention_mask = _pad_rows(rows, self.pad_token_id, side="right")
        labels, _ = _pad_rows(targets, IGNORE_INDEX, side="right")
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixel_batch(images, self.preprocess, self.image_size),
        }
        if self.count_truncated:
            batch["truncated"] = truncated
        return batch


def collate(
    samples: list[tuple[dict[str, Any], Image.Image | None]],
    vlm: LlavaVLM,
    *,
    max_length: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """Training batch for ``vlm.forward`` from (conversation record, image or None) pairs.

    Records are LLaVA conversations (``{"id", "conversations", ...}``); ``max_length`` counts
    LM positions after splicing (an image takes ``num_patches``). Out: right-padded
    ``input_ids``, ``attention_mask``, ``labels`` [B,T] and ``pixel_values`` [B,3,H,W] (zeros
    for text-only samples) or None when no sample has an image. An image without exactly one
    placeholder, or a placeholder without an image, raises ValueError naming the sample.
    """
    return Collator(vlm, max_length=max_length)(samples)
