"""Hard-negative mining: turn a classification test set into seeded 5-way questions.

Following the paper (Sec. 3.2, App. B.1): a CLIP model ranks every class name for each image,
the ``k`` most similar wrong classes become the distractors, and they are shuffled with the
correct class into lettered options.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from PIL import Image

from fgvlm.mcq import FINE_GRAINED_QUESTION, LETTERS, N_OPTIONS

if TYPE_CHECKING:
    from fgvlm.models.clip import LoadedClip

MANIFEST_COLUMNS = ("key", "path", "label", "classname")

QUESTION_SCHEMA = {
    "qid": pl.String,
    "image": pl.String,
    "question": pl.String,
    "options": pl.List(pl.String),
    "option_labels": pl.List(pl.Int64),
    "answer": pl.String,
    "label": pl.Int64,
    "classname": pl.String,
}


def _check_labels(labels: np.ndarray, n_rows: int, n_classes: int) -> np.ndarray:
    """Return ``labels`` as int64 after checking its length and range."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"labels has shape {labels.shape}, expected ({n_rows},)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        raise ValueError(
            f"label {int(labels[bad[0]])} at row {int(bad[0])} is outside 0..{n_classes - 1}"
        )
    return labels.astype(np.int64)


def hard_negatives(
    similarity: np.ndarray,
    labels: np.ndarray,
    k: int = N_OPTIONS - 1,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """The ``k`` most similar wrong classes per image.

    In: ``similarity`` float [images, classes], ``labels`` int [images], optionally ``allowed``
    bool [images, classes]: the only classes that may serve as an image's negatives (ImageNet's
    human-annotated model mistakes). Out: int64 [images, k], most similar first; ties go to the
    lower class index.
    """
    similarity = np.asarray(similarity)
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be 2-D [images, classes], got shape {similarity.shape}")
    n_images, n_classes = similarity.shape
    labels = _check_labels(labels, n_images, n_classes)
    if not 1 <= k < n_classes:
        raise ValueError(f"k={k} hard negatives need 1 <= k < number of classes ({n_classes})")
    if np.isnan(similarity).any():
        raise ValueError("similarity contains NaN")
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != similarity.shape:
            raise ValueError(f"allowed has shape {allowed.shape}, expected {similarity.shape}")
        allowed = allowed.copy()
        allowed[np.arange(n_images), labels] = False
        short = np.flatnonzero(allowed.sum(axis=1) < k)
        if short.size:
            raise ValueError(
                f"row {int(short[0])} has {int(allowed[short[0]].sum())} allowed negatives, "
                f"fewer than k={k}"
            )
        # disallowed classes sort after every allowed one; the correct label is dropped below
        similarity = np.where(allowed, similarity, -np.inf)
        similarity[np.arange(n_images), labels] = np.inf
    # a stable sort keeps equal similarities in class-index order
    order = np.argsort(-similarity, axis=1, kind="stable")
    wrong = order[order != labels[:, None]].reshape(n_images, n_classes - 1)
    return wrong[:, :k].astype(np.int64)


def build_questions(
    keys: list[str],
    labels: np.ndarray,
    classnames: list[str],
    similarity: np.ndarray,
    *,
    benchmark: str,
    seed: int,
    k: int = N_OPTIONS - 1,
    allowed: np.ndarray | None = None,
) -> pl.DataFrame:
    """Multiple-choice questions, one per image, in the order of ``keys``.

    In: image keys, their int labels, the benchmark's class names, ``similarity``
    [images, classes]. Out: the questions frame (``QUESTION_SCHEMA``): options are the correct
    class and its ``k`` hard negatives, shuffled by ``numpy.random.Generator(PCG64(seed))``.
    """
    similarity = np.asarray(similarity)
    if similarity.ndim != 2 or similarity.shape != (len(keys), len(classnames)):
        raise ValueError(
            f"similarity has shape {similarity.shape}, expected ({len(keys)}, {len(classnames)})"
            " = (keys, classnames)"
        )
    if len(set(keys)) != len(keys):
        raise ValueError(f"{benchmark}: image keys are not unique")
    if k + 1 > len(LETTERS):
        raise ValueError(f"k={k} gives more options than letters A-Z")
    labels = _check_labels(labels, len(keys), len(classnames))
    negatives = hard_negatives(similarity, labels, k, allowed)
    candidates = np.concatenate([labels[:, None], negatives], axis=1)
    rng = np.random.Generator(np.random.PCG64(seed))
    # one independent shuffle per row, drawn in row order
    order = rng.permuted(np.tile(np.arange(k + 1), (len(keys), 1)), axis=1)
    option_labels = np.take_along_axis(candidates, order, axis=1)
    answer_index = np.argmax(option_labels == labels[:, None], axis=1)
    names = np.asarray(classnames, dtype=object)
    return pl.DataFrame(
        {
            "qid": [f"{benchmark}-{i:06d}" for i in range(len(keys))],
            "image": list(keys),
            "question": [FINE_GRAINED_QUESTION] * len(keys),
            "options": names[option_labels].tolist(),
            "option_labels": option_labels.tolist(),
            "answer": [LETTERS[i] for i in answer_index],
            "label": labels,
            "classname": names[labels].tolist(),
        },
        schema=QUESTION_SCHEMA,
    )


def _check_manifest(manifest: pl.DataFrame, classnames: list[str], benchmark: str) -> None:
    """The manifest has the contract columns and agrees with ``classnames``."""
    missing = [column for column in MANIFEST_COLUMNS if column not in manifest.columns]
    if missing:
        raise ValueError(f"{benchmark}: manifest lacks columns {missing}")
    labels = manifest["label"].to_numpy()
    _check_labels(labels, manifest.height, len(classnames))
    # a shifted class list would silently mine nonsense distractors
    expected = [classnames[label] for label in labels]
    for row, (want, have) in enumerate(zip(expected, manifest["classname"], strict=True)):
        if want != have:
            key = manifest["key"][row]
            raise ValueError(
                f"{benchmark}: manifest row {key!r} has classname {have!r} but label "
                f"{labels[row]} is {want!r} in the class-name list"
            )


def _open_images(paths: list[str]) -> Iterator[Image.Image]:
    """Open images one at a time as RGB (lazily: a benchmark does not fit in memory)."""
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image not found: {path}")
        with Image.open(path) as image:
            yield image.convert("RGB")


class _Sized:
    """An iterable with a known length, so progress bars show a total."""

    def __init__(self, items: Iterator[Image.Image], length: int) -> None:
        self._items, self._length = items, length

    def __iter__(self) -> Iterator[Image.Image]:
        return self._items

    def __len__(self) -> int:
        return self._length


def mine_questions(
    manifest: pl.DataFrame,
    clip: LoadedClip,
    *,
    benchmark: str,
    classnames: list[str],
    templates: list[str],
    seed: int,
    k: int = N_OPTIONS - 1,
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 0,
    candidates: dict[str, list[int]] | None = None,
    precision: str = "fp32",
) -> pl.DataFrame:
    """Mine hard negatives with ``clip`` and build the benchmark's questions.

    In: a manifest (contract columns; row order gives the qids), the miner, class names and
    prompt templates; optionally ``candidates``: per image key, the only labels that may be its
    negatives (CLIP ranks them); ``precision`` of the embeddings (``encode_images``). Out: the questions frame of ``build_questions``.
    """
    if k >= len(classnames):
        raise ValueError(
            f"{benchmark}: miner.negatives is {k}, but the benchmark has {len(classnames)} "
            f"classes: a question needs {k} classes other than the true one"
        )
    _check_manifest(manifest, classnames, benchmark)
    paths = manifest["path"].to_list()
    images = _Sized(_open_images(paths), len(paths))
    # open_clip (and torchvision) load here, not on import: building questions needs neither
    from fgvlm.models.clip import encode_class_prompts, encode_images

    image_emb = encode_images(
        clip, images, batch_size, device, workers=workers, precision=precision
    )
    class_emb = encode_class_prompts(clip, classnames, templates, device, precision=precision)
    similarity = image_emb @ class_emb.T
    allowed = None
    if candidates is not None:
        allowed = candidate_mask(manifest["key"].to_list(), candidates, len(classnames))
    return build_questions(
        manifest["key"].to_list(),
        manifest["label"].to_numpy(),
        classnames,
        similarity,
        benchmark=benchmark,
        seed=seed,
        k=k,
        allowed=allowed,
    )


def candidate_mask(keys: list[str], candidates: dict[str, list[int]], n_classes: int) -> np.ndarray:
    """bool [images, classes]: True where a class may be the image's negative."""
    mask = np.zeros((len(keys), n_classes), dtype=bool)
    for row, key in enumerate(keys):
        if key not in candidates:
            raise ValueError(f"no candidate negatives for image {key!r}")
        mask[row, candidates[key]] = True
    return mask
