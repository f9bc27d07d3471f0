"""Stage functions (what rules and the CLI call): bad input fails early, naming the file, and
leaves no output that looks complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from fgvlm import stages
from fgvlm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, corrupt: str | None = None) -> None:
    for cls in ("red_fox", "arctic_fox"):
        for i in range(3):
            path = root / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(path)
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def outputs(tmp: Path) -> dict[str, Path]:
    out = tmp / "out"
    return {
        "manifest": out / "manifest.parquet",
        "classes": out / "classes.json",
        "candidates": out / "candidates.json",
        "stats": out / "manifest_stats.json",
    }


def test_image_folder_manifest(tmp_path):
    make_folder(tmp_path / "imgs")
    spec = {"source": {"type": "image_folder", "root": str(tmp_path / "imgs"), "split": "test"}}
    stages.build_manifest(spec, **outputs(tmp_path), raw_dir=tmp_path / "raw")
    assert pl.read_parquet(outputs(tmp_path)["manifest"]).height == 6
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["arctic fox", "red fox"]
    assert (tmp_path / "out" / "candidates.json").read_text().strip() == "null"
    stats = json.loads((tmp_path / "out" / "manifest_stats.json").read_text())
    assert stats == {
        "images": 6, "classes": 2, "classes_listed": 2, "expected": None, "matches": True,
    }  # fmt: skip


def test_corrupt_image_fails_naming_the_file_and_writes_nothing(tmp_path):
    make_folder(tmp_path / "imgs", corrupt="red_fox/1.png")
    spec = {"source": {"type": "image_folder", "root": str(tmp_path / "imgs"), "split": "test"}}
    with pytest.raises(ValueError, match=r"red_fox/1\.png"):
        stages.build_manifest(spec, **outputs(tmp_path), raw_dir=tmp_path / "raw")
    assert not any(path.exists() for path in outputs(tmp_path).values())
    leftovers = list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else []
    assert leftovers == []


def test_cli_validates_configs(capsys):
    assert main(["validate-config", str(ROOT / "config" / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "24 ablation rows (22 trained, 13 pretraining jobs), 15 hub VLMs" in out


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "config" / "demo.yaml").read_text().replace("negatives: 4", "negatives: 0")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fgvlm.cli", "validate-config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "bad.yaml: miner.negatives: 0 is less than the minimum of 1" in proc.stderr
