"""Provenance: every fetched model's commit and every VQA TSV's md5 in one table."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fgvlm import cli, paths
from fgvlm.config import load_config
from fgvlm.io import write_json
from fgvlm.provenance import provenance_table

PAPER = Path(__file__).resolve().parents[1] / "config" / "config.yaml"


def test_table_reads_the_recorded_commits_and_checks_tsv_md5(tmp_path):
    config = load_config(PAPER)
    folder = tmp_path / paths.HUB_VLM.format(hub="cogvlm_chat")
    folder.mkdir(parents=True)
    write_json(
        {
            "repo": "THUDM/cogvlm-chat-hf",
            "revision": "main",
            "sha": "a" * 40,
            "tokenizer": {"repo": "lmsys/vicuna-7b-v1.5", "revision": "main", "sha": "b" * 40},
        },
        folder / "fgvlm_source.json",
    )
    tsv = tmp_path / paths.VQA_TSV.format(vqa="mmstar")
    tsv.parent.mkdir(parents=True)
    tsv.write_bytes(b"index\tquestion\n")
    table = provenance_table(config, tmp_path)
    rows = {(r["kind"], r["name"]): r for r in table.to_dicts()}
    assert rows[("hub_vlm", "cogvlm_chat")]["pin"] == "a" * 40
    assert rows[("hub_vlm", "cogvlm_chat")]["status"] == "pinned"
    assert rows[("tokenizer", "cogvlm_chat")]["pin"] == "b" * 40
    assert rows[("hub_vlm", "llava15_7b")]["status"] == "not fetched"
    assert rows[("vqa_tsv", "mmstar")]["pin"] == hashlib.md5(b"index\tquestion\n").hexdigest()
    assert rows[("vqa_tsv", "mmstar")]["status"] == "md5 MISMATCH"
    # every hub VLM, LLM, CLIP model and TSV of the paper has a row
    assert len(table.filter(table["kind"] == "hub_vlm")) == 15
    assert len(table.filter(table["kind"] == "llm")) == len(config["llms"])


def test_cli_writes_the_csv(tmp_path, capsys):
    out = tmp_path / "provenance.csv"
    code = cli.main(
        ["provenance", "--config", str(PAPER), "--root", str(tmp_path), "--out", str(out)]
    )
    assert code == 0
    assert out.read_text().splitlines()[0] == "kind,name,source,revision,pin,status"
    assert "sources" in capsys.readouterr().out
