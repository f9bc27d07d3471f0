"""A benchmark's source, whatever its type, read into one normalized form.

Fine-grained benchmarks become a manifest (``fgvlm.data.manifest``), their full class list and,
where the source defines them, per-image candidate negatives; general-VQA benchmarks become a
VLMEvalKit TSV. Each ``source.type`` of the config schema has one branch here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from fgvlm import io
from fgvlm.data import classification, folder, imagenet, manifest

log = logging.getLogger(__name__)

ANNOTATIONS_FILE = "human_accuracy_v3.0.0.json"


@dataclass
class Benchmark:
    """A normalized fine-grained benchmark: ``frame`` (manifest rows), ``classnames`` (label
    order, classes without images included), ``candidates`` (image key -> the labels its
    negatives may be drawn from; None: every class) and ``stats`` (``count_stats``)."""

    frame: pl.DataFrame
    classnames: list[str]
    candidates: dict[str, list[int]] | None = None
    stats: dict | None = None


def read_benchmark(spec: dict, *, raw_dir: Path, world_dir: Path | None = None) -> Benchmark:
    """Download (where the source allows) and read one benchmark (``fgvlm.config.benchmark_spec``).

    Raw downloads go to ``raw_dir``; a synthetic source is read from its drawn ``world_dir``.
    Every image is opened once, so that a corrupt file fails here, naming the file.
    """
    source = spec["source"]
    candidates, expected, where = None, None, str(raw_dir)
    # a class table labels folder and CSV classes by its order (their names must be in it)
    table = classification.load_classnames(spec["classnames"]) if "classnames" in spec else None
    if source["type"] == "torchvision":
        classification.download_torchvision_dataset(source["name"], raw_dir)
        frame = classification.build_manifest(source["name"], raw_dir, expected_count=None)
        if source["expected_count"] is not None:
            expected = {"images": source["expected_count"]}
    elif source["type"] == "imagenet_subset":
        annotations = raw_dir / ANNOTATIONS_FILE
        imagenet.download_annotations(
            source["annotations"]["url"], source["annotations"]["md5"], annotations
        )
        rule = {k: source[k] for k in ("single_correct", "keep_problematic")}
        frame = imagenet.read_imagenet_subset(
            Path(source["val_dir"]), annotations, source["min_wrong"], **rule
        )
        candidates = imagenet.subset_negatives(
            imagenet.load_annotations(annotations), source["min_wrong"], **rule
        )
        expected, where = source["expected_count"], f"{source['val_dir']} with {annotations}"
    elif source["type"] == "image_folder":
        frame = folder.read_image_folder(
            Path(source["root"]), split=source["split"], classnames=table
        )
    elif source["type"] == "csv":
        root = source.get("image_root")
        frame = folder.read_csv_source(
            Path(source["csv"]),
            Path(root) if root else None,
            split=source["split"],
            classnames=table,
        )
    elif source["type"] == "synthetic":
        # A synthetic world is an image-folder tree: read it through the generic source.
        frame = folder.read_image_folder(world_dir / source["split"], split=source["split"])
    else:  # the schema rejects other types; this guards direct library use
        raise ValueError(f"benchmark source type {source['type']!r} is not supported")
    classnames = _classnames(spec, frame, world_dir)
    frame = manifest.make_manifest(frame)
    accept = source.get("accept_count_mismatch")  # only sources with an expected count have it
    stats = count_stats(frame, classnames, expected, accept=accept, where=where)
    manifest.verify_images(frame)
    return Benchmark(frame, classnames, candidates, stats)


def count_stats(
    frame: pl.DataFrame,
    classnames: list[str],
    expected: dict | None,
    *,
    accept: bool | None,
    where: str,
) -> dict:
    """The manifest's counts (images, classes with images, classes listed) beside the expected
    ones (the paper's); a mismatch raises ValueError naming both unless ``accept`` (logged)."""
    found = {"images": frame.height, "classes": frame["label"].n_unique()}
    stats = {**found, "classes_listed": len(classnames), "expected": expected, "matches": True}
    differ = {k: (found[k], v) for k, v in (expected or {}).items() if found[k] != v}
    if differ:
        stats["matches"] = False
        message = f"{where}: manifest counts differ from the expected: " + ", ".join(
            f"{k} {got} (expected {want})" for k, (got, want) in differ.items()
        )
        if not accept:
            raise ValueError(f"{message}; set the source's accept_count_mismatch: true to accept")
        log.warning("%s (accepted: accept_count_mismatch)", message)
    return stats


def _classnames(spec: dict, frame: pl.DataFrame, world_dir: Path | None) -> list[str]:
    """The full class list in label order: a named table, the world's classes, or the manifest's."""
    if "classnames" in spec:
        return classification.load_classnames(spec["classnames"])
    if world_dir is not None:
        return io.read_json(world_dir / "classes.json")
    pairs = frame.select("label", "classname").unique().sort("label")
    labels = pairs["label"].to_list()
    if labels != list(range(len(labels))):
        raise ValueError("manifest labels are not 0..C-1; name a class table with 'classnames'")
    return pairs["classname"].to_list()


def write_benchmark(
    benchmark: Benchmark,
    manifest_path: Path,
    classes_path: Path,
    candidates_path: Path,
    stats_path: Path,
) -> None:
    """The manifest, the class list, the candidate negatives (JSON null: every class) and the
    counts beside the expected ones."""
    manifest.write_manifest(benchmark.frame, manifest_path)
    io.write_json(benchmark.classnames, classes_path)
    io.write_json(benchmark.candidates, candidates_path)
    io.write_json(benchmark.stats, stats_path)
    stats = benchmark.stats or {}
    log.info(
        "manifest %s: %d images, %d classes with images (%d listed); expected %s",
        manifest_path,
        benchmark.frame.height,
        benchmark.frame["label"].n_unique(),
        len(benchmark.classnames),
        stats.get("expected"),
    )


def fetch_vqa_benchmark(source: dict, out_path: Path) -> None:
    """A VLMEvalKit TSV (md5-checked download) or the demo's synthetic one, at ``out_path``."""
    if source["type"] == "synthetic_vqa":
        from fgvlm.data.synthetic_vqa import write_vqa_tsv

        write_vqa_tsv(
            out_path,
            seed=source["seed"],
            n_questions=source["n_questions"],
            image_size=source["image_size"],
            style=source["style"],
        )
    elif source["type"] == "vlmeval_tsv":
        from fgvlm.data.download import download_file

        download_file(source["url"], out_path, md5=source["md5"])
    else:
        raise ValueError(f"VQA source type {source['type']!r} is not supported")
