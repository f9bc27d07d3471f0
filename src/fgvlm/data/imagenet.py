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
    annotations: Mapping[str, Any],
    min_wrong: int,
    *,
    single_correct: bool = False,
    keep_problematic: bool = False,
) -> Iterable[tuple[str, list[str], list[str]]]:
    """Yield (file name, sorted correct wnids, sorted wrong wnids) for the images a rule keeps."""
    problematic = set() if keep_problematic else set(annotations.get("problematic_images", ()))
    for name in sorted(annotations["initial_annots"]):
        labels = annotations["initial_annots"][name]
        if not name.startswith(VAL_PREFIX) or name in problematic:
            continue
        correct = sorted(set(labels.get("correct", ())))
        wrong = sorted(set(labels.get("wrong", ())) - set(correct))
        if correct and (len(correct) == 1 or not single_correct) and len(wrong) >= min_wrong:
            yield name, correct, wrong


def _label_index(wnid: str, image: str, index: Mapping[str, int]) -> int:
    """The label of ``wnid``; ValueError naming the image for an unknown id."""
    if wnid not in index:
        raise ValueError(f"annotation of {image}: {wnid!r} is not an ILSVRC-2012 WordNet id")
    return index[wnid]


def select_subset(
    annotations: Mapping[str, Any],
    min_wrong: int = MIN_WRONG,
    *,
    single_correct: bool = False,
    keep_problematic: bool = False,
) -> list[tuple[str, list[int]]]:
    """Select the ImageNet subset: (validation file name, its ``correct`` labels in 0..999),
    sorted by name.

    Rule, applied to ``initial_annots``, deterministic:

    1. ImageNet validation images only (names ``ILSVRC2012_val_*``; the rest are ImageNetV2);
    2. not in ``problematic_images`` (their original label is wrong or unclear, or the image is
       a drawing, edited or inappropriate), unless ``keep_problematic``;
    3. at least one ``correct`` WordNet id (the original ILSVRC label is one of them for an
       image that is not problematic); exactly one if ``single_correct``;
    4. at least ``min_wrong`` distinct ``wrong`` ids, i.e. model predictions that experts
       marked wrong: the human-verified hard negatives the paper builds ImageNet options from
       (Appendix B.1); four fill a 5-way question.

    The paper's exact filter is not published (Appendix B.1 names only the source and the
    counts); ``fgvlm imagenet-subset`` prints what each candidate rule gives.
    """
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    rule = {"single_correct": single_correct, "keep_problematic": keep_problematic}
    return [
        (name, [_label_index(wnid, name, index) for wnid in correct])
        for name, correct, _ in _selected(annotations, min_wrong, **rule)
    ]


def subset_negatives(
    annotations: Mapping[str, Any],
    min_wrong: int = MIN_WRONG,
    *,
    single_correct: bool = False,
    keep_problematic: bool = False,
) -> dict[str, list[int]]:
    """Map each selected image's key (file stem) to its annotated wrong labels, sorted.

    These are the human-verified hard negatives for the ImageNet questions; a miner ranks them
    (e.g. by CLIP similarity) when there are more than four.
    """
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    rule = {"single_correct": single_correct, "keep_problematic": keep_problematic}
    return {
        Path(name).stem: sorted(_label_index(w, name, index) for w in wrong)
        for name, _, wrong in _selected(annotations, min_wrong, **rule)
    }


def subset_counts(subset: list[tuple[str, list[int]]]) -> dict[str, int]:
    """Images and classes of a :func:`select_subset` result. An image with several ``correct``
    labels has one of them as its (ILSVRC) label, unknown from the annotations alone: classes
    are then bounded by ``classes_min`` (labels of single-label images) and ``classes_max``
    (every correct label); ``classes`` is exact when the two agree, else None."""
    low = {labels[0] for _, labels in subset if len(labels) == 1}
    high = {label for _, labels in subset for label in labels}
    return {
        "images": len(subset),
        "classes": len(low) if low == high else None,
        "classes_min": len(low),
        "classes_max": len(high),
    }


def annotated_pool(annotations: Mapping[str, Any]) -> dict[str, int]:
    """Candidate readings of the paper's "19,056 annotated examples": validation images in the
    annotations, those with any correct or wrong label, and those not problematic."""
    problematic = set(annotations.get("problematic_images", ()))
    val = {n: a for n, a in annotations["initial_annots"].items() if n.startswith(VAL_PREFIX)}
    return {
        "val_images": len(val),
        "val_labelled": sum(bool(a.get("correct") or a.get("wrong")) for a in val.values()),
        "val_not_problematic": sum(n not in problematic for n in val),
    }


def candidate_rule_counts(
    annotations: Mapping[str, Any], min_wrongs: Iterable[int] = (1, 2, 3, 4, 5)
) -> list[dict[str, Any]]:
    """The counts every candidate rule gives (``docs/PROTOCOL_SOURCES.md``): exactly one correct
    label or any, problematic images dropped or kept, each ``min_wrong``; ``matches_paper`` when
    the images are the paper's 5,457 and its 928 classes are within the class bounds."""
    rows = []
    for single_correct in (True, False):
        for keep_problematic in (False, True):
            for min_wrong in min_wrongs:
                rule = {
                    "single_correct": single_correct,
                    "keep_problematic": keep_problematic,
                    "min_wrong": min_wrong,
                }
                counts = subset_counts(select_subset(annotations, **rule))
                paper = PAPER_SUBSET_COUNTS
                matches = counts["images"] == paper["images"] and (
                    counts["classes_min"] <= paper["classes"] <= counts["classes_max"]
                )
                rows.append({**rule, **counts, "matches_paper": matches})
    return rows


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
    val_dir: str | Path,
    annotations_path: str | Path,
    min_wrong: int = MIN_WRONG,
    *,
    single_correct: bool = False,
    keep_problematic: bool = False,
) -> pl.DataFrame:
    """Manifest of the ImageNet subset (see :func:`select_subset`), in file-name order.

    ``val_dir`` holds the ILSVRC-2012 validation images either flat
    (``ILSVRC2012_val_00000001.JPEG``) or in synset folders (``n01440764/ILSVRC2012_...``).
    The label is the synset folder (the ILSVRC label; it must be one of the image's correct
    labels), or for a flat image its only correct label: a flat image with several correct
    labels fails (its ILSVRC label is not in the annotations). Key = file stem; class names are
    the OpenAI CLIP names (``imagenet1k_openai``, made unique by :func:`load_classnames`).
    A missing image raises FileNotFoundError naming the expected path.
    """
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise FileNotFoundError(f"{val_dir}: ImageNet validation folder not found")
    subset = select_subset(
        load_annotations(annotations_path),
        min_wrong,
        single_correct=single_correct,
        keep_problematic=keep_problematic,
    )
    images = _index_images(val_dir)
    wnids = imagenet_wnids()
    classnames = load_classnames("imagenet1k_openai")
    rows = []
    for name, correct in subset:
        path = images.get(name)
        if path is None:
            raise FileNotFoundError(
                f"{val_dir / name} (or {val_dir / wnids[correct[0]] / name}): image not found"
            )
        label = _image_label(path, val_dir, correct, wnids)
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


def _image_label(path: Path, val_dir: Path, correct: list[int], wnids: list[str]) -> int:
    """An image's label: its synset folder (one of its correct labels), else its only one."""
    if path.parent == val_dir:
        if len(correct) > 1:
            raise ValueError(
                f"{path}: correct labels {[wnids[c] for c in correct]}; its ILSVRC label is "
                "needed: put the validation images in synset folders"
            )
        return correct[0]
    folder = path.parent.name
    if folder not in wnids or wnids.index(folder) not in correct:
        labelled = " or ".join(wnids[c] for c in correct)
        raise ValueError(f"{path}: in folder {folder}, but labelled {labelled}")
    return wnids.index(folder)
