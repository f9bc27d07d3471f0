"""Bring-your-own benchmark sources: an image folder tree or a CSV list of images.

Keys are image paths relative to the dataset root, without suffix, '/' -> '--' and '.' -> '_'
(:func:`fgvlm.data.manifest.path_key`); two images with the same key are an error.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl

from fgvlm.data.manifest import make_manifest, path_key
from fgvlm.io import read_json

# The image formats the question shards carry (jpg/png); other files are ignored.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_INTEGER = re.compile(r"-?\d+")
# (CSV line, row) -> (label, class name)
Resolver = Callable[[int, dict[str, str]], tuple[int, str]]


def _row(key: str, path: Path, label: int, classname: str, split: str) -> dict[str, object]:
    """One manifest row."""
    return {
        "key": key,
        "path": str(path.absolute()),
        "label": label,
        "classname": classname,
        "split": split,
    }


def _check_unique(rows: list[dict[str, object]], where: str) -> None:
    """Raise ValueError naming both images when two rows share a key."""
    seen: dict[object, object] = {}
    for row in rows:
        if row["key"] in seen:
            raise ValueError(
                f"{where}: images {seen[row['key']]} and {row['path']} "
                f"both give manifest key {row['key']!r}"
            )
        seen[row["key"]] = row["path"]


def _folder_classnames(root: Path, folders: list[str]) -> list[str]:
    """Display names of the sorted class folders: ``root/classes.json`` if present, else
    the folder names with '_' -> ' '."""
    classes_file = root / "classes.json"
    if not classes_file.exists():
        return [folder.replace("_", " ") for folder in folders]
    names = read_json(classes_file)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{classes_file}: expected a JSON list of class names")
    if len(names) != len(folders):
        raise ValueError(
            f"{classes_file}: {len(names)} class names for {len(folders)} class folders"
        )
    return names


def read_image_folder(
    root: str | Path, split: str = "test", classnames: Sequence[str] | None = None
) -> pl.DataFrame:
    """Manifest of ``root/<class folder>/**/<image>`` (jpg, jpeg, png), sorted by path.

    Without ``classnames`` the labels follow the sorted folder names and class names come
    from ``root/classes.json`` (a list aligned with the sorted folders) or the folder name with
    '_' -> ' '. With ``classnames`` (the benchmark's list) each folder must be named after one
    of them (exactly, or with ' ' written as '_') and gets that name's index as label.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no class folders")
    if classnames is None:
        names = _folder_classnames(root, folders)
        labels = {folder: (i, names[i]) for i, folder in enumerate(folders)}
    else:
        labels = _match_folders(root, folders, classnames)
    rows = []
    for folder in folders:
        label, name = labels[folder]
        images = sorted(
            p
            for p in (root / folder).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not images:
            raise ValueError(f"{root / folder}: class folder has no jpg/png images")
        rows += [_row(path_key(p.relative_to(root)), p, label, name, split) for p in images]
    _check_unique(rows, str(root))
    try:
        return make_manifest(rows, None if classnames is None else list(classnames))
    except ValueError as err:
        raise ValueError(f"{root}: {err}") from err


def _match_folders(
    root: Path, folders: list[str], classnames: Sequence[str]
) -> dict[str, tuple[int, str]]:
    """Map each folder to (index, name) of the class name it spells."""
    index = {name: i for i, name in enumerate(classnames)}
    index.update({name.replace(" ", "_"): i for i, name in enumerate(classnames)})
    matched = {}
    for folder in folders:
        if folder not in index:
            raise ValueError(
                f"{root / folder}: class {folder!r} is not in the benchmark's class names "
                f"({len(classnames)} classes: {_preview(classnames)})"
            )
        matched[folder] = (index[folder], classnames[index[folder]])
    return matched


def _preview(names: Sequence[str], n: int = 3) -> str:
    """The first ``n`` names, for error messages."""
    shown = ", ".join(repr(name) for name in names[:n])
    return f"{shown}, ..." if len(names) > n else shown


def read_csv_source(
    csv_path: str | Path,
    image_root: str | Path | None = None,
    split: str = "test",
    classnames: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Manifest of the images listed in a CSV with columns ``path,label[,classname]``.

    Relative paths resolve against ``image_root`` (default: the CSV's folder); keys come from
    the path relative to that root. ``label`` is either an integer class index in every row
    (class names from the ``classname`` column or ``classnames``) or a class name in every row
    (labels = index in ``classnames`` if given, else in the sorted distinct names). Errors name
    the CSV file and line.
    """
    csv_path = Path(csv_path)
    base = Path(image_root) if image_root is not None else csv_path.parent
    records = _read_csv(csv_path)
    is_integer = [bool(_INTEGER.fullmatch(r["label"].strip())) for _, r in records]
    for (line, record), integer in zip(records, is_integer, strict=True):
        if integer != is_integer[0]:
            kind = "an integer" if is_integer[0] else "a class name"
            raise ValueError(
                f"{csv_path}:{line}: label {record['label']!r} is not {kind} like the first row's"
            )
    if is_integer[0]:
        resolve = _integer_labels(csv_path, records, classnames)
    else:
        resolve = _string_labels(csv_path, records, classnames)
    rows = []
    for line, record in records:
        path = Path(record["path"].strip())
        full = path if path.is_absolute() else base / path
        if not full.is_file():
            raise FileNotFoundError(f"{csv_path}:{line}: image {full} not found")
        label, name = resolve(line, record)
        rows.append(_row(_csv_key(path, base), full, label, name, split))
    _check_unique(rows, str(csv_path))
    try:
        return make_manifest(rows, None if classnames is None else list(classnames))
    except ValueError as err:
        raise ValueError(f"{csv_path}: {err}") from err


def _csv_key(path: Path, base: Path) -> str:
    """Key of a CSV path: relative to ``base``; an absolute path elsewhere keys on its parts."""
    if not path.is_absolute():
        return path_key(path)
    return path_key(path.relative_to(base if path.is_relative_to(base) else path.anchor))


def _read_csv(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a CSV that has ``path`` and ``label`` columns."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: CSV not found")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"path", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}")
        records = []
        for record in reader:
            line = reader.line_num
            if any(not (record.get(c) or "").strip() for c in ("path", "label")):
                raise ValueError(f"{csv_path}:{line}: empty path or label")
            records.append((line, record))
    if not records:
        raise ValueError(f"{csv_path}: no rows")
    return records


def _integer_labels(
    csv_path: Path, records: list[tuple[int, dict[str, str]]], classnames: Sequence[str] | None
) -> Resolver:
    """Resolver for integer labels: names from the ``classname`` column or ``classnames``."""
    has_column = "classname" in records[0][1]

    def resolve(line: int, record: dict[str, str]) -> tuple[int, str]:
        label = int(record["label"])
        if classnames is not None:
            if not 0 <= label < len(classnames):
                raise ValueError(
                    f"{csv_path}:{line}: label {label} outside 0..{len(classnames) - 1}"
                )
            name = classnames[label]
            given = (record.get("classname") or "").strip()
            if has_column and given and given != name:
                raise ValueError(f"{csv_path}:{line}: classname {given!r} is not {name!r}")
            return label, name
        name = (record.get("classname") or "").strip()
        if not name:
            raise ValueError(
                f"{csv_path}:{line}: integer label without a classname column or class names"
            )
        return label, name

    return resolve


def _string_labels(
    csv_path: Path, records: list[tuple[int, dict[str, str]]], classnames: Sequence[str] | None
) -> Resolver:
    """Resolver for class-name labels: index in ``classnames`` or in the sorted names."""
    if classnames is not None:
        names = list(classnames)
    else:
        names = sorted({record["label"].strip() for _, record in records})
    index = {name: i for i, name in enumerate(names)}

    def resolve(line: int, record: dict[str, str]) -> tuple[int, str]:
        name = record["label"].strip()
        if name not in index:
            raise ValueError(
                f"{csv_path}:{line}: class {name!r} is not in the benchmark's class names"
            )
        return index[name], (record.get("classname") or "").strip() or name

    return resolve
