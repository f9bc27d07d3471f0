"""Flowers-102, Oxford-IIIT Pet-37 and Food-101 test splits, in their official file formats.

Downloads go through torchvision's dataset classes (their md5 checks apply); parsing reads the
official annotation files directly from the folders torchvision lays out under ``root``:

- ``root/flowers-102/``: ``imagelabels.mat`` (``labels``, 1..102), ``setid.mat`` (``tstid``),
  ``jpg/image_%05d.jpg``;
- ``root/oxford-iiit-pet/``: ``annotations/test.txt`` (``Name_123 CLASS_ID SPECIES BREED_ID``,
  CLASS_ID 1-based), ``images/Name_123.jpg``;
- ``root/food-101/``: ``meta/test.json`` (``{class: ["class/123", ...]}``),
  ``images/class/123.jpg``.

Manifest keys are image paths relative to the image folder (``image_00001``,
``Abyssinian_100``, ``apple_pie--1005649``); rows keep the official file order.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import polars as pl
from torchvision.datasets.utils import check_integrity

from fgvlm.data.manifest import make_manifest, path_key

SPLIT = "test"

OFFICIAL_TEST_COUNTS: dict[str, int] = {
    "flowers102": 6149,
    "oxford_iiit_pet": 3669,
    "food101": 25250,
}

# Folder under ``root`` that each torchvision class (0.19-0.29) downloads into.
BASE_FOLDERS: dict[str, str] = {
    "flowers102": "flowers-102",
    "oxford_iiit_pet": "oxford-iiit-pet",
    "food101": "food-101",
}

# Files torchvision 0.29.1 downloads (path relative to root, md5), named in download errors.
DOWNLOADED_FILES: dict[str, list[tuple[str, str]]] = {
    "flowers102": [
        ("flowers-102/102flowers.tgz", "52808999861908f626f3c1f4e79d11fa"),
        ("flowers-102/imagelabels.mat", "e0620be6f572b9609742df49c70aed4d"),
        ("flowers-102/setid.mat", "a5357ecc9cb78c4bef273ce3793fc85c"),
    ],
    "oxford_iiit_pet": [
        ("oxford-iiit-pet/images.tar.gz", "5c4f3ee8e5d25df40f4fd59a7f44e54c"),
        ("oxford-iiit-pet/annotations.tar.gz", "95a8c909bbe2e81eed6a22bccdf3f68f"),
    ],
    "food101": [("food-101.tar.gz", "85eeb15f3717b99a5da872d97d918f87")],
}


def load_classnames(key: str) -> list[str]:
    """Return the class-name list ``key`` of ``fgvlm/resources/classnames.json``, made unique.

    Keys: ``flowers102``, ``oxford_iiit_pet37``, ``food101_torchvision_order`` and
    ``imagenet1k_openai`` (OpenAI CLIP names, index = sorted-WordNet-id label). A name that
    occurs more than once keeps its first occurrence and its k-th repeat (k >= 2, in index
    order) becomes ``f"{name} ({k})"``. Only ``imagenet1k_openai`` has repeats:
    "missile" (657 "missile", 744 "projectile, missile" -> "missile (2)") and "sunglasses"
    (836 "sunglass", 837 "sunglasses, dark glasses" -> "sunglasses (2)"). Unique names keep a
    class name from standing for two labels (manifest and option checks rely on it).
    """
    table = json.loads(resources.files("fgvlm").joinpath("resources/classnames.json").read_text())
    names = table.get(key)
    if not isinstance(names, list) or key.startswith("_"):
        options = sorted(k for k in table if not k.startswith("_"))
        raise ValueError(f"unknown class-name list {key!r}; choose one of {options}")
    seen: Counter[str] = Counter()
    unique = []
    for name in names:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def _rows(
    items: list[tuple[Path, int]], root: Path, classnames: list[str]
) -> list[dict[str, object]]:
    """Manifest rows for (image path, label) pairs; keys are paths relative to image folder ``root``."""
    return [
        {
            "key": path_key(path.relative_to(root)),
            "path": str(path.absolute()),
            "label": label,
            "classname": classnames[label],
            "split": SPLIT,
        }
        for path, label in items
    ]


def _require(path: Path) -> Path:
    """Return ``path`` if it exists, else raise FileNotFoundError naming it."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    return path


def read_flowers102(root: str | Path) -> pl.DataFrame:
    """Parse the Flowers-102 test split under ``root/flowers-102`` into a manifest frame.

    Order and labels follow torchvision: ``setid.mat`` ``tstid`` order, label = ``labels`` - 1.
    """
    from scipy.io import loadmat  # only this reader needs scipy

    base = Path(root) / BASE_FOLDERS["flowers102"]
    labels = loadmat(_require(base / "imagelabels.mat"), squeeze_me=True)["labels"]
    test_ids = loadmat(_require(base / "setid.mat"), squeeze_me=True)["tstid"]
    classnames = load_classnames("flowers102")
    items = []
    for image_id in test_ids.reshape(-1).tolist():
        if not 1 <= image_id <= labels.size:
            raise ValueError(f"{base / 'setid.mat'}: image id {image_id} has no label")
        label = int(labels.reshape(-1)[image_id - 1]) - 1
        if not 0 <= label < len(classnames):
            raise ValueError(f"{base / 'imagelabels.mat'}: label {label + 1} outside 1..102")
        items.append((base / "jpg" / f"image_{image_id:05d}.jpg", label))
    return make_manifest(_rows(items, base / "jpg", classnames), classnames)


def read_oxford_pets(root: str | Path) -> pl.DataFrame:
    """Parse the Oxford-IIIT Pet test split under ``root/oxford-iiit-pet`` into a manifest frame.

    Lines of ``annotations/test.txt`` are ``Name_123 CLASS_ID SPECIES BREED_ID``; label =
    CLASS_ID - 1. The breed in each file name must match the class name of its label (a check
    that the class list is in the official order).
    """
    base = Path(root) / BASE_FOLDERS["oxford_iiit_pet"]
    split_file = _require(base / "annotations" / f"{SPLIT}.txt")
    classnames = load_classnames("oxford_iiit_pet37")
    items = []
    for number, line in enumerate(split_file.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 4 or not fields[1].isdigit():
            raise ValueError(
                f"{split_file}:{number}: expected 'Name_123 CLASS_ID SPECIES BREED_ID'"
            )
        name, label = fields[0], int(fields[1]) - 1
        if not 0 <= label < len(classnames):
            raise ValueError(f"{split_file}:{number}: class id {fields[1]} outside 1..37")
        breed = name.rsplit("_", 1)[0].replace("_", " ").lower()
        if breed != classnames[label].lower():
            raise ValueError(
                f"{split_file}:{number}: image {name} has class id {fields[1]} "
                f"({classnames[label]!r}), which is not its breed"
            )
        items.append((base / "images" / f"{name}.jpg", label))
    return make_manifest(_rows(items, base / "images", classnames), classnames)


def read_food101(root: str | Path) -> pl.DataFrame:
    """Parse the Food-101 test split under ``root/food-101`` into a manifest frame.

    ``meta/test.json`` maps class folder names to "class/123" entries; rows keep the file's
    order. The label is the class's index in ``food101_torchvision_order`` (torchvision's
    ``sorted(test.json keys)`` with '_' -> ' '), so a partial file keeps the full label space.
    """
    base = Path(root) / BASE_FOLDERS["food101"]
    split_file = _require(base / "meta" / f"{SPLIT}.json")
    classnames = load_classnames("food101_torchvision_order")
    index = {name: i for i, name in enumerate(classnames)}
    try:
        metadata = json.loads(split_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{split_file}: not valid JSON ({err})") from err
    items = []
    for folder, entries in metadata.items():
        label = index.get(folder.replace("_", " "))
        if label is None:
            raise ValueError(f"{split_file}: unknown Food-101 class {folder!r}")
        for entry in entries:
            if entry.split("/")[0] != folder:
                raise ValueError(f"{split_file}: entry {entry!r} is not in class {folder!r}")
            items.append((base / "images" / f"{entry}.jpg", label))
    return make_manifest(_rows(items, base / "images", classnames), classnames)


READERS: dict[str, Callable[[str | Path], pl.DataFrame]] = {
    "flowers102": read_flowers102,
    "oxford_iiit_pet": read_oxford_pets,
    "food101": read_food101,
}


def build_manifest(name: str, root: str | Path, expected_count: int | None) -> pl.DataFrame:
    """Parse dataset ``name`` under ``root`` and check its size.

    Pass ``OFFICIAL_TEST_COUNTS[name]`` for a full download; ``None`` skips the count check
    (fabricated or partial data). Raises ValueError when the count differs.
    """
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(READERS)}")
    manifest = READERS[name](root)
    if expected_count is not None and manifest.height != expected_count:
        raise ValueError(
            f"{name} under {Path(root) / BASE_FOLDERS[name]}: {manifest.height} test images, "
            f"expected {expected_count} (incomplete or altered download?)"
        )
    return manifest


def _torchvision_class(name: str) -> Callable[..., object]:
    """The torchvision dataset class for ``name``."""
    from torchvision import datasets

    return {
        "flowers102": datasets.Flowers102,
        "oxford_iiit_pet": datasets.OxfordIIITPet,
        "food101": datasets.Food101,
    }[name]


def download_torchvision_dataset(name: str, root: str | Path) -> None:
    """Download (or check) the test split of ``name`` into ``root`` with torchvision.

    ``name`` is one of ``flowers102``, ``oxford_iiit_pet``, ``food101``. torchvision checks the
    md5 of each file it downloads. On failure a downloaded file whose md5 does not match is
    deleted (so no corrupt archive is left behind) and a ValueError names the dataset and
    each missing or corrupt file.
    """
    if name not in BASE_FOLDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(BASE_FOLDERS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        _torchvision_class(name)(str(root), split=SPLIT, download=True)
    except (RuntimeError, OSError) as err:
        problems = _file_problems(name, root)
        detail = "; ".join(problems) if problems else "no downloaded file is corrupt"
        raise ValueError(f"{name}: download into {root} failed ({err}): {detail}") from err


def _file_problems(name: str, root: Path) -> list[str]:
    """Describe, and delete, downloaded files of ``name`` whose md5 is wrong; list missing ones."""
    problems = []
    for relative, md5 in DOWNLOADED_FILES[name]:
        path = root / relative
        if not path.exists():
            problems.append(f"{path} missing")
        elif not check_integrity(str(path), md5):
            path.unlink()
            problems.append(f"{path} corrupt (md5 is not {md5}; deleted)")
    return problems
