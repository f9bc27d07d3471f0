"""Benchmark sources: official formats fabricated in miniature, parsed into exact manifests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torchvision.datasets.utils as tv_utils
from PIL import Image
from scipy.io import savemat

from fgvlm.cli import main
from fgvlm.data import classification, folder, imagenet, manifest
from fgvlm.data.classification import load_classnames

IMAGENET_WNIDS = imagenet.imagenet_wnids()


def _jpeg(path: Path, color: tuple[int, int, int] = (10, 20, 30)) -> Path:
    """Write a tiny JPEG at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path, "JPEG")
    return path


def _rows(frame: pl.DataFrame) -> list[tuple]:
    """(key, label, classname, split) rows of a manifest, in order."""
    return frame.select("key", "label", "classname", "split").rows()


# --- manifest -------------------------------------------------------------------------------


def _row(key: str, label: int = 0, classname: str = "a", path: str = "/x.jpg") -> dict:
    return {"key": key, "path": path, "label": label, "classname": classname, "split": "test"}


def test_make_manifest_rejects_duplicates_dots_and_label_clashes():
    with pytest.raises(ValueError, match="duplicate manifest key 'k'"):
        manifest.make_manifest([_row("k", path="/a.jpg"), _row("k", path="/b.jpg")])
    with pytest.raises(ValueError, match="'a.b'"):
        manifest.make_manifest([_row("a.b")])
    with pytest.raises(ValueError, match="'a/b'"):
        manifest.make_manifest([_row("a/b")])
    with pytest.raises(ValueError, match="label 0 has several classnames"):
        manifest.make_manifest([_row("a", 0, "x"), _row("b", 0, "y")])
    with pytest.raises(ValueError, match="out of range for 1 classes"):
        manifest.make_manifest([_row("a", 1, "x")], classnames=["x"])
    with pytest.raises(ValueError, match="dtype String"):
        manifest.make_manifest([_row("a", "0")])  # type: ignore[arg-type]


def test_manifest_roundtrip_is_byte_identical(tmp_path):
    frame = manifest.make_manifest([_row("b", 1, "y"), _row("a", 0, "x")])
    manifest.write_manifest(frame, tmp_path / "one.parquet")
    manifest.write_manifest(frame, tmp_path / "two.parquet")
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "two.parquet").read_bytes()
    assert manifest.read_manifest(tmp_path / "one.parquet").equals(frame)
    frame.drop("split").write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet"):
        manifest.read_manifest(tmp_path / "bad.parquet")


def test_verify_images_names_corrupt_file(tmp_path):
    good = _jpeg(tmp_path / "good.jpg")
    bad = _jpeg(tmp_path / "bad.jpg", (200, 0, 0))
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    frame = manifest.make_manifest([_row("good", path=str(good)), _row("bad", path=str(bad))])
    manifest.verify_images(frame.head(1))
    with pytest.raises(ValueError, match=r"bad\.jpg: unreadable image \(manifest key 'bad'\)"):
        manifest.verify_images(frame)


# --- Flowers / Pets / Food ------------------------------------------------------------------


@pytest.fixture
def flowers_root(tmp_path):
    base = tmp_path / "flowers-102"
    base.mkdir()
    labels = np.array([77, 1, 102, 1, 50, 77], dtype=np.uint8)  # 1-based, images 1..6
    savemat(base / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(
        base / "setid.mat",
        {"trnid": np.array([[2]]), "valid": np.array([[4]]), "tstid": np.array([[6, 1, 3, 5]])},
    )
    for image_id in (6, 1, 3, 5):
        _jpeg(base / "jpg" / f"image_{image_id:05d}.jpg")
    return tmp_path


def test_read_flowers102(flowers_root):
    frame = classification.read_flowers102(flowers_root)
    names = load_classnames("flowers102")
    assert _rows(frame) == [
        ("image_00006", 76, names[76], "test"),
        ("image_00001", 76, names[76], "test"),
        ("image_00003", 101, names[101], "test"),
        ("image_00005", 49, names[49], "test"),
    ]
    assert frame["path"][0] == str(flowers_root / "flowers-102" / "jpg" / "image_00006.jpg")
    manifest.verify_images(frame)


@pytest.fixture
def pets_root(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    lines = [
        "Abyssinian_201 1 1 1",
        "american_pit_bull_terrier_10 3 2 2",
        "yorkshire_terrier_190 37 2 25",
    ]
    (base / "annotations").mkdir(parents=True)
    (base / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        _jpeg(base / "images" / f"{line.split()[0]}.jpg")
    return tmp_path


def test_read_oxford_pets(pets_root):
    frame = classification.read_oxford_pets(pets_root)
    assert _rows(frame) == [
        ("Abyssinian_201", 0, "Abyssinian", "test"),
        ("american_pit_bull_terrier_10", 2, "American Pit Bull Terrier", "test"),
        ("yorkshire_terrier_190", 36, "Yorkshire Terrier", "test"),
    ]


def test_read_oxford_pets_rejects_class_id_of_other_breed(pets_root):
    test_txt = pets_root / "oxford-iiit-pet" / "annotations" / "test.txt"
    test_txt.write_text("Abyssinian_201 2 1 1\n")
    with pytest.raises(ValueError, match=r"test\.txt:1: image Abyssinian_201 has class id 2"):
        classification.read_oxford_pets(pets_root)


@pytest.fixture
def food_root(tmp_path):
    base = tmp_path / "food-101"
    meta = {"waffles": ["waffles/31", "waffles/7"], "apple_pie": ["apple_pie/1005649"]}
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "test.json").write_text(json.dumps(meta))
    for entries in meta.values():
        for entry in entries:
            _jpeg(base / "images" / f"{entry}.jpg")
    return tmp_path


def test_read_food101(food_root):
    frame = classification.read_food101(food_root)
    assert _rows(frame) == [
        ("waffles--31", 100, "waffles", "test"),
        ("waffles--7", 100, "waffles", "test"),
        ("apple_pie--1005649", 0, "apple pie", "test"),
    ]
    assert frame["path"][2] == str(food_root / "food-101/images/apple_pie/1005649.jpg")


def test_build_manifest_checks_count(food_root):
    assert classification.OFFICIAL_TEST_COUNTS == {
        "flowers102": 6149,
        "oxford_iiit_pet": 3669,
        "food101": 25250,
    }
    assert classification.build_manifest("food101", food_root, 3).height == 3
    assert classification.build_manifest("food101", food_root, None).height == 3
    with pytest.raises(ValueError, match="food101 .* 3 test images, expected 25250"):
        classification.build_manifest("food101", food_root, 25250)


def test_torchvision_count_checked_with_a_switch_to_accept(food_root, monkeypatch, caplog):
    from fgvlm.data.benchmarks import read_benchmark

    monkeypatch.setattr(tv_utils, "_urlretrieve", lambda *a, **k: pytest.fail("no download"))
    source = {"type": "torchvision", "name": "food101", "expected_count": 25250}
    spec = {"source": source, "classnames": "food101_torchvision_order", "metric": "accuracy"}
    with pytest.raises(ValueError, match=f"{food_root}: .*images 3 \\(expected 25250\\)"):
        read_benchmark(
            {**spec, "source": {**source, "accept_count_mismatch": False}}, raw_dir=food_root
        )
    with caplog.at_level("WARNING"):
        accepted = read_benchmark(
            {**spec, "source": {**source, "accept_count_mismatch": True}}, raw_dir=food_root
        )
    assert accepted.frame.height == 3 and accepted.stats["matches"] is False
    assert "images 3 (expected 25250) (accepted" in caplog.text


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"flowers-102/imagelabels\.mat"):
        classification.read_flowers102(tmp_path)


def test_load_classnames_makes_imagenet_names_unique():
    names = load_classnames("imagenet1k_openai")
    assert len(names) == len(set(names)) == 1000
    assert (names[657], names[744]) == ("missile", "missile (2)")
    assert (names[836], names[837]) == ("sunglasses", "sunglasses (2)")
    assert load_classnames("oxford_iiit_pet37")[0] == "Abyssinian"
    with pytest.raises(ValueError, match="unknown class-name list 'nope'"):
        load_classnames("nope")


@pytest.fixture
def offline_downloads(monkeypatch):
    """Make torchvision's downloader write ``payload[url]`` (default: junk) instead of fetching."""
    payload: dict[str, bytes] = {}

    def fake_urlretrieve(url, filename, chunk_size=None):
        Path(filename).write_bytes(payload.get(url, b"not the real file"))

    monkeypatch.setattr(tv_utils, "_urlretrieve", fake_urlretrieve)
    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    return payload


@pytest.mark.parametrize(
    ("name", "archive"),
    [
        ("flowers102", "flowers-102/102flowers.tgz"),
        ("oxford_iiit_pet", "oxford-iiit-pet/images.tar.gz"),
        ("food101", "food-101.tar.gz"),
    ],
)
def test_torchvision_checksum_mismatch_names_file_and_deletes_it(
    tmp_path, offline_downloads, name, archive
):
    with pytest.raises(ValueError) as info:
        classification.download_torchvision_dataset(name, tmp_path)
    message = str(info.value)
    assert message.startswith(f"{name}: download into {tmp_path} failed")
    assert f"{tmp_path / archive} corrupt" in message
    assert not (tmp_path / archive).exists()


def test_torchvision_download_reuses_extracted_folders(pets_root, food_root, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("nothing should be downloaded")

    monkeypatch.setattr(tv_utils, "_urlretrieve", no_network)
    (pets_root / "oxford-iiit-pet" / "images").mkdir(exist_ok=True)
    classification.download_torchvision_dataset("oxford_iiit_pet", pets_root)
    classification.download_torchvision_dataset("food101", food_root)


# --- ImageNet subset ------------------------------------------------------------------------

W = IMAGENET_WNIDS  # label i <-> W[i]


def _annotations() -> dict:
    """A human_accuracy_v3.0.0.json in miniature, in the real structure."""
    wrong4 = [W[1], W[2], W[3], W[4]]
    return {
        "initial_annots": {
            # kept: one correct label, four wrong predictions
            "ILSVRC2012_val_00000003.JPEG": {"correct": [W[0]], "wrong": wrong4},
            # kept: five wrong, plus an unclear label that is ignored
            "ILSVRC2012_val_00000001.JPEG": {
                "correct": [W[999]],
                "wrong": [W[5], W[6], W[7], W[8], W[9]],
                "unclear": [W[10]],
            },
            # three wrong: kept only with min_wrong <= 3
            "ILSVRC2012_val_00000002.JPEG": {"correct": [W[0]], "wrong": wrong4[:3]},
            # two correct labels: dropped
            "ILSVRC2012_val_00000004.JPEG": {"correct": [W[20], W[21]], "wrong": wrong4},
            # problematic: dropped
            "ILSVRC2012_val_00000005.JPEG": {"correct": [W[30]], "wrong": wrong4},
            # no wrong predictions at all: dropped
            "ILSVRC2012_val_00000006.JPEG": {"correct": [W[40]]},
            # an ImageNetV2 image: dropped
            "0a1b2c3d4e5f.jpeg": {"correct": [W[50]], "wrong": wrong4},
        },
        "problematic_images": {"ILSVRC2012_val_00000005.JPEG": True},
        "imagenet_m": ["ILSVRC2012_val_00000003.JPEG"],
    }


def test_select_subset_rule_and_counts():
    subset = imagenet.select_subset(_annotations())
    assert subset == [
        ("ILSVRC2012_val_00000001.JPEG", [999]),
        ("ILSVRC2012_val_00000003.JPEG", [0]),
        ("ILSVRC2012_val_00000004.JPEG", [20, 21]),  # several correct labels: kept
    ]
    # image 4's ILSVRC label is 20 or 21: the classes are bounded, not known
    assert imagenet.subset_counts(subset) == {
        "images": 3, "classes": None, "classes_min": 2, "classes_max": 4,
    }  # fmt: skip
    single = imagenet.select_subset(_annotations(), single_correct=True)
    assert single == [
        ("ILSVRC2012_val_00000001.JPEG", [999]),
        ("ILSVRC2012_val_00000003.JPEG", [0]),
    ]
    assert imagenet.subset_counts(single) == {
        "images": 2, "classes": 2, "classes_min": 2, "classes_max": 2,
    }  # fmt: skip
    loose = imagenet.select_subset(_annotations(), min_wrong=1, single_correct=True)
    assert [name for name, _ in loose] == [
        "ILSVRC2012_val_00000001.JPEG",
        "ILSVRC2012_val_00000002.JPEG",
        "ILSVRC2012_val_00000003.JPEG",
    ]
    assert imagenet.subset_counts(loose)["classes"] == 2
    with_problematic = imagenet.select_subset(
        _annotations(), single_correct=True, keep_problematic=True
    )
    assert [n for n, _ in with_problematic][-1] == "ILSVRC2012_val_00000005.JPEG"
    assert imagenet.subset_negatives(_annotations(), single_correct=True) == {
        "ILSVRC2012_val_00000001": [5, 6, 7, 8, 9],
        "ILSVRC2012_val_00000003": [1, 2, 3, 4],
    }


def test_candidate_rules_and_the_paper_counts(monkeypatch):
    annotations = _annotations()
    assert imagenet.annotated_pool(annotations) == {
        "val_images": 6, "val_labelled": 6, "val_not_problematic": 5,
    }  # fmt: skip
    rows = imagenet.candidate_rule_counts(annotations, (3, 4))
    by_rule = {(r["single_correct"], r["keep_problematic"], r["min_wrong"]): r for r in rows}
    assert len(rows) == 8
    assert by_rule[(True, False, 4)]["images"] == 2
    assert by_rule[(True, False, 3)]["images"] == 3
    assert by_rule[(True, True, 4)]["images"] == 3
    assert by_rule[(False, False, 4)]["classes_max"] == 4
    assert not any(r["matches_paper"] for r in rows)
    # a rule that gives the paper's counts is flagged
    monkeypatch.setattr(imagenet, "PAPER_SUBSET_COUNTS", {"images": 3, "classes": 3})
    rows = imagenet.candidate_rule_counts(annotations, (3, 4))
    matching = [
        (r["single_correct"], r["keep_problematic"], r["min_wrong"])
        for r in rows
        if r["matches_paper"]
    ]
    assert matching == [(True, True, 4), (False, False, 4)]


def test_cli_imagenet_subset_prints_every_candidate_rule(annotations_file, capsys):
    assert main(["imagenet-subset", "--annotations", str(annotations_file)]) == 0
    out = capsys.readouterr().out
    assert "5,457 images, 928 classes" in out
    assert "val_images 6, val_labelled 6, val_not_problematic 5" in out
    lines = [line.split() for line in out.splitlines() if line.split()[:1] in (["True"], ["False"])]
    assert len(lines) == 20  # 2 x 2 x min_wrong 1..5
    assert ["True", "False", "4", "2", "2-2"] in lines
    assert ["False", "False", "4", "3", "2-4"] in lines


def test_select_subset_rejects_unknown_wordnet_id():
    annotations = {
        "initial_annots": {"ILSVRC2012_val_00000009.JPEG": {"correct": ["n0"], "wrong": W[:4]}},
        "problematic_images": {},
    }
    with pytest.raises(ValueError, match="ILSVRC2012_val_00000009.JPEG: 'n0'"):
        imagenet.select_subset(annotations)


@pytest.fixture
def annotations_file(tmp_path):
    path = tmp_path / "human_accuracy_v3.0.0.json"
    path.write_text(json.dumps(_annotations()))
    return path


@pytest.mark.parametrize("layout", ["flat", "synsets"])
def test_read_imagenet_subset(tmp_path, annotations_file, layout):
    val = tmp_path / "val"
    for number, label in [(1, 999), (2, 0), (3, 0), (4, 20), (5, 30), (6, 40)]:
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        _jpeg(val / name if layout == "flat" else val / W[label] / name)
    frame = imagenet.read_imagenet_subset(val, annotations_file, single_correct=True)
    names = load_classnames("imagenet1k_openai")
    assert _rows(frame) == [
        ("ILSVRC2012_val_00000001", 999, names[999], "test"),
        ("ILSVRC2012_val_00000003", 0, names[0], "test"),
    ]
    folder_part = "" if layout == "flat" else f"{W[0]}/"
    assert frame["path"][1] == str(val / f"{folder_part}ILSVRC2012_val_00000003.JPEG")
    if layout == "flat":  # image 4 has two correct labels: only its synset folder tells which
        with pytest.raises(ValueError, match=r"ILSVRC2012_val_00000004.JPEG: correct labels"):
            imagenet.read_imagenet_subset(val, annotations_file)
    else:
        frame = imagenet.read_imagenet_subset(val, annotations_file)
        assert _rows(frame)[-1] == ("ILSVRC2012_val_00000004", 20, names[20], "test")


def _imagenet_spec(tmp_path, **source) -> dict:
    """A benchmark spec of the ImageNet subset over a fabricated val folder and annotations."""
    val = tmp_path / "val"
    for number, label in [(1, 999), (3, 0), (4, 20)]:
        _jpeg(val / W[label] / f"ILSVRC2012_val_{number:08d}.JPEG")
    body = json.dumps(_annotations()).encode()
    mirror = tmp_path / "mirror" / "human_accuracy_v3.0.0.json"  # served as a file:// URL
    mirror.parent.mkdir(parents=True, exist_ok=True)
    mirror.write_bytes(body)
    url = mirror.as_uri()
    defaults = {"min_wrong": 4, "single_correct": False, "keep_problematic": False}
    return {
        "source": {
            "type": "imagenet_subset",
            "val_dir": str(val),
            "annotations": {"url": url, "md5": hashlib.md5(body).hexdigest()},
            **defaults,
            **source,
        },
        "classnames": "imagenet1k_openai",
        "metric": "mean_per_class",
    }


def test_imagenet_manifest_counts_checked_against_the_paper(tmp_path):
    from fgvlm import stages

    outputs = {
        name: tmp_path / "out" / f"{name}.json" for name in ("manifest", "classes", "candidates")
    }
    outputs["stats"] = tmp_path / "out" / "manifest_stats.json"
    paper = {"images": 5457, "classes": 928}
    spec = _imagenet_spec(tmp_path, expected_count=paper, accept_count_mismatch=False)
    with pytest.raises(ValueError) as err:
        stages.build_manifest(spec, **outputs, raw_dir=tmp_path / "raw")
    message = str(err.value)
    assert str(tmp_path / "val") in message
    assert "images 3 (expected 5457), classes 3 (expected 928)" in message
    assert not outputs["stats"].exists() and not outputs["manifest"].exists()
    spec["source"]["accept_count_mismatch"] = True
    stages.build_manifest(spec, **outputs, raw_dir=tmp_path / "raw")
    stats = json.loads(outputs["stats"].read_text())
    assert stats == {
        "images": 3, "classes": 3, "classes_listed": 1000, "expected": paper, "matches": False,
    }  # fmt: skip
    spec["source"].update(expected_count={"images": 3, "classes": 3}, accept_count_mismatch=False)
    stages.build_manifest(spec, **outputs, raw_dir=tmp_path / "raw")
    assert json.loads(outputs["stats"].read_text())["matches"] is True


def test_read_imagenet_subset_missing_or_misfiled_image(tmp_path, annotations_file):
    val = tmp_path / "val"
    _jpeg(val / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(FileNotFoundError, match=r"val/ILSVRC2012_val_00000003\.JPEG"):
        imagenet.read_imagenet_subset(val, annotations_file)
    _jpeg(val / W[7] / "ILSVRC2012_val_00000003.JPEG")
    with pytest.raises(ValueError, match=f"in folder {W[7]}, but labelled {W[0]}"):
        imagenet.read_imagenet_subset(val, annotations_file)


def test_download_annotations_checks_md5(tmp_path):
    served = tmp_path / "human_accuracy_v3.0.0.json"  # a mirror on disk: a file:// URL
    url = served.as_uri()
    body = json.dumps(_annotations()).encode()
    served.write_bytes(body)
    md5 = hashlib.md5(body).hexdigest()
    dest = tmp_path / "raw" / "human_accuracy_v3.0.0.json"

    imagenet.download_annotations(url, md5, dest)
    assert imagenet.load_annotations(dest) == _annotations()

    served.write_bytes(body + b" ")  # the mirror now holds something else
    with pytest.raises(
        ValueError, match=r"human_accuracy_v3\.0\.0\.json: download of .* failed its md5 check"
    ):
        imagenet.download_annotations(url, "0" * 32, dest)
    assert list((tmp_path / "raw").iterdir()) == []  # neither the stale file nor a partial one


def test_load_annotations_rejects_other_structures(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"initial_annots": {}}))
    with pytest.raises(ValueError, match="a.json: missing or malformed field 'problematic_images'"):
        imagenet.load_annotations(path)


# --- image folder and CSV sources -----------------------------------------------------------


def test_read_image_folder(tmp_path):
    _jpeg(tmp_path / "red_fox" / "a.1.jpg")
    _jpeg(tmp_path / "red_fox" / "sub" / "b.png")
    _jpeg(tmp_path / "arctic_fox" / "c.JPEG")
    (tmp_path / "arctic_fox" / "notes.txt").write_text("ignored")
    frame = folder.read_image_folder(tmp_path, split="val")
    assert _rows(frame) == [
        ("arctic_fox--c", 0, "arctic fox", "val"),
        ("red_fox--a_1", 1, "red fox", "val"),
        ("red_fox--sub--b", 1, "red fox", "val"),
    ]
    (tmp_path / "classes.json").write_text(json.dumps(["Arctic fox", "Red fox"]))
    assert folder.read_image_folder(tmp_path)["classname"].to_list() == [
        "Arctic fox",
        "Red fox",
        "Red fox",
    ]
    given = folder.read_image_folder(tmp_path, classnames=["dog", "red fox", "arctic fox"])
    assert given["label"].to_list() == [2, 1, 1]


def test_read_image_folder_rejects_colliding_keys(tmp_path):
    _jpeg(tmp_path / "cat" / "x.jpg")
    _jpeg(tmp_path / "cat" / "x.png")
    with pytest.raises(ValueError, match="both give manifest key 'cat--x'"):
        folder.read_image_folder(tmp_path)


def test_read_csv_source_string_labels(tmp_path):
    images = tmp_path / "images"
    _jpeg(images / "b" / "one.jpg")
    _jpeg(images / "two.jpg")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\nb/one.jpg,tabby cat\ntwo.jpg,barn owl\n")
    frame = folder.read_csv_source(csv_path, image_root=images)
    assert _rows(frame) == [
        ("b--one", 1, "tabby cat", "test"),
        ("two", 0, "barn owl", "test"),
    ]
    assert frame["path"][0] == str(images / "b" / "one.jpg")
    csv_path.write_text(f"path,label\n{images / 'b' / 'one.jpg'},tabby cat\n")
    assert folder.read_csv_source(csv_path, image_root=images)["key"].to_list() == ["b--one"]
    csv_path.write_text("path,label\nb/one.jpg,tabby cat\ntwo.jpg,barn owl\n")
    with pytest.raises(FileNotFoundError, match=r"list\.csv:2: image .*one\.jpg not found"):
        folder.read_csv_source(csv_path)  # relative to the CSV's folder: not there


def test_read_csv_source_integer_labels_and_errors(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    _jpeg(tmp_path / "b.jpg")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label,classname\na.jpg,3,owl\nb.jpg,0,cat\n")
    assert _rows(folder.read_csv_source(csv_path)) == [
        ("a", 3, "owl", "test"),
        ("b", 0, "cat", "test"),
    ]
    csv_path.write_text("path,label\na.jpg,3\nb.jpg,owl\n")
    with pytest.raises(ValueError, match=r"list\.csv:3: label 'owl' is not an integer"):
        folder.read_csv_source(csv_path)
    csv_path.write_text("path,label\na.jpg,3\n")
    with pytest.raises(ValueError, match=r"list\.csv:2: integer label without a classname"):
        folder.read_csv_source(csv_path)
    csv_path.write_text("path,label\na.jpg,x\n./a.jpg,x\n")
    with pytest.raises(ValueError, match="both give manifest key 'a'"):
        folder.read_csv_source(csv_path)


def test_benchmark_class_table_labels_image_folder_and_csv_sources(tmp_path):
    """``classnames:`` labels a folder or CSV by the table's order, classes without images
    included, so mining sees every class; a class outside the table names the folder or line."""
    from fgvlm.data.benchmarks import read_benchmark

    table = load_classnames("oxford_iiit_pet37")
    root = tmp_path / "pets"
    _jpeg(root / "Bengal" / "1.jpg")
    _jpeg(root / "Basset_Hound" / "2.jpg")
    spec = {"source": {"type": "image_folder", "root": str(root), "split": "test"}}
    bench = read_benchmark({**spec, "classnames": "oxford_iiit_pet37"}, raw_dir=tmp_path / "raw")
    assert bench.classnames == table
    assert bench.frame["label"].to_list() == [table.index("Basset Hound"), table.index("Bengal")]
    assert bench.frame["classname"].to_list() == ["Basset Hound", "Bengal"]
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\npets/Bengal/1.jpg,Bengal\npets/Basset_Hound/2.jpg,Pug\n")
    csv_spec = {"source": {"type": "csv", "csv": str(csv_path), "split": "test"}}
    bench = read_benchmark({**csv_spec, "classnames": "oxford_iiit_pet37"}, raw_dir=tmp_path)
    assert bench.frame["label"].to_list() == [table.index("Bengal"), table.index("Pug")]

    _jpeg(root / "Tabby" / "3.jpg")
    with pytest.raises(ValueError) as err:
        read_benchmark({**spec, "classnames": "oxford_iiit_pet37"}, raw_dir=tmp_path / "raw")
    assert str(err.value) == (
        f"{root / 'Tabby'}: class 'Tabby' is not in the benchmark's class names "
        "(37 classes: 'Abyssinian', 'American Bulldog', 'American Pit Bull Terrier', ...)"
    )
    csv_path.write_text("path,label\npets/Bengal/1.jpg,Bengal\npets/Tabby/3.jpg,Tabby\n")
    with pytest.raises(ValueError) as err:
        read_benchmark({**csv_spec, "classnames": "oxford_iiit_pet37"}, raw_dir=tmp_path)
    assert str(err.value) == f"{csv_path}:3: class 'Tabby' is not in the benchmark's class names"
