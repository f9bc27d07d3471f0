"""CLIP models as self-contained weights directories, loaded and run through open_clip.

A weights directory holds ``open_clip_model.safetensors`` and ``clip.json``::

    {"arch": "ViT-L-14", "pretrained": "laion2b_s32b_b82k" | null,
     "model_cfg": {...} | null,          # embedded open_clip config for custom architectures
     "preprocess": {"mean": [...], "std": [...], "interpolation": "bicubic", "resize_mode": "shortest"},
     "quick_gelu": false}

Hub weights (``fetch_pretrained_clip``) and the demo's tiny CLIPs
(``fgvlm.models.tiny.materialize_random_clip``) produce the same layout, and ``load_clip``
reads both through the same open_clip call.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from fgvlm.io import atomic_path, file_digest, read_json, write_json

WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "clip.json"
# open_clip's file names on the hub: safetensors first, the pickled state dict as fallback
HUB_SAFETENSORS = "open_clip_model.safetensors"
HUB_PICKLE = "open_clip_pytorch_model.bin"
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
# how a VLM's tower fits a non-square image: LLaVA-1.5's pad (expand2square), a centre crop,
# or a squash to the tower's size
IMAGE_ASPECTS = ("pad", "crop", "squash")
# embedding precision of encode_*: fp32 everywhere, or bf16 autocast on CUDA
PRECISIONS = ("fp32", "bf16")
_BUILTIN_CONFIGS = Path(open_clip.__file__).parent / "model_configs"


@dataclass
class LoadedClip:
    """A CLIP model ready for inference: ``model`` (eval mode), its inference ``preprocess``
    (PIL image -> tensor), its ``tokenizer`` (list of str -> token tensor) and a display ``name``."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str


def preprocess_entry(cfg: dict[str, Any]) -> dict[str, Any]:
    """Pick the preprocessing keys of an open_clip (pretrained or model) preprocess config."""
    missing = [key for key in PREPROCESS_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"preprocess config lacks {missing}: {cfg}")
    return {
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": str(cfg["interpolation"]),
        "resize_mode": str(cfg["resize_mode"]),
    }


class PadToSquare:
    """LLaVA-1.5's ``expand2square``: the RGB image centred on a ``max(w, h)`` square of colour
    ``fill``; square images pass unchanged. A class, not a closure, so it pickles into
    data-loader workers."""

    def __init__(self, fill: tuple[int, int, int]) -> None:
        self.fill = tuple(int(v) for v in fill)

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image if image.mode == "RGB" else image.convert("RGB")
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), self.fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas


def pad_colour(mean: Iterable[float]) -> tuple[int, int, int]:
    """The pad colour LLaVA derives from a normalisation mean: ``int(m * 255)`` per channel."""
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


def vlm_image_transform(
    preprocess: dict[str, Any], image_size: tuple[int, int], aspect: str
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> [3, H, W] for a VLM's vision tower: training and evaluation both call it.

    ``preprocess``: a ``clip.json`` preprocess entry (mean, std, interpolation); ``aspect``:
    ``pad`` (pad to a square with ``pad_colour(mean)``, then resize: LLaVA-1.5's
    ``image_aspect_ratio: pad``), ``crop`` (resize the short side, centre crop) or ``squash``
    (resize both sides to ``image_size``).
    """
    if aspect not in IMAGE_ASPECTS:
        raise ValueError(f"image aspect {aspect!r}: choose one of {IMAGE_ASPECTS}")
    base = open_clip.transform.image_transform(
        tuple(image_size),
        is_train=False,
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        resize_mode="shortest" if aspect == "crop" else "squash",
        interpolation=preprocess["interpolation"],
    )
    if aspect != "pad":
        return base
    return open_clip.transform.Compose([PadToSquare(pad_colour(preprocess["mean"])), base])


def save_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Save tensors as safetensors; clone so shared or strided storage is accepted."""
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def register_model_config(arch: str, model_cfg: dict[str, Any]) -> None:
    """Make ``arch`` known to open_clip with ``model_cfg`` (open_clip keys configs by file stem)."""
    if not all(key in model_cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"model config for {arch!r} needs embed_dim, vision_cfg and text_cfg")
    builtin = _BUILTIN_CONFIGS / f"{arch}.json"
    # registering under a built-in name would silently change that model for the whole process
    if builtin.is_file() and json.loads(builtin.read_text()) != model_cfg:
        raise ValueError(f"custom model config {arch!r} clashes with open_clip's built-in {arch!r}")
    with tempfile.TemporaryDirectory(prefix="fgvlm-clip-cfg-") as tmp:
        path = Path(tmp) / f"{arch}.json"
        path.write_text(json.dumps(model_cfg))
        # the registry keeps the parsed config after the file is gone
        open_clip.add_model_config(path)


def _hub_location(arch: str, tag: str) -> tuple[dict[str, Any], str, str | None]:
    """Resolve an open_clip (arch, tag) to (pretrained cfg, hub repo id, file name or None)."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        known = f"known tags: {tags}" if tags else "unknown architecture"
        raise ValueError(
            f"no open_clip pretrained weights for arch {arch!r}, tag {tag!r} ({known})"
        )
    if not cfg.get("hf_hub"):
        raise ValueError(f"open_clip weights {arch!r}/{tag!r} are not on the Hugging Face hub")
    # open_clip writes 'org/repo/' (default file) or 'org/repo/file.ext'
    repo_id, filename = os.path.split(cfg["hf_hub"])
    return cfg, repo_id, filename or None


def _hub_candidates(filename: str | None) -> list[str]:
    """File names to try on the hub, safetensors first."""
    if filename is None:
        return [HUB_SAFETENSORS, HUB_PICKLE]
    if filename.endswith(".safetensors"):
        return [filename]
    safe = HUB_SAFETENSORS if filename == HUB_PICKLE else Path(filename).stem + ".safetensors"
    return [safe, filename]


def _download_weights(repo_id: str, candidates: list[str], revision: str | None) -> Path:
    """Download the first candidate file that exists in ``repo_id``."""
    for name in candidates:
        try:
            return Path(hf_hub_download(repo_id=repo_id, filename=name, revision=revision))
        except LocalEntryNotFoundError:
            raise  # offline and not cached: trying other names would hide the cause
        except EntryNotFoundError:
            continue  # the repo lacks this file; try the next name
    raise FileNotFoundError(f"none of {candidates} found in hub repo {repo_id!r} ({revision=})")


def fetch_pretrained_clip(arch: str, tag: str, out_dir: Path, revision: str | None = None) -> None:
    """Download open_clip weights ``arch``/``tag`` from the Hugging Face hub into a weights dir.

    In: an open_clip architecture and pretrained tag (e.g. "ViT-L-14", "laion2b_s32b_b82k"),
    optionally a hub revision. Out: ``out_dir`` with ``open_clip_model.safetensors`` and a
    ``clip.json`` carrying the tag's preprocessing and quick-GELU flag and its provenance
    (``hub``: repo, file, the commit the hub cache stored it under), written atomically.
    """
    cfg, repo_id, filename = _hub_location(arch, tag)
    source = _download_weights(repo_id, _hub_candidates(filename), revision)
    # hf_hub_download returns <cache>/snapshots/<commit>/<file>
    commit = source.parent.name
    hub = {
        "repo": repo_id,
        "file": source.name,
        "revision": revision or "main",
        "sha": commit
        if len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)
        else None,
        "sha256": file_digest(source),
    }
    entry = {
        "arch": arch,
        "pretrained": tag,
        "model_cfg": None,
        "preprocess": preprocess_entry(cfg),
        "quick_gelu": bool(cfg.get("quick_gelu", False)),
        "hub": hub,
    }
    with atomic_path(out_dir, is_dir=True) as tmp:
        if source.suffix == ".safetensors":
            shutil.copyfile(source, tmp / WEIGHTS_FILE)
        else:
            checkpoint = torch.load(source, map_location="cpu", weights_only=True)
            if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
                checkpoint = checkpoint["state_dict"]
            save_state_dict(checkpoint, tmp / WEIGHTS_FILE)
        write_json(entry, tmp / CONFIG_FILE)


def read_clip_config(weights_dir: Path) -> dict[str, Any]:
    """Read and check ``clip.json`` of a weights dir (errors name the dir)."""
    weights_dir = Path(weights_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (weights_dir / name).is_file():
            raise FileNotFoundError(f"CLIP weights dir {weights_dir} lacks {name}")
    entry = read_json(weights_dir / CONFIG_FILE)
    missing = [key for key in ("arch", "preprocess", "quick_gelu") if key not in entry]
    if missing:
        raise ValueError(f"{weights_dir / CONFIG_FILE}: missing keys {missing}")
    return entry


def load_clip(weights_dir: Path, device: str = "cpu") -> LoadedClip:
    """Load a weights dir (``fetch_pretrained_clip`` or
    ``fgvlm.models.tiny.materialize_random_clip`` output).

    Always ``open_clip.create_model_and_transforms(arch, pretrained=<safetensors file>, ...)``
    with the stored preprocessing; out: a ``LoadedClip`` on ``device`` in eval mode.
    """
    weights_dir = Path(weights_dir)
    entry = read_clip_config(weights_dir)
    arch = entry["arch"]
    if entry.get("model_cfg"):
        register_model_config(arch, entry["model_cfg"])
    elif arch not in open_clip.list_models():
        raise ValueError(f"{weights_dir / CONFIG_FILE}: open_clip has no architecture {arch!r}")
    preprocess = entry["preprocess"]
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        arch,
        pretrained=str(weights_dir / WEIGHTS_FILE),
        device=device,
        force_quick_gelu=bool(entry["quick_gelu"]),
        image_mean=tuple(preprocess["mean"]),
        image_std=tuple(preprocess["std"]),
        image_interpolation=preprocess["interpolation"],
        image_resize_mode=preprocess["resize_mode"],
        pretrained_text=False,
    )
    model.eval()
    tag = entry.get("pretrained")
    name = f"{arch}/{tag}" if tag else arch
    return LoadedClip(model, preprocess_val, open_clip.get_tokenizer(arch), name)


def _autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``precision`` is "bf16"; full precision otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")
    if precision == "bf16" and torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _embed_dim(clip: LoadedClip, device: str) -> int:
    """Embedding width, read from one text encoding (works for every open_clip tower)."""
    return encode_texts(clip, [""], device).shape[1]


def encode_images(
    clip: LoadedClip,
    images: Iterable[Image.Image],
    batch_size: int,
    device: str,
    *,
    workers: int = 0,
    precision: str = "fp32",
) -> np.ndarray:
    """Encode PIL images (consumed lazily, in order) -> float32 [n, d], rows L2-normalised.

    ``workers`` > 0 runs the per-image preprocessing in that many threads. ``precision``:
    "fp32" (default: near-tied cosine rankings do not flip) or "bf16" (autocast on CUDA).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    total = len(images) if hasattr(images, "__len__") else None
    chunks: list[np.ndarray] = []
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    mapper = pool.map if pool is not None else map
    try:
        with torch.no_grad(), tqdm(total=total, desc="encode images", unit="img") as bar:
            for batch in _batches(images, batch_size):
                pixels = torch.stack(list(mapper(clip.preprocess, batch))).to(device)
                with _autocast(device, precision):
                    features = clip.model.encode_image(pixels)
                chunks.append(F.normalize(features.float(), dim=-1).cpu().numpy())
                bar.update(len(batch))
    finally:
        if pool is not None:
            pool.shutdown()
    if not chunks:
        return np.zeros((0, _embed_dim(clip, device)), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def encode_texts(
    clip: LoadedClip, texts: list[str], device: str, *, precision: str = "fp32"
) -> np.ndarray:
    """Encode strings -> float32 [n, d], rows L2-normalised (``precision``: as
    ``encode_images``)."""
    tokens = clip.tokenizer(texts).to(device)
    with torch.no_grad(), _autocast(device, precision):
        features = clip.model.encode_text(tokens)
    return F.normalize(features.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)


def encode_class_prompts(
    clip: LoadedClip,
    classnames: list[str],
    templates: list[str],
    device: str,
    *,
    precision: str = "fp32",
) -> np.ndarray:
    """Zero-shot class embeddings -> float32 [C, d].

    Per class, every template ``t.format(c=name)`` is encoded and normalised; the mean is
    renormalised (CLIP_benchmark's classifier).
    """
    if not templates or not classnames:
        raise ValueError(
            f"need class names and templates, got {len(classnames)} and {len(templates)}"
        )
    rows = []
    for name in tqdm(classnames, desc="encode classes", unit="class"):
        prompts = [template.format(c=name) for template in templates]
        mean = encode_texts(clip, prompts, device, precision=precision).mean(axis=0)
        rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows).astype(np.float32)
