"""Where every model and data set of a study came from: one row per source, its pin.

Fetches record their pins as they download: hub folders (``fgvlm.models.hub``,
``fgvlm.models.llm``) the commit a branch resolved to and each file's sha256
(``fgvlm_source.json``); CLIP folders the hub commit and sha256 of their weights (``clip.json``);
VLMEvalKit TSVs are checked against the md5 the config gives. ``provenance_table`` gathers
them into one table (``fgvlm provenance`` writes it to ``results/tables/provenance.csv``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import polars as pl

from fgvlm import paths
from fgvlm.io import atomic_path, read_json

COLUMNS = ("kind", "name", "source", "revision", "pin", "status")
SOURCE_FILE = "fgvlm_source.json"  # fgvlm.models.hub.SOURCE_FILE (models/ is not imported here)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_row(kind: str, name: str, source: dict, folder: Path) -> dict[str, Any]:
    """A hub repository's row: the commit recorded in the fetched folder, if fetched."""
    record = folder / SOURCE_FILE
    sha = read_json(record).get("sha") if record.is_file() else None
    status = "pinned" if sha else ("fetched, commit unknown" if record.is_file() else "not fetched")
    return {
        "kind": kind,
        "name": name,
        "source": source.get("repo", ""),
        "revision": source.get("revision", "main"),
        "pin": sha or "",
        "status": status,
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
        pin = _md5(path)
        status = "md5 ok" if pin == expected else ("md5 MISMATCH" if expected else "no md5 given")
    return {
        "kind": "vqa_tsv",
        "name": name,
        "source": source.get("url", source.get("type", "")),
        "revision": expected,
        "pin": pin,
        "status": status,
    }


def provenance_table(config: dict, root: str | os.PathLike = ".") -> pl.DataFrame:
    """One row per hub model, CLIP model and VQA TSV of ``config``, read from the workflow's
    folders under ``root``: (kind, name, source, revision asked for, pin, status)."""
    root = Path(root)
    rows = []
    for name, clip in config["clip_models"].items():
        rows.append(_clip_row(name, clip["source"], root / paths.CLIP.format(clip=name)))
    for name, llm in (config.get("llms") or {}).items():
        if llm["source"]["type"] == "hub":
            folder = root / paths.LLM.format(llm=name)
            rows.append(_hub_row("llm", name, llm["source"], folder))
    for name, base in (config.get("base_vlms") or {}).items():
        if base["source"]["type"] == "hub":
            folder = root / paths.BASE_VLM.format(base=name)
            rows.append(_hub_row("base_vlm", name, base["source"], folder))
    for name, vlm in (config.get("hub_vlms") or {}).items():
        if "repo" in vlm:
            folder = root / paths.HUB_VLM.format(hub=name)
            rows.append(_hub_row("hub_vlm", name, vlm, folder))
            if "tokenizer" in vlm:
                record = folder / SOURCE_FILE
                tokenizer = read_json(record).get("tokenizer", {}) if record.is_file() else {}
                rows.append(
                    {
                        **_hub_row("tokenizer", name, vlm["tokenizer"], Path("/nonexistent")),
                        "pin": tokenizer.get("sha") or "",
                        "status": "pinned" if tokenizer.get("sha") else "not fetched",
                    }
                )
    for name, bench in (config.get("vqa_benchmarks") or {}).items():
        source = bench["source"]
        if source.get("type") == "vlmeval_tsv":
            rows.append(_tsv_row(name, source, root / paths.VQA_TSV.format(vqa=name)))
    return pl.DataFrame(rows, schema={c: pl.String for c in COLUMNS})


def write_provenance(config: dict, out: str | os.PathLike, root: str | os.PathLike = ".") -> int:
    """Write ``provenance_table`` as CSV to ``out`` (atomically); returns its row count."""
    table = provenance_table(config, root)
    with atomic_path(out) as tmp:
        table.write_csv(tmp)
    return table.height
