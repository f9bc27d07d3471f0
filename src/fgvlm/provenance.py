"""Where every model and data set of a study came from: one row per source, its pin.

Fetches record their pins as they download (``fgvlm.hub_pins``): hub model folders
(``fgvlm.models.hub``, ``fgvlm.models.llm``) and training-data folders
(``fgvlm.data.conversations.download_training_data``) the commit a branch resolved to and each
file's sha256 (``fgvlm_source.json``); CLIP folders the hub commit and sha256 of their weights
(``clip.json``); VLMEvalKit TSVs are checked against the md5 the config gives. Sources built
locally (the demo's tiny models, synthetic data) get a row saying so. ``provenance_table``
gathers them into one table, which the ``provenance`` rule and ``fgvlm provenance`` write to
``results/tables/provenance.csv`` (``fgvlm.stages.provenance``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import polars as pl

from fgvlm import paths
from fgvlm.hub_pins import SOURCE_FILE
from fgvlm.io import atomic_path, file_digest, read_json

COLUMNS = ("kind", "name", "source", "revision", "pin", "status")
HUB_VLM_KEYS = ("repo", "revision", "tokenizer", "tiny")  # what a hub VLM's row depends on


def _hub_row(kind: str, name: str, source: dict, folder: Path) -> dict[str, Any]:
    """A hub repository's row: the commit recorded in the fetched folder, if fetched."""
    record = folder / SOURCE_FILE
    sha = read_json(record).get("sha") if record.is_file() else None
    status = "pinned" if sha else ("fetched, commit unknown" if record.is_file() else "not fetched")
    return _repo_row(kind, name, source, sha, status)


def _repo_row(kind: str, name: str, source: dict, sha: str | None, status: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "name": name,
        "source": source.get("repo", ""),
        "revision": source.get("revision", "main"),
        "pin": sha or "",
        "status": status,
    }


def _local_row(kind: str, name: str, built_by: str) -> dict[str, Any]:
    """A source built here (a tiny model, a synthetic data set): nothing fetched to pin."""
    return {
        "kind": kind,
        "name": name,
        "source": built_by,
        "revision": "",
        "pin": "",
        "status": f"local ({built_by}), nothing fetched",
    }


def _clip_row(name: str, source: dict, folder: Path) -> dict[str, Any]:
    entry_path = folder / "clip.json"
    hub = (read_json(entry_path).get("hub") or {}) if entry_path.is_file() else {}
    label = f"{source.get('arch', '')}/{source.get('pretrained', '')}"
    return {
        "kind": "clip",
        "name": name,
        "source": hub.get("repo") or (label if source.get("type") == "open_clip" else "tiny"),
        "revision": source.get("revision") or "main",
        "pin": hub.get("sha") or "",
        "status": "pinned" if hub.get("sha") else "not fetched or not from the hub",
    }


def _tsv_row(name: str, source: dict, path: Path) -> dict[str, Any]:
    expected = source.get("md5") or ""
    if not path.is_file():
        status, pin = "not fetched", ""
    else:
        pin = file_digest(path, "md5")
        status = "md5 ok" if pin == expected else ("md5 MISMATCH" if expected else "no md5 given")
    return {
        "kind": "vqa_tsv",
        "name": name,
        "source": source.get("url", source.get("type", "")),
        "revision": expected,
        "pin": pin,
        "status": status,
    }


def provenance_spec(config: dict) -> dict:
    """The part of a study config the provenance table reads (sources only, labels left out),
    in the config's own layout, so that a relabelled config does not rerun the table."""
    sections = ("clip_models", "llms", "base_vlms", "vqa_benchmarks", "train_data")
    spec = {
        section: {name: {"source": entry["source"]} for name, entry in config[section].items()}
        for section in sections
    }
    spec["hub_vlms"] = {
        name: {key: vlm[key] for key in HUB_VLM_KEYS if key in vlm}
        for name, vlm in config["hub_vlms"].items()
    }
    return spec


def provenance_table(config: dict, root: str | os.PathLike = ".") -> pl.DataFrame:
    """One row per CLIP model, LLM, base VLM, hub VLM (and separate tokenizer), VQA benchmark
    and training-data source of ``config`` (a study config or its ``provenance_spec``), read
    from the workflow's folders under ``root``: (kind, name, source, revision asked for, pin,
    status)."""
    root = Path(root)
    rows = []
    for name, clip in config["clip_models"].items():
        if clip["source"]["type"] == "random_init":
            rows.append(_local_row("clip", name, "random_init"))
        else:
            rows.append(_clip_row(name, clip["source"], root / paths.CLIP.format(clip=name)))
    # (config section, row kind, the folder a hub source is fetched into)
    fetched = (
        ("llms", "llm", lambda name: paths.LLM.format(llm=name)),
        ("base_vlms", "base_vlm", lambda name: paths.BASE_VLM.format(base=name)),
    )
    for section, kind, folder_of in fetched:
        for name, entry in config[section].items():
            source = entry["source"]
            if source["type"] == "hub":
                rows.append(_hub_row(kind, name, source, root / folder_of(name)))
            else:
                rows.append(_local_row(kind, name, source["type"]))
    for name, vlm in config["hub_vlms"].items():
        if "repo" not in vlm:
            rows.append(_local_row("hub_vlm", name, "tiny"))
            continue
        folder = root / paths.HUB_VLM.format(hub=name)
        rows.append(_hub_row("hub_vlm", name, vlm, folder))
        if "tokenizer" in vlm:
            record = folder / SOURCE_FILE
            tokenizer = read_json(record).get("tokenizer", {}) if record.is_file() else {}
            sha = tokenizer.get("sha")
            status = "pinned" if sha else "not fetched"
            rows.append(_repo_row("tokenizer", name, vlm["tokenizer"], sha, status))
    for name, bench in config["vqa_benchmarks"].items():
        source = bench["source"]
        if source["type"] == "vlmeval_tsv":
            rows.append(_tsv_row(name, source, root / paths.VQA_TSV.format(vqa=name)))
        else:
            rows.append(_local_row("vqa_benchmark", name, source["type"]))
    for name, data in config["train_data"].items():
        source = data["source"]
        if "repo" in source:
            folder = root / paths.TRAIN_RAW.format(data=name)
            rows.append(_hub_row("train_data", name, source, folder))
        else:
            rows.append(_local_row("train_data", name, source["type"]))
    return pl.DataFrame(rows, schema={c: pl.String for c in COLUMNS})


def write_provenance(config: dict, out: str | os.PathLike, root: str | os.PathLike = ".") -> int:
    """Write ``provenance_table`` as CSV to ``out`` (atomically); returns its row count."""
    table = provenance_table(config, root)
    with atomic_path(out) as tmp:
        table.write_csv(tmp)
    return table.height
