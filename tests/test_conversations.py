"""Training data: source readers, safe unzip, PixMo fetch cache, conversation shards, streaming."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from fgvlm.data import conversations as conv
from fgvlm.data.archives import extract_zip
from fgvlm.data.conversations import (
    caption_conversation,
    download_training_data,
    pixmo_url_list,
    read_llava_instruct,
    read_llava_pretrain,
    read_pixmo_cap,
    read_synthetic_captions,
    read_synthetic_instructions,
)
from fgvlm.data.download import ChecksumError
from fgvlm.data.fetch import FetchFailed, fetch_url_list, fetched_images, url_key
from fgvlm.data.shards import (
    conversation_dataset,
    count_samples,
    rank_batches,
    rank_range,
    read_index,
    write_conversation_shards,
)
from fgvlm.data.synthetic import generate_world
from fgvlm.hub_pins import is_commit


def rank_size(shard_dir: Path, rank: int, world_size: int) -> int:
    """Samples ``rank`` reads per epoch of a shard directory."""
    start, end = rank_range(count_samples(shard_dir), rank=rank, world_size=world_size)
    return end - start


# 3 DataLoader workers on a 2-core machine: torch warns, the tests need the third worker
THREE_WORKERS = pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker")


def _image_bytes(seed: int, fmt: str = "JPEG", size: int = 6) -> bytes:
    """A tiny random image encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def _no_temp_left(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------- LLaVA-Pretrain
PRETRAIN_IMAGES = ("00000/000000001.jpg", "00000/000000002.jpg", "00001/000010003.jpg")
PRETRAIN_CAPTIONS = (
    "front panel bracket cover for suzuki",
    "the living room of a house",
    "a dog on the beach",
)


def _pretrain_files(root: Path) -> tuple[Path, Path]:
    """A 558k-style annotation list and a real images.zip (with folder entries) of tiny JPEGs."""
    annotations = [
        {
            "id": int(Path(image).stem) if i == 0 else Path(image).stem,  # ints occur in the wild
            "image": image,
            "conversations": [
                {"from": "human", "value": f"Give a brief description of the image.\n<image>{i}"},
                {"from": "gpt", "value": caption},
            ],
        }
        for i, (image, caption) in enumerate(zip(PRETRAIN_IMAGES, PRETRAIN_CAPTIONS, strict=True))
    ]
    json_path = root / "blip_laion_cc_sbu_558k.json"
    json_path.write_text(json.dumps(annotations))
    zip_path = root / "images.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("00000/", "")
        for i, image in enumerate(PRETRAIN_IMAGES):
            archive.writestr(image, _image_bytes(i))
    return json_path, zip_path


def test_llava_pretrain_unzip_and_caption_pairs(tmp_path: Path) -> None:
    json_path, zip_path = _pretrain_files(tmp_path)
    images = extract_zip(zip_path, tmp_path / "images")
    assert _no_temp_left(tmp_path)
    samples = list(read_llava_pretrain(json_path, images))
    assert [r["id"] for r, _ in samples] == ["1", "000000002", "000010003"]
    for (record, path), image, caption in zip(
        samples, PRETRAIN_IMAGES, PRETRAIN_CAPTIONS, strict=True
    ):
        # only the caption survives, as the plain-template pair
        assert record == {
            "id": record["id"],
            "image": image,
            "conversations": [
                {"from": "human", "value": "<image>"},
                {"from": "gpt", "value": caption},
            ],
        }
        assert path == images / image
        assert path.read_bytes() == _image_bytes(PRETRAIN_IMAGES.index(image))


@pytest.mark.parametrize("evil", ["../evil.jpg", "00000/../../evil.jpg", "/tmp/abs.jpg", "C:x.jpg"])
def test_extract_zip_refuses_members_outside_dest(tmp_path: Path, evil: str) -> None:
    zip_path = tmp_path / "images.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("00000/ok.jpg", _image_bytes(0))
        archive.writestr(evil, b"payload")
    dest = tmp_path / "out" / "images"
    with pytest.raises(ValueError, match=f"member '{evil}'"):
        extract_zip(zip_path, dest)
    assert not dest.exists()  # nothing extracted, not even the safe member
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "out" / "evil.jpg").exists()
    assert _no_temp_left(tmp_path)


def test_llava_pretrain_missing_image_names_sample_and_path(tmp_path: Path) -> None:
    json_path, zip_path = _pretrain_files(tmp_path)
    images = extract_zip(zip_path, tmp_path / "images")
    (images / PRETRAIN_IMAGES[1]).unlink()
    with pytest.raises(FileNotFoundError, match=r"'000000002'.*00000/000000002\.jpg.*1 of 3"):
        read_llava_pretrain(json_path, images)  # raised at the call, before any sample


# ---------------------------------------------------------------- PixMo-Cap
def _pixmo_parquet(path: Path) -> list[str]:
    """A PixMo-Cap-style parquet with 5 rows: image_url, caption, transcripts."""
    urls = [f"https://img.example.org/{i}.jpg" for i in range(5)]
    pl.DataFrame(
        {
            "image_url": urls,
            "caption": [f"A long, detailed caption number {i}." for i in range(5)],
            "transcripts": [[f"um so this is image {i}", "uh yes"] for i in range(5)],
        }
    ).write_parquet(path)
    return urls


def test_pixmo_reads_its_fetched_url_list(tmp_path: Path) -> None:
    parquet = tmp_path / "train-00000-of-00004.parquet"
    urls = _pixmo_parquet(parquet)
    dead, garbage = urls[1], urls[3]

    def fetch(url: str, timeout: float) -> bytes:
        if url == dead:
            raise FetchFailed("http_404", "gone", transient=False)
        if url == garbage:
            return b"<html>not an image</html>"
        return _image_bytes(urls.index(url), "PNG" if url.endswith("2.jpg") else "JPEG")

    items = pixmo_url_list(parquet)
    assert items == [(url_key(u), u) for u in sorted(urls)]
    report = fetch_url_list(items, tmp_path / "fetched", fetch=fetch, threads=3, part_size=2)
    assert (report["kept"], report["dead"], report["undecodable"]) == (3, {"http_404": 1}, 1)
    samples = list(read_pixmo_cap(parquet, fetched_images(tmp_path / "fetched")))
    assert [r["id"] for r, _ in samples] == ["pixmo-0000000", "pixmo-0000002", "pixmo-0000004"]
    for record, image in samples:
        i = int(record["id"].split("-")[1])
        assert record == {
            "id": record["id"],
            "image": urls[i],
            "conversations": caption_conversation(f"A long, detailed caption number {i}."),
        }
        assert image.read() == _image_bytes(i, "PNG" if i == 2 else "JPEG")


def test_pixmo_missing_column_names_file(tmp_path: Path) -> None:
    parquet = tmp_path / "p.parquet"
    pl.DataFrame({"image_url": ["u"], "transcripts": [["t"]]}).write_parquet(parquet)
    with pytest.raises(ValueError, match=r"p\.parquet: no column 'caption'"):
        read_pixmo_cap(parquet, {})


# ---------------------------------------------------------------- LLaVA-1.5 mix665k
def _instruct_files(root: Path) -> tuple[Path, dict[str, Path]]:
    """A 665k-style list with COCO and GQA images, a repeated id and a text-only sample."""
    roots = {"coco": root / "coco", "gqa": root / "gqa"}
    files = {"coco/train2017/000000033471.jpg": 0, "gqa/images/2354786.jpg": 1}
    for relative, seed in files.items():
        head, rest = relative.split("/", 1)
        (roots[head] / rest).parent.mkdir(parents=True, exist_ok=True)
        (roots[head] / rest).write_bytes(_image_bytes(seed))
    turn = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A."}]
    annotations = [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": turn},
        {"id": "2354786", "image": "gqa/images/2354786.jpg", "conversations": turn},
        {
            "id": "i6IyJda_0",
            "model": "",
            "conversations": [
                {"from": "human", "value": "Write a haiku."},
                {"from": "gpt", "value": "Leaves fall."},
                {"from": "human", "value": "Another?"},
                {"from": "gpt", "value": "Snow."},
            ],
        },
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": turn},
    ]
    json_path = root / "llava_v1_5_mix665k.json"
    json_path.write_text(json.dumps(annotations))
    return json_path, roots


def test_llava_instruct_roots_and_text_only(tmp_path: Path) -> None:
    json_path, roots = _instruct_files(tmp_path)
    samples = list(read_llava_instruct(json_path, roots))
    assert [r["id"] for r, _ in samples] == ["000000033471", "2354786", "i6IyJda_0", "000000033471"]
    assert samples[0][1] == roots["coco"] / "train2017/000000033471.jpg"
    assert samples[1][1] == roots["gqa"] / "images/2354786.jpg"
    text_record, text_source = samples[2]
    assert text_source is None and "image" not in text_record
    assert [t["value"] for t in text_record["conversations"]] == [
        "Write a haiku.",
        "Leaves fall.",
        "Another?",
        "Snow.",
    ]
    assert samples[1][0] == {
        "id": "2354786",
        "image": "gqa/images/2354786.jpg",
        "conversations": json.loads(json_path.read_text())[1]["conversations"],
    }


def test_llava_instruct_missing_image_or_root(tmp_path: Path) -> None:
    json_path, roots = _instruct_files(tmp_path)
    (roots["gqa"] / "images/2354786.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"'2354786'.*gqa/images/2354786\.jpg"):
        read_llava_instruct(json_path, roots)  # at the call: all paths checked first
    with pytest.raises(ValueError, match=r"'2354786'.*'gqa/images/2354786\.jpg' is under no"):
        read_llava_instruct(json_path, {"coco": roots["coco"]})


def test_llava_instruct_longest_root_prefix_wins(tmp_path: Path) -> None:
    json_path, roots = _instruct_files(tmp_path)
    train2017 = roots["coco"] / "train2017"
    samples = list(
        read_llava_instruct(json_path, {"coco/train2017": train2017, "coco": tmp_path, **roots})
    )
    assert samples[0][1] == train2017 / "000000033471.jpg"


# ---------------------------------------------------------------- synthetic worlds
def test_synthetic_captions_and_instructions(tmp_path: Path) -> None:
    world = tmp_path / "shapes"
    summary = generate_world(world, family="shapes", seed=3, image_size=8, train_per_class=1)
    lines = [json.loads(line) for line in (world / "captions.jsonl").read_text().splitlines()]
    for quality in ("short", "long"):
        samples = list(read_synthetic_captions(world, quality))
        assert len(samples) == summary["captions"] == len(lines)
        for i, ((record, path), line) in enumerate(zip(samples, lines, strict=True)):
            assert record == {
                "id": f"shapes-{quality}-{i:06d}",
                "image": line["image"],
                "conversations": caption_conversation(line[quality]),
            }
            assert path == world / line["image"] and path.is_file()
    instructions = list(read_synthetic_instructions(world))
    originals = [json.loads(x) for x in (world / "instructions.jsonl").read_text().splitlines()]
    assert [r for r, _ in instructions] == originals
    assert all(p == world / r["image"] for r, p in instructions)
    with pytest.raises(ValueError, match="'medium'"):
        read_synthetic_captions(world, "medium")


# ---------------------------------------------------------------- downloads
def _fake_hub(files: dict[str, bytes], calls: list, branches: dict[str, str] | None = None):
    """An hf_hub_download stand-in serving ``files`` (name -> bytes) into ``local_dir``; with
    ``branches`` (branch -> commit) it writes huggingface_hub's per-file download metadata,
    whose first line is the commit the revision pointed at."""

    def download(*, repo_id, filename, repo_type, revision, local_dir):
        calls.append((repo_id, filename, repo_type, revision))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[filename])
        commit = revision if is_commit(revision) else (branches or {}).get(revision)
        if commit:
            meta = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{filename}.metadata"
            meta.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(f"{commit}\netag\n0\n")
        return str(path)

    return download


def test_training_data_branch_is_resolved_once_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first fetch asks for ``main`` and records its commit (lock beside the folder, the
    commit and sha256 per file in fgvlm_source.json); a refetch asks for the commit even after
    the branch moved; every file of a source comes from the first file's commit."""
    names = [f"data/train-{i:05d}-of-00002.parquet" for i in range(2)]
    files = {names[0]: b"a", names[1]: b"b"}
    calls: list = []
    branches = {"main": "1" * 40}
    monkeypatch.setattr(conv, "hf_hub_download", _fake_hub(files, calls, branches))
    source = {"type": "pixmo_cap", "repo": "allenai/pixmo-cap", "revision": "main", "files": names}
    dest = tmp_path / "raw" / "pixmo"
    download_training_data(source, dest)
    assert [c[3] for c in calls] == ["main", "1" * 40]
    assert json.loads((tmp_path / "raw" / "pixmo.lock.json").read_text()) == {
        "allenai/pixmo-cap@main": "1" * 40
    }
    record = json.loads((dest / "fgvlm_source.json").read_text())
    assert record == {
        "repo": "allenai/pixmo-cap",
        "revision": "main",
        "sha": "1" * 40,
        "files": {
            names[0]: hashlib.sha256(b"a").hexdigest(),
            names[1]: hashlib.sha256(b"b").hexdigest(),
        },
    }
    calls.clear()
    shutil.rmtree(dest)
    branches["main"] = "2" * 40  # the branch moved on the hub meanwhile
    download_training_data(source, dest)
    assert [c[3] for c in calls] == ["1" * 40, "1" * 40]
    assert json.loads((dest / "fgvlm_source.json").read_text())["sha"] == "1" * 40
    # a sha in the config is used as is, and recorded
    calls.clear()
    download_training_data({**source, "revision": "3" * 40}, tmp_path / "raw" / "pinned")
    assert [c[3] for c in calls] == ["3" * 40, "3" * 40]
    assert json.loads((tmp_path / "raw" / "pinned.lock.json").read_text()) == {
        f"allenai/pixmo-cap@{'3' * 40}": "3" * 40
    }


def test_download_training_data_pins_revision_and_checks_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list = []
    files = {"blip_laion_cc_sbu_558k.json": b"[]"}
    files.update({f"data/train-{i:05d}-of-00004.parquet": b"" for i in range(4)})
    monkeypatch.setattr(conv, "hf_hub_download", _fake_hub(files, calls))
    source = {
        "type": "llava_pretrain",
        "repo": "liuhaotian/LLaVA-Pretrain",
        "revision": "abc123",
        "annotations": "blip_laion_cc_sbu_558k.json",
        "sha256": {"blip_laion_cc_sbu_558k.json": hashlib.sha256(b"[]").hexdigest()},
    }
    paths = download_training_data(source, tmp_path / "pt")
    assert paths == {"annotations": tmp_path / "pt" / "blip_laion_cc_sbu_558k.json"}
    assert calls == [
        ("liuhaotian/LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json", "dataset", "abc123"),
    ]
    files_default = [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)]
    pixmo = download_training_data(
        {
            "type": "pixmo_cap",
            "repo": "allenai/pixmo-cap",
            "revision": "r1",
            "files": files_default,
        },
        tmp_path / "px",
    )
    assert [p.relative_to(tmp_path / "px").as_posix() for p in pixmo["parquet"]] == files_default
    bad = {**source, "sha256": {"blip_laion_cc_sbu_558k.json": "0" * 64}}
    with pytest.raises(ChecksumError, match=r"blip_laion_cc_sbu_558k\.json.*0000"):
        download_training_data(bad, tmp_path / "bad")
    assert not (tmp_path / "bad" / "blip_laion_cc_sbu_558k.json").exists()  # never kept
    with pytest.raises(ValueError, match="synthetic_captions"):
        download_training_data({"type": "synthetic_captions"}, tmp_path / "x")


def test_read_training_source_reads_archives_lists_and_user_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    pt_json, pt_zip = _pretrain_files(fixtures)
    it_json, _ = _instruct_files(tmp_path / "raw" / "ft")  # the user's folders under raw_dir
    parquet = fixtures / "px.parquet"
    urls = _pixmo_parquet(parquet)
    hub = {
        "blip_laion_cc_sbu_558k.json": pt_json.read_bytes(),
        "llava_v1_5_mix665k.json": it_json.read_bytes(),
        "data/a.parquet": parquet.read_bytes(),
    }
    calls: list = []
    monkeypatch.setattr(conv, "hf_hub_download", _fake_hub(hub, calls))
    extract_zip(pt_zip, tmp_path / "archives" / "images")
    pretrain = {
        "type": "llava_pretrain",
        "repo": "liuhaotian/LLaVA-Pretrain",
        "revision": "r",
        "annotations": "blip_laion_cc_sbu_558k.json",
        "sha256": {},
        "archives": {"images": {"subdir": ""}},
        "image_root": None,
    }
    archives = {"images": tmp_path / "archives" / "images"}
    samples = list(conv.read_training_source(pretrain, tmp_path / "raw/pt", archives=archives))
    assert [p for _, p in samples] == [archives["images"] / i for i in PRETRAIN_IMAGES]
    user = {**pretrain, "image_root": str(archives["images"])}  # already on the cluster
    assert list(conv.read_training_source(user, tmp_path / "raw/pt")) == samples
    instruct = {
        "type": "llava_instruct",
        "repo": "liuhaotian/LLaVA-Instruct-150K",
        "revision": "r",
        "annotations": "llava_v1_5_mix665k.json",
        "sha256": {},
        "image_roots": {"coco": "coco", "gqa": str(tmp_path / "raw" / "ft" / "gqa")},
        "archives": {},
        "url_lists": {},
        "missing_images": "fail",
    }
    samples = list(conv.read_training_source(instruct, tmp_path / "raw" / "ft"))
    assert samples[0][1] == tmp_path / "raw/ft/coco/train2017/000000033471.jpg"
    assert samples[2][1] is None
    fetch_url_list(
        pixmo_url_list(parquet),
        tmp_path / "fetched",
        fetch=lambda url, timeout: _image_bytes(urls.index(url)),
    )
    pixmo = {
        "type": "pixmo_cap",
        "repo": "allenai/pixmo-cap",
        "revision": "r",
        "files": ["data/a.parquet"],
        "field": "caption",
        "sha256": {},
    }
    fetched = {"images": tmp_path / "fetched"}
    samples = list(conv.read_training_source(pixmo, tmp_path / "raw" / "px", fetched=fetched))
    assert len(samples) == 5
    assert [c[1] for c in calls] == [
        "blip_laion_cc_sbu_558k.json",
        "blip_laion_cc_sbu_558k.json",
        "llava_v1_5_mix665k.json",
        "data/a.parquet",
    ]


# ---------------------------------------------------------------- conversation shards
N_SAMPLES = 23


def _samples() -> list[tuple[dict, bytes | None]]:
    """Records with JPEG, PNG and GIF images and text-only ones; some ids repeat or need escaping."""
    out = []
    for i in range(N_SAMPLES):
        sample_id = "dup" if i in (4, 9) else f"s/{i:02d}.x"
        record = {"id": sample_id, "conversations": caption_conversation(f"caption {i}")}
        if i % 5 == 3:
            record["conversations"] = [
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "yo"},
            ]
            out.append((record, None))
            continue
        fmt = ("JPEG", "PNG", "GIF")[i % 3]
        out.append(({**record, "image": f"img{i}"}, _image_bytes(i, fmt)))
    return out


def _members(shard_dir: Path) -> dict[str, bytes]:
    out = {}
    for entry in read_index(shard_dir)["shards"]:
        with tarfile.open(shard_dir / entry["name"]) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})
    return out


@pytest.fixture()
def shard_dir(tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    write_conversation_shards(iter(_samples()), out, samples_per_shard=3)  # 8 shards: 3 x 7, 2
    return out


def test_conversation_shards_layout_and_byte_identical(tmp_path: Path, shard_dir: Path) -> None:
    index = read_index(shard_dir)
    assert [s["count"] for s in index["shards"]] == [3] * 7 + [2]
    assert count_samples(shard_dir) == N_SAMPLES
    again = tmp_path / "again"
    write_conversation_shards(_samples(), again, samples_per_shard=3)
    for entry in index["shards"]:
        assert (shard_dir / entry["name"]).read_bytes() == (again / entry["name"]).read_bytes()
    members = _members(shard_dir)
    assert members["s_00_x.jpg"] == _image_bytes(0, "JPEG")  # raw JPEG, key made tar-safe
    assert members["s_01_x.png"] == _image_bytes(1, "PNG")  # raw PNG
    gif = Image.open(io.BytesIO(members["s_02_x.png"]))  # GIF re-encoded as PNG
    assert gif.format == "PNG"
    assert "s_03_x.json" in members and not [m for m in members if m.startswith("s_03_x.")][1:]
    assert "dup.json" in members and "dup-1.json" in members  # repeated id: unique keys
    assert json.loads(members["dup-1.json"])["conversations"][1]["value"] == "caption 9"


def test_conversation_shards_reject_bad_input(tmp_path: Path) -> None:
    record = {"id": "a", "image": "x.jpg", "conversations": caption_conversation("c")}
    with pytest.raises(ValueError, match="'a' has 'image' but its image source is None"):
        write_conversation_shards([(record, None)], tmp_path / "s", samples_per_shard=2)
    with pytest.raises(ValueError, match="'a' is not decodable"):
        write_conversation_shards([(record, b"garbage")], tmp_path / "s", samples_per_shard=2)
    with pytest.raises(FileNotFoundError, match=r"x\.jpg: image of sample 'a'"):
        write_conversation_shards(
            [(record, tmp_path / "x.jpg")], tmp_path / "s", samples_per_shard=2
        )
    with pytest.raises(ValueError, match="no samples"):
        write_conversation_shards([], tmp_path / "s", samples_per_shard=2)
    assert not (tmp_path / "s").exists() and _no_temp_left(tmp_path)


def _loader_ids(dataset, num_workers: int, batch_size: int | None = None) -> list[str]:
    """Record ids in the order a DataLoader yields them."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=None if batch_size is None else list,
    )
    ids = []
    for item in loader:
        for record, image in [item] if batch_size is None else item:
            assert (image is None) == ("image" not in record)
            assert image is None or (isinstance(image, Image.Image) and image.mode == "RGB")
            ids.append(f"{record['id']}|{record['conversations'][-1]['value']}")
    return ids


def test_ranks_times_workers_see_every_sample_once_per_epoch(shard_dir: Path) -> None:
    expected = sorted(f"{r['id']}|{r['conversations'][-1]['value']}" for r, _ in _samples())
    orders = {}
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            dataset = conversation_dataset(
                shard_dir, rank=rank, world_size=2, seed=7, epoch=epoch, shuffle_buffer=2
            )
            ids = _loader_ids(dataset, num_workers=2)
            assert len(ids) == rank_size(shard_dir, rank, 2)
            seen += ids
        assert sorted(seen) == expected  # exactly once across 2 ranks x 2 workers
        orders[epoch] = seen
    assert orders[0] != orders[1]


def test_stream_is_a_function_of_seed_and_epoch(shard_dir: Path) -> None:
    def stream(seed: int, epoch: int, buffer: int = 3, rank: int = 1) -> list[str]:
        dataset = conversation_dataset(
            shard_dir, rank=rank, world_size=2, seed=seed, epoch=epoch, shuffle_buffer=buffer
        )
        return _loader_ids(dataset, num_workers=2)

    first = stream(5, 2)
    assert stream(5, 2) == first
    assert stream(5, 3) != first
    assert stream(6, 2) != first
    # the in-shard buffer reorders the epoch; ranks still share it out exactly
    unbuffered = stream(5, 2, buffer=0)
    assert unbuffered != first
    both = sorted(stream(5, 2, rank=0) + first)
    assert sorted(stream(5, 2, buffer=0, rank=0) + unbuffered) == both


@THREE_WORKERS
@pytest.mark.parametrize(("num_workers", "drop_last"), [(3, False), (3, True), (0, False)])
def test_resume_skips_consumed_batches_and_continues_the_stream(
    shard_dir: Path, num_workers: int, drop_last: bool
) -> None:
    def dataset(skip: int):
        return conversation_dataset(
            shard_dir,
            rank=0,
            world_size=1,
            seed=1,
            epoch=0,
            shuffle_buffer=2,
            skip_batches=skip,
            batch_size=2,
            drop_last=drop_last,
        )

    def batches(skip: int) -> list[list[str]]:
        loader = torch.utils.data.DataLoader(
            dataset(skip),
            batch_size=2,
            num_workers=num_workers,
            collate_fn=list,
            drop_last=drop_last,
        )
        return [[r["conversations"][-1]["value"] for r, _ in batch] for batch in loader]

    full = batches(0)
    total = rank_batches(
        count_samples(shard_dir),
        world_size=1,
        num_workers=num_workers,
        batch_size=2,
        drop_last=drop_last,
    )
    assert len(full) == total[0]
    for skip in (1, 2, 4, 7, len(full) - 1, len(full)):
        assert batches(skip) == full[skip:], skip
    with pytest.raises(ValueError, match="cannot skip"):
        list(dataset(len(full) + 1))


@THREE_WORKERS
def test_more_streams_than_shards_still_see_every_sample_once(shard_dir: Path) -> None:
    expected = sorted(f"{r['id']}|{r['conversations'][-1]['value']}" for r, _ in _samples())
    seen = []
    for rank in range(5):  # 8 shards, 5 ranks x 3 workers: streams split shards
        dataset = conversation_dataset(shard_dir, rank=rank, world_size=5, seed=0, batch_size=2)
        ids = _loader_ids(dataset, num_workers=3)
        assert len(ids) == rank_size(shard_dir, rank, 5) in (4, 5)
        seen += ids
    assert sorted(seen) == expected
    with pytest.raises(ValueError, match="23 samples cannot feed 24 ranks"):
        conversation_dataset(shard_dir, rank=0, world_size=24, seed=0)
