"""Training-image downloads against a loopback HTTP server: checked archives, URL lists, resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from _loopback import Route, image_bytes, serve

from fgvlm import config as study
from fgvlm import paths, stages
from fgvlm.data import conversations as conv
from fgvlm.data.archives import fetch_archive
from fgvlm.data.download import ChecksumError, DownloadError, download_file
from fgvlm.data.fetch import fetch_url_list, fetched_images
from fgvlm.data.shards import ConversationShards, read_index

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _archive_spec(url: str, data: bytes | None = None, **extra) -> dict:
    spec = {"url": url, "md5": None, "size": None, "subdir": "", "keep_archive": False}
    if data is not None:
        spec.update(md5=_md5(data), size=len(data))
    return {**spec, **extra}


# ---------------------------------------------------------------- checked downloads
def test_download_checks_reuses_and_cleans_partials(tmp_path: Path) -> None:
    body = b"x" * 5000
    routes = {"f.bin": Route(body), "truncated.bin": Route(body[:100])}
    dest = tmp_path / "f.bin"
    stale = [tmp_path / ".f.bin.part", tmp_path / ".f.bin.tmp-killed"]
    stale[0].write_bytes(b"half")
    stale[1].mkdir()
    with serve(routes) as server:
        download_file(server.url("f.bin"), dest, md5=_md5(body), size=len(body))
        assert dest.read_bytes() == body
        assert not any(p.exists() for p in stale)  # a killed run's partials are gone
        download_file(server.url("f.bin"), dest, md5=_md5(body), size=len(body))
        assert server.requests["f.bin"] == 1  # verified and reused

        bad = tmp_path / "bad.bin"
        with pytest.raises(ChecksumError, match="md5"):
            download_file(server.url("f.bin"), bad, md5="0" * 32)
        with pytest.raises(ChecksumError, match="100 bytes, expected 5000"):
            download_file(server.url("truncated.bin"), bad, md5=None, size=len(body))
        with pytest.raises(DownloadError, match="HTTP 404"):
            download_file(server.url("gone.bin"), bad, md5=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # nothing unverified stays


def test_file_urls_are_supported_and_other_schemes_refused(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror" / "images.zip"
    mirror.parent.mkdir()
    data = _zip({"a/1.jpg": image_bytes(1)})
    mirror.write_bytes(data)
    got = download_file(mirror.as_uri(), tmp_path / "dl" / "images.zip", md5=_md5(data))
    assert got.read_bytes() == data
    with pytest.raises(DownloadError, match="unsupported URL scheme 'ftp'"):
        download_file("ftp://example.org/x.zip", tmp_path / "x.zip", md5=None)
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["train_data"]["llava_ft"]["source"]["archives"]["coco"]["url"] = "ftp://mirror/x.zip"
    with pytest.raises(study.ConfigError, match="archives.coco.url"):
        study.validate(cfg)


def test_archive_extracted_once_and_truncated_archive_refused(tmp_path: Path) -> None:
    data = _zip({"train2017/000000000001.jpg": image_bytes(1)})
    routes = {"train2017.zip": Route(data), "cut.zip": Route(data[: len(data) // 2])}
    with serve(routes) as server:
        spec = _archive_spec(server.url("train2017.zip"), data)
        record = fetch_archive(spec, tmp_path / "coco", download_dir=tmp_path / "dl")
        assert record["files"] == 1 and record["md5"] == _md5(data)
        assert (tmp_path / "coco/train2017/000000000001.jpg").read_bytes() == image_bytes(1)
        assert not (tmp_path / "dl" / "train2017.zip").exists()  # keep_archive: false

        with pytest.raises(ChecksumError, match="truncated or not a zip"):
            fetch_archive(
                _archive_spec(server.url("cut.zip")), tmp_path / "x", download_dir=tmp_path / "dl"
            )
    assert not (tmp_path / "x").exists()
    assert list((tmp_path / "dl").iterdir()) == []  # the truncated download is not kept


# ---------------------------------------------------------------- URL lists
def _url_routes() -> dict[str, Route]:
    return {
        "a.jpg": Route(image_bytes(0)),
        "b.png": Route(image_bytes(1, "PNG")),
        "gone.jpg": Route(b"no", 404),
        "flaky.jpg": Route(b"busy", 500),
        "slow.jpg": Route(image_bytes(2), delay=1.0),
        "page.jpg": Route(b"<html>not an image</html>"),
    }


def test_url_list_report_is_exact_and_a_rerun_fetches_nothing(tmp_path: Path) -> None:
    with serve(_url_routes()) as server:
        items = [(Path(p).stem, server.url(p)) for p in _url_routes()]
        kwargs = dict(threads=3, part_size=4, timeout=0.3, retries=1, backoff=0, name="t")
        report = fetch_url_list(items, tmp_path / "parts", **kwargs)
        assert {k: report[k] for k in ("tried", "kept", "dead", "undecodable")} == {
            "tried": 6,
            "kept": 2,
            "dead": {"http_404": 1, "http_500": 1, "timeout": 1},
            "undecodable": 1,
        }
        assert report["kept_fraction"] == pytest.approx(2 / 6, abs=1e-6)
        # permanent errors are not retried; transient ones are, once
        assert server.requests == {
            "a.jpg": 1,
            "b.png": 1,
            "gone.jpg": 1,
            "flaky.jpg": 2,
            "slow.jpg": 2,
            "page.jpg": 1,
        }
        before = dict(server.requests)
        again = fetch_url_list(items, tmp_path / "parts", **kwargs)
        assert server.requests == before and again["fetched_now"] == 0
        assert {k: v for k, v in again.items() if k not in ("seconds", "fetched_now")} == {
            k: v for k, v in report.items() if k not in ("seconds", "fetched_now")
        }
    images = fetched_images(tmp_path / "parts")
    assert sorted(images) == ["a", "b"]
    assert images["b"].read() == image_bytes(1, "PNG")


def test_url_list_in_several_processes(tmp_path: Path) -> None:
    routes = {f"{i}.jpg": Route(image_bytes(i)) for i in range(5)}
    with serve(routes) as server:
        items = [(f"k{i}", server.url(f"{i}.jpg")) for i in range(6)]  # the last is dead
        report = fetch_url_list(items, tmp_path, processes=2, threads=2, part_size=2, retries=0)
        assert server.requests == {**{f"{i}.jpg": 1 for i in range(6)}}
    assert (report["kept"], report["dead"]) == (5, {"http_404": 1})
    assert fetched_images(tmp_path)["k4"].read() == image_bytes(4)


KILLED_RUN = """
import sys
from fgvlm.data.fetch import fetch_url_list
items = [(f"k{i:02d}", f"{sys.argv[1]}/img{i:02d}.jpg") for i in range(12)]
fetch_url_list(items, sys.argv[2], threads=1, part_size=2, timeout=5, retries=0, name="kill")
"""


def test_a_kill_mid_fetch_resumes_without_refetching_what_was_kept(tmp_path: Path) -> None:
    routes = {f"img{i:02d}.jpg": Route(image_bytes(i), delay=0.15) for i in range(12)}
    parts = tmp_path / "parts"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with serve(routes) as server:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_RUN, server.base, str(parts)], env=env
        )
        deadline = time.monotonic() + 60
        while not (parts / "part-000001.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        done = sorted(p.stem for p in parts.glob("part-*.json"))
        assert 2 <= len(done) < 6  # killed mid-way
        kept_before = dict(server.requests)
        items = [(f"k{i:02d}", server.url(f"img{i:02d}.jpg")) for i in range(12)]
        report = fetch_url_list(items, parts, threads=1, part_size=2, timeout=5, retries=0)
        assert report["kept"] == 12 and report["fetched_now"] == 12 - 2 * len(done)
        for i in range(2 * len(done)):  # complete parts are never fetched again
            assert server.requests[f"img{i:02d}.jpg"] == kept_before[f"img{i:02d}.jpg"] == 1
    assert not list(parts.glob(".*"))  # the killed run's temporary part is gone
    assert sorted(fetched_images(parts)) == [f"k{i:02d}" for i in range(12)]


# ---------------------------------------------------------------- the rules, end to end
def _snakemake(workdir: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "-c1"]
    return subprocess.run(
        [*command, f"--configfile={config}", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )


def _study(tmp_path: Path, server) -> Path:
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    for model in cfg["clip_models"].values():
        if model["source"]["type"] == "random_init":
            model["source"]["model_config"] = str(ROOT / model["source"]["model_config"])
    cfg["train_data"]["mix"] = {
        "stage": "finetune",
        "source": {
            "type": "llava_instruct",
            "repo": "liuhaotian/LLaVA-Instruct-150K",
            "annotations": "mix.json",
            "archives": {
                "coco": {**_archive_spec(server.url("train2017.zip")), "prefix": "coco"},
                "vg1": {
                    **_archive_spec(server.url("vg1.zip")),
                    "prefix": "vg/VG_100K",
                    "subdir": "VG_100K",
                },
            },
            "url_lists": {
                "ocr_vqa": {
                    "url": server.url("dataset.json"),
                    "md5": None,
                    "size": None,
                    "format": "ocr_vqa",
                    "prefix": "ocr_vqa/images",
                    "fetch": {"threads": 2, "part_size": 2, "timeout": 0.3, "retries": 0},
                }
            },
            "image_roots": {"gqa": str(tmp_path / "mine" / "gqa")},  # already on the cluster
            "missing_images": "drop",
        },
    }
    out = tmp_path / "study.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _mix_routes() -> dict[str, Route]:
    ocr = {
        "B001": {"imageURL": "/covers/B001.jpg"},
        "B002": {"imageURL": "/covers/B002.jpg"},  # dead
        "B003": {"imageURL": "/covers/B003.gif"},
    }
    gif = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (4, 4), (9, 9, 9)).save(gif, format="GIF")
    return {
        "train2017.zip": Route(_zip({"train2017/1.jpg": image_bytes(1)})),
        "vg1.zip": Route(_zip({"VG_100K/5.jpg": image_bytes(5)})),
        "dataset.json": Route(json.dumps(ocr).encode()),
        "covers/B001.jpg": Route(image_bytes(7)),
        "covers/B003.gif": Route(gif.getvalue()),
    }


def _mix_annotations(path: Path) -> None:
    turn = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]
    images = [
        "coco/train2017/1.jpg",
        "vg/VG_100K/5.jpg",
        "gqa/images/3.jpg",
        "ocr_vqa/images/B001.jpg",
        "ocr_vqa/images/B002.jpg",
        "ocr_vqa/images/B003.jpg",
    ]
    records = [
        {"id": f"s{i}", "image": image, "conversations": turn} for i, image in enumerate(images)
    ]
    records.append({"id": "text", "conversations": turn})
    path.write_text(json.dumps(records))


def test_rules_fetch_every_image_source_and_shards_are_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mine" / "gqa" / "images").mkdir(parents=True)
    (tmp_path / "mine" / "gqa" / "images" / "3.jpg").write_bytes(image_bytes(3))
    routes = _mix_routes()
    with serve(routes) as server:
        ocr = json.loads(routes["dataset.json"].body)
        for entry in ocr.values():
            entry["imageURL"] = server.url(entry["imageURL"])
        server.routes["dataset.json"] = Route(json.dumps(ocr).encode())
        config = _study(tmp_path, server)
        targets = [
            "data/raw/train/mix/images/coco",
            "data/raw/train/mix/images/vg1",
            "data/raw/train/mix/fetched/ocr_vqa.json",
        ]
        inputs = paths.train_data_inputs(study.load_config(config), "mix")
        assert inputs["archives"] == targets[:2]  # gqa is the user's folder: not fetched
        assert inputs["fetched"] == targets[2:]
        run = _snakemake(tmp_path, config, "-c2", *targets)
        assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "data/raw/train/mix/fetched/ocr_vqa.json").read_text())
    assert (report["tried"], report["kept"], report["dead"]) == (3, 2, {"http_404": 1})
    assert "fetch ocr_vqa" in (tmp_path / "logs/fetch_train_urls/mix/ocr_vqa.log").read_text()

    monkeypatch.chdir(tmp_path)
    annotations = tmp_path / "fixtures" / "mix.json"
    annotations.parent.mkdir()
    _mix_annotations(annotations)
    monkeypatch.setattr(conv, "_hub_file", lambda source, name, dest: annotations)
    source = study.load_config(config)["train_data"]["mix"]["source"]
    index = stages.shard_train_data(
        source,
        "shards/train/mix",
        raw_dir="data/raw/train/mix",
        archives=targets[:2],
        fetched=targets[2:],
        samples_per_shard=3,
    )
    assert index["total"] == 6  # 7 samples less the dead cover
    images_report = json.loads((tmp_path / "data/raw/train/mix/images_report.json").read_text())
    assert images_report == {"samples": 6, "missing": {"ocr_vqa": 1}, "dropped": 1}
    shards = ConversationShards(Path("shards/train/mix"), rank=0, world_size=1, seed=0)
    seen = {record["id"]: image for record, image in shards}
    assert sorted(seen) == ["s0", "s1", "s2", "s3", "s5", "text"]
    assert seen["text"] is None and all(seen[k].mode == "RGB" for k in seen if k != "text")
    assert len(read_index(Path("shards/train/mix"))["shards"]) == 2

    source["missing_images"] = "fail"
    with pytest.raises(FileNotFoundError, match=r"ocr_vqa/images/B002\.jpg.*'ocr_vqa': 1"):
        stages.shard_train_data(
            source,
            "shards/x",
            raw_dir="data/raw/train/mix",
            archives=targets[:2],
            fetched=targets[2:],
            samples_per_shard=3,
        )
