"""The paper's ImageNet-1K subset: validation images with human-annotated model mistakes.

Source: the multi-label annotations of Shankar et al., "Evaluating Machine Accuracy on
ImageNet" (ICML 2020), version 3.0.0 as re-released with "When does dough become a bagel?"
(Vasudevan et al., 2022): ``human_accuracy_v3.0.0.json``. Its structure, as read by
tensorflow_datasets ``imagenet2012_multilabel`` and the shifthappens ImageNet-M task:

- ``initial_annots``: ``{image file name: {"correct": [wnid, ...], "wrong": [...],
  "unclear": [...]}}`` (a key is absent when its list would be empty). 40,000 images: 20,000
  ImageNet validation images (``ILSVRC2012_val_%08d.JPEG``, 20 per class) plus ImageNetV2
  images (other names). Each label is a model prediction (from a testbed of 67 models) that
  experts marked correct, wrong or unclear.
- ``problematic_images``: ``{image file name: ...}``; problematic = original label wrong or
  unclear, drawing/rendering, excessively edited, or inappropriate content.
- ``imagenet_m``: the 68 ImageNet-Major file names (unused here).

Labels are indices into the sorted list of the 1,000 ILSVRC-2012 WordNet ids (the standard
torchvision/OpenAI-CLIP class order).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import polars as pl

from fgvlm.data.classification import load_classnames
from fgvlm.data.download import download_file
from fgvlm.data.manifest import make_manifest
from fgvlm.io import read_json

HUMAN_ACCURACY_URL = (
    "https://storage.googleapis.com/brain-car-datasets/imagenet-mistakes/human_accuracy_v3.0.0.json"
)
# md5 as pinned by the shifthappens benchmark's ImageNet-M task (not re-verified here: no network).
HUMAN_ACCURACY_MD5 = "81d98aa82e570a3b2db98af5ccf87145"
VAL_PREFIX = "ILSVRC2012_val_"
# The paper (Appendix B.1): 19,056 annotated examples narrowed to 5,457 images of 928 classes.
PAPER_SUBSET_COUNTS = {"images": 5457, "classes": 928}
# A 5-way question needs four wrong options.
MIN_WRONG = 4
SPLIT = "test"


def imagenet_wnids() -> list[str]:
    """The 1,000 ILSVRC-2012 WordNet ids in label order (sorted), from timm's bundled list."""
    from timm.data import ImageNetInfo  # timm is a dependency of open_clip_torch

    wnids = list(ImageNetInfo("imagenet-1k").label_names())
    if len(wnids) != 1000 or wnids != sorted(wnids):
        raise ValueError("timm's imagenet-1k synset list is not 1,000 sorted WordNet ids")
    return wnids


def download_annotations(url: str, md5: str | None, dest: str | Path) -> None:
    """Download the annotation JSON from ``url`` to ``dest``, md5-checked (JSON only: the older
    pickle release is never used). On a mismatch nothing is left at ``dest`` and the error names
    the file and URL."""
    download_file(url, Path(dest), md5=md5)


def load_annotations(path: str | Path) -> dict[str, Any]:
    """Read the annotation JSON (plain JSON, never a pickle) and check its top-level structure."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    for field in ("initial_annots", "problematic_images"):
        if not isinstance(data.get(field), dict | list):
            raise ValueError(f"{path}: missing or malformed field {field!r}")
    if not isinstance(data["initial_annots"], dict):
        raise ValueError(f"{path}: field 'initial_annots' must map image names to labels")
    return data


def _selected(
    annotations: Mapping[str, Any], min_wrong: int
) -> Iterable[tuple[str, str, list[str]]]:
    """Yield (file name, correct wnid, sorted wrong wnids) for the images the rule keeps."""
    problematic = set(annotations.get("problematic_images", ()))
    for name in sorted(annotations["initial_annots"]):
        labels = annotations["initial_annots"][name]
        if not name.startswith(VAL_PREFIX) or name in problematic:
            continue
        correct = sorted(set(labels.get("correct", ())))
        wrong = sorted(set(labels.get("wrong", ())) - set(correct))
        if len(correct) == 1 and len(wrong) >= min_wrong:
            yield name, correct[0], wrong


def _label_index(wnid: str, image: str, index: Mapping[str, int]) -> int:
    """The label of ``wnid``; ValueError naming the image for an unknown id."""
    if wnid not in index:
        raise ValueError(f"annotation of {image}: {wnid!r} is not an ILSVRC-2012 WordNet id")
    return index[wnid]


def select_subset(
    annotations: Mapping[str, Any], min_wrong: int = MIN_WRONG
) -> list[tuple[str, int]]:
    """Select the ImageNet subset: (validation file name, label in 0..999), sorted by name.

    Rule, applied to ``initial_annots``, deterministic:

    1. ImageNet validation images only (names ``ILSVRC2012_val_*``; the rest are ImageNetV2);
    2. not in ``problematic_images`` (their original label is wrong or unclear, or the image is
       a drawing, edited or inappropriate): the 20,000 validation images minus these are the
       paper's "19,056 annotated examples";
    3. exactly one ``correct`` WordNet id: the answer is unambiguous, and (the image not being
       problematic) it is the original ILSVRC label, so no ground-truth file is needed;
    4. at least ``min_wrong`` distinct ``wrong`` ids, i.e. model predictions that experts
       marked wrong: the human-verified hard negatives the paper builds ImageNet options from
       (Appendix B.1); four fill a 5-way question.

    The paper's exact filter is not published; this rule is our reading of it.
    """
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    return [
        (name, _label_index(wnid, name, index))
        for name, wnid, _ in _selected(annotations, min_wrong)
    ]


def subset_negatives(
    annotations: Mapping[str, Any], min_wrong: int = MIN_WRONG
) -> dict[str, list[int]]:
    """Map each selected image's key (file stem) to its annotated wrong labels, sorted.

    These are the human-verified hard negatives for the ImageNet questions; a miner ranks them
    (e.g. by CLIP similarity) when there are more than four.
    """
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    return {
        Path(name).stem: sorted(_label_index(w, name, index) for w in wrong)
        for name, _, wrong in _selected(annotations, min_wrong)
    }


def subset_counts(subset: list[tuple[str, int]]) -> dict[str, int]:
    """Number of images and of distinct classes in a :func:`select_subset` result."""
    return {"images": len(subset), "classes": len({label for _, label in subset})}


def _index_images(val_dir: Path) -> dict[str, Path]:
    """Map file name -> path for images directly in ``val_dir`` or one synset folder down."""
    found: dict[str, Path] = {}
    for entry in sorted(val_dir.iterdir()):
        children = sorted(entry.iterdir()) if entry.is_dir() else [entry]
        for child in children:
            if child.is_file():
                if child.name in found:
                    raise ValueError(f"{child}: same file name as {found[child.name]}")
                found[child.name] = child
    return found


def read_imagenet_subset(
    val_dir: str | Path, annotations_path: str | Path, min_wrong: int = MIN_WRONG
) -> pl.DataFrame:
    """Manifest of the ImageNet subset (see :func:`select_subset`), in file-name order.

    ``val_dir`` holds the ILSVRC-2012 validation images either flat
    (``ILSVRC2012_val_00000001.JPEG``) or in synset folders (``n01440764/ILSVRC2012_...``);
    in a synset folder the folder must be the image's label. Key = file stem; class names are
    the OpenAI CLIP names (``imagenet1k_openai``, made unique by :func:`load_classnames`).
    A missing image raises FileNotFoundError naming the expected path.
    """
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise FileNotFoundError(f"{val_dir}: ImageNet validation folder not found")
    subset = select_subset(load_annotations(annotations_path), min_wrong)
    images = _index_images(val_dir)
    wnids = imagenet_wnids()
    classnames = load_classnames("imagenet1k_openai")
    rows = []
    for name, label in subset:
        path = images.get(name)
        if path is None:
            raise FileNotFoundError(
                f"{val_dir / name} (or {val_dir / wnids[label] / name}): image not found"
            )
        if path.parent != val_dir and path.parent.name != wnids[label]:
            raise ValueError(f"{path}: in folder {path.parent.name}, but labelled {wnids[label]}")
        rows.append(
            {
                "key": path.stem,
                "path": str(path.absolute()),
                "label": label,
                "classname": classnames[label],
                "split": SPLIT,
            }
        )
    return make_manifest(rows, classnames)
