"""Provenance: every fetched model's commit and every VQA TSV's md5 in one table."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl

from fgvlm import cli, paths, stages
from fgvlm.config import load_config, trained_rows
from fgvlm.data import conversations as conv
from fgvlm.data.conversations import download_training_data
from fgvlm.io import write_json
from fgvlm.provenance import provenance_spec, provenance_table

PAPER = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
DEMO = PAPER.with_name("demo.yaml")


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


def test_stage_marks_the_demos_local_sources_as_local(tmp_path):
    """The embedded demo fetches nothing: every source has a row saying it is built here."""
    config = load_config(DEMO)
    out = tmp_path / paths.PROVENANCE
    rows = stages.provenance(provenance_spec(config), out, root=tmp_path)
    table = pl.read_csv(out, infer_schema=False)
    sections = ("clip_models", "llms", "base_vlms", "hub_vlms", "vqa_benchmarks", "train_data")
    assert rows == table.height == sum(len(config[s]) for s in sections)
    assert table["status"].str.starts_with("local (").all(), table
    assert table.filter(pl.col("kind") == "train_data")["name"].to_list() == list(
        config["train_data"]
    )


def test_stage_shows_the_pin_of_every_fetched_training_source(tmp_path, monkeypatch):
    """Training data fetched through the hub (stand-in) is pinned in the table: the commit
    ``main`` resolved to; an unfetched source says so."""
    config = load_config(PAPER)
    hub_sources = {n: d["source"] for n, d in config["train_data"].items() if "repo" in d["source"]}
    commits = {source["repo"]: f"{i + 1:x}" * 40 for i, source in enumerate(hub_sources.values())}

    def download(*, repo_id, filename, repo_type, revision, local_dir):
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        meta = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{filename}.metadata"
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(f"{commits[repo_id]}\netag\n0\n")
        return str(path)

    monkeypatch.setattr(conv, "hf_hub_download", download)
    fetched, unfetched = list(hub_sources)[:-1], list(hub_sources)[-1]
    for name in fetched:
        download_training_data(hub_sources[name], tmp_path / paths.TRAIN_RAW.format(data=name))
    out = tmp_path / "provenance.csv"
    stages.provenance(provenance_spec(config), out, root=tmp_path)
    rows = {
        r["name"]: r
        for r in pl.read_csv(out, infer_schema=False)
        .filter(pl.col("kind") == "train_data")
        .to_dicts()
    }
    assert set(rows) == set(config["train_data"])
    for name in fetched:
        repo = hub_sources[name]["repo"]
        assert (rows[name]["source"], rows[name]["revision"]) == (repo, "main")
        assert (rows[name]["pin"], rows[name]["status"]) == (commits[repo], "pinned")
    assert rows[unfetched]["status"] == "not fetched"


def test_spec_leaves_labels_out_and_keeps_the_table(tmp_path):
    """A relabelled config gives the same spec (the rule's params), and the full config and its
    spec give the same table."""
    config = load_config(PAPER)
    relabelled = {
        **config,
        "hub_vlms": {k: {**v, "label": f"{k}!"} for k, v in config["hub_vlms"].items()},
        "train_data": {k: {**v, "label": k.upper()} for k, v in config["train_data"].items()},
    }
    assert provenance_spec(relabelled) == provenance_spec(config)
    spec = provenance_spec(config)
    assert provenance_table(spec, tmp_path).equals(provenance_table(config, tmp_path))


def test_rule_inputs_are_the_fetched_folders(tmp_path):
    """The provenance rule's inputs: the paper's hub-fetched folders and TSVs, and the shards of
    the training sources a row uses (not the unused alternative); the demo fetches nothing."""
    config = load_config(PAPER)
    inputs = paths.provenance_inputs(config)
    assert len(inputs["hub"]) == 15 and len(inputs["llm"]) == len(config["llms"])
    assert inputs["tsv"] == [paths.VQA_TSV.format(vqa=v) for v in config["vqa_benchmarks"]]
    used = {row[k] for row in trained_rows(config) for k in ("pt_data", "ft_data")}
    assert inputs["train"] == [
        paths.TRAIN_SHARDS.format(data=n) for n in config["train_data"] if n in used
    ]
    assert len(inputs["train"]) < len(config["train_data"])
    assert all(files == [] for files in paths.provenance_inputs(load_config(DEMO)).values())
