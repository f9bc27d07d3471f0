"""The benchmark manifest: one row per test image, the table every later stage reads.

``data/<dataset>/manifest.parquet`` has the columns of :data:`MANIFEST_SCHEMA`:
``key`` (unique, no '.' and no '/'), ``path`` (absolute image path), ``label`` (index into the
benchmark's class-name list), ``classname`` and ``split``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import polars as pl
from PIL import Image
from tqdm import tqdm

from fgvlm.io import write_parquet

MANIFEST_SCHEMA: dict[str, pl.DataType] = {
    "key": pl.String(),
    "path": pl.String(),
    "label": pl.Int64(),
    "classname": pl.String(),
    "split": pl.String(),
}


def path_key(relative_path: str | os.PathLike) -> str:
    """Turn an image path relative to its dataset root into a manifest key.

    The suffix is dropped, '/' becomes '--' and '.' becomes '_' ("a/b.c.jpg" -> "a--b_c"),
    because keys name WebDataset samples, where '.' separates a key from its extension.
    """
    parts = PurePosixPath(Path(relative_path).as_posix())
    stem = parts.with_suffix("").as_posix() if parts.suffix else parts.as_posix()
    return stem.strip("/").replace("/", "--").replace(".", "_")


def make_manifest(
    rows: list[dict] | pl.DataFrame, classnames: Sequence[str] | None = None
) -> pl.DataFrame:
    """Build and validate a manifest frame from row dicts or a frame with the manifest columns.

    Checks: exactly the schema's columns, no nulls, unique keys without '.' or '/', labels >= 0,
    one class name per label and one label per class name; with ``classnames`` also that every
    label indexes that list and its row's ``classname`` is the listed name.
    Returns the frame with columns in schema order; raises ValueError naming the offending value.
    """
    frame = _to_frame(rows)
    for column in MANIFEST_SCHEMA:
        nulls = frame[column].null_count()
        if nulls:
            raise ValueError(f"manifest column {column!r} has {nulls} null value(s)")
    _check_keys(frame)
    _check_labels(frame, classnames)
    return frame


def _to_frame(rows: list[dict] | pl.DataFrame) -> pl.DataFrame:
    """Coerce rows to a frame with exactly the manifest columns and dtypes."""
    if not isinstance(rows, pl.DataFrame):
        for i, row in enumerate(rows):
            if set(row) != set(MANIFEST_SCHEMA):
                raise ValueError(
                    f"manifest row {i} has columns {sorted(row)}, expected {sorted(MANIFEST_SCHEMA)}"
                )
        if not rows:
            return pl.DataFrame(schema=MANIFEST_SCHEMA)
        # Infer types from the values so that a str label is an error, not a silent cast.
        try:
            rows = pl.DataFrame(rows, infer_schema_length=None)
        except (TypeError, pl.exceptions.PolarsError) as err:
            raise ValueError(f"manifest rows have mixed value types: {err}") from err
    if set(rows.columns) != set(MANIFEST_SCHEMA):
        raise ValueError(
            f"manifest columns are {sorted(rows.columns)}, expected {sorted(MANIFEST_SCHEMA)}"
        )
    columns = []
    for name, dtype in MANIFEST_SCHEMA.items():
        column = rows[name]
        # Any integer label is fine (e.g. int32 from a reader); other type changes are errors.
        if name == "label" and column.dtype.is_integer():
            column = column.cast(pl.Int64)
        elif column.dtype != dtype:
            raise ValueError(f"manifest column {name!r} has dtype {column.dtype}, expected {dtype}")
        columns.append(column)
    return pl.DataFrame(columns)


def _check_keys(frame: pl.DataFrame) -> None:
    """Keys must be non-empty, unique and free of '.' and '/'."""
    bad = frame.filter(
        pl.col("key").str.contains(r"[./]", literal=False) | (pl.col("key").str.len_chars() == 0)
    )
    if bad.height:
        raise ValueError(f"manifest key {bad['key'][0]!r} is empty or contains '.' or '/'")
    dups = frame.filter(pl.col("key").is_duplicated())
    if dups.height:
        first = dups["key"][0]
        paths = dups.filter(pl.col("key") == first)["path"].to_list()
        raise ValueError(f"duplicate manifest key {first!r} for images {paths}")


def _check_labels(frame: pl.DataFrame, classnames: Sequence[str] | None) -> None:
    """Labels are >= 0, map one-to-one to class names, and agree with ``classnames``."""
    if frame.height and frame["label"].min() < 0:
        raise ValueError(f"manifest label {frame['label'].min()} is negative")
    pairs = frame.select("label", "classname").unique()
    for a, b in (("label", "classname"), ("classname", "label")):
        clash = pairs.filter(pl.col(a).is_duplicated()).sort(a, b)
        if clash.height:
            raise ValueError(f"manifest {a} {clash[a][0]!r} has several {b}s: {clash[b].to_list()}")
    if classnames is None:
        return
    for label, name in pairs.sort("label").iter_rows():
        if label >= len(classnames):
            raise ValueError(
                f"manifest label {label} is out of range for {len(classnames)} classes"
            )
        if classnames[label] != name:
            raise ValueError(
                f"manifest label {label} has classname {name!r}, expected {classnames[label]!r}"
            )


def verify_images(manifest: pl.DataFrame) -> None:
    """Open every image of ``manifest``: PIL ``verify()`` first, then a full decode.

    Raises ValueError naming the image path and manifest key at the first unreadable image.
    """
    rows = manifest.select("key", "path").iter_rows()
    for key, path in tqdm(rows, total=manifest.height, desc="verify images", unit="img"):
        try:
            with Image.open(path) as image:
                image.verify()
            # verify() leaves the file unusable and misses truncated pixel data: decode again.
            with Image.open(path) as image:
                image.load()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise ValueError(f"{path}: unreadable image (manifest key {key!r}): {err}") from err


def write_manifest(manifest: pl.DataFrame, path: str | os.PathLike) -> None:
    """Validate ``manifest`` and write it atomically as Parquet to ``path``."""
    write_parquet(make_manifest(manifest), path)


def read_manifest(path: str | os.PathLike) -> pl.DataFrame:
    """Read and validate a manifest; errors name the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    try:
        frame = pl.read_parquet(path)
        return make_manifest(frame)
    except (ValueError, OSError, pl.exceptions.PolarsError) as err:
        raise ValueError(f"{path}: not a valid manifest ({err})") from err
