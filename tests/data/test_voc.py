"""PASCAL VOC 2012 (+ SBD train_aug): the loader on the real samples in ../shared/datasets/samples
(skipped without them) and on fixtures written in the original layout; scripts/prepare/voc.py
(extraction, the train_aug rule, SBD conversion, checks, idempotence) on local fixtures; a
trainer=debug run on the voc and voc_aug configs."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segexp.data.prepare import PrepareError
from segexp.data.voc import VOCDataset
from segexp.errors import ConfigError, DataError
from tests.conftest import load_script
from tests.data.conftest import assert_debug_run, debug_config, file_url, write_gray, write_rgb

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]


# -- fixtures in the original layout ----------------------------------------------------------
VOC_PALETTE_BYTES = [c for index in range(256) for c in (
    sum(((index >> (3 * k)) & 1) << (7 - k) for k in range(8)),
    sum(((index >> (3 * k + 1)) & 1) << (7 - k) for k in range(8)),
    sum(((index >> (3 * k + 2)) & 1) << (7 - k) for k in range(8)))]


def voc_label(k: int, shape=(6, 9)) -> np.ndarray:
    """Class indices with a 255 boundary row: background, class 1 + k % 20 and class 15."""
    label = np.zeros(shape, np.uint8)
    label[2:, 3:] = 1 + k % 20
    label[4:, 6:] = 15
    label[1, :] = 255
    return label


def write_voc(root: Path, splits: dict[str, list[str]], shape=(6, 9)) -> dict[str, np.ndarray]:
    """VOCdevkit/VOC2012 as the trainval tar unpacks (palette PNG labels, the other folders the
    loader must skip). Returns id -> label."""
    voc = root / "VOCdevkit" / "VOC2012"
    labels = {}
    ids = sorted({i for names in splits.values() for i in names})
    for k, image_id in enumerate(ids):
        write_rgb(voc / "JPEGImages" / f"{image_id}.jpg", 20 * k, shape)
        labels[image_id] = voc_label(k, shape)
        png = Image.fromarray(labels[image_id])
        png.putpalette(VOC_PALETTE_BYTES)
        (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        png.save(voc / "SegmentationClass" / f"{image_id}.png")
        write_gray(voc / "SegmentationObject" / f"{image_id}.png", labels[image_id] > 0)
    write_rgb(voc / "JPEGImages" / "2012_999999.jpg", 1, shape)  # an image with no segmentation
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("2012_999999\n")
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    for split, names in splits.items():
        (lists / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    if "train" in splits and "val" in splits:
        (lists / "trainval.txt").write_text("".join(f"{n}\n" for n in sorted(
            splits["train"] + splits["val"])))
    return labels


def write_sbd(root: Path, train: list[str], val: list[str], shape=(6, 9)) -> dict[str, np.ndarray]:
    """benchmark_RELEASE/dataset as benchmark.tgz unpacks: cls/<id>.mat (MATLAB v5 GTcls with
    Boundaries, Segmentation, CategoriesPresent), img/<id>.jpg, train.txt, val.txt."""
    scipy_io = pytest.importorskip("scipy.io", reason="writing SBD .mat fixtures needs scipy")
    from scipy import sparse

    dataset = root / "benchmark_RELEASE" / "dataset"
    (dataset / "cls").mkdir(parents=True)
    (dataset / "inst").mkdir(parents=True)
    segmentations = {}
    for k, image_id in enumerate(sorted(set(train) | set(val))):
        segmentation = np.zeros(shape, np.uint8)
        segmentation[:, : 2 + k % 5] = 1 + (3 * k) % 20
        segmentation[-1, -1] = 20
        boundaries = np.empty((20, 1), dtype=object)
        for c in range(20):
            boundaries[c, 0] = sparse.csc_matrix(np.zeros(shape, np.uint8))
        present = np.unique(segmentation[segmentation > 0]).reshape(-1, 1).astype(np.uint8)
        scipy_io.savemat(dataset / "cls" / f"{image_id}.mat", {"GTcls": {
            "Boundaries": boundaries, "Segmentation": segmentation, "CategoriesPresent": present}})
        write_rgb(dataset / "img" / f"{image_id}.jpg", 3 * k, shape)
        segmentations[image_id] = segmentation
    (dataset / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (dataset / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return segmentations


# -- the loader -------------------------------------------------------------------------------
def test_voc_real_samples_read_palette_indices(shared_datasets):
    root = shared_datasets / "samples" / "voc" / "VOCdevkit" / "VOC2012"
    train, val = VOCDataset(root=root), VOCDataset(split="val", root=root)
    assert [p.stem for p, _ in train.samples] == ["2007_000032"]
    assert [p.stem for p, _ in val.samples] == ["2007_000033"]
    assert len(VOCDataset(split="trainval", root=root)) == 2
    assert len(VOCDataset(root=root, train_split="trainval")) == 2  # split "train" reads trainval
    for ds in (train, val):
        _, label_path = ds.samples[0]
        with Image.open(label_path) as png:
            assert png.mode == "P"
            raw = np.array(png)
            # the file's palette is the VOC colormap segexp uses for pictures
            assert png.getpalette()[:63] == [c for colour in VOCDataset.palette for c in colour]
        sample = ds.load(0)
        np.testing.assert_array_equal(sample.mask, raw)
        assert sample.image.shape == raw.shape + (3,) and sample.image.dtype == np.uint8
        values = set(np.unique(sample.mask).tolist())
        assert 255 in values and 0 in values and values <= set(range(21)) | {255}
        image, mask = ds[0]
        assert image.dtype == torch.float32 and image.shape == (3,) + raw.shape
        assert mask.dtype == torch.int64
    assert set(np.unique(train.load(0).mask).tolist()) == {0, 1, 15, 255}  # aeroplanes, people


def test_voc_metadata():
    assert list(VOCDataset.class_names) == VOC_CLASSES
    palette = VOCDataset.palette
    assert len(palette) == 21 and palette[0] == (0, 0, 0) and palette[1] == (128, 0, 0)
    assert palette[15] == (192, 128, 128) and palette[20] == (0, 64, 128)


def test_voc_fixture_splits(tmp_path):
    labels = write_voc(tmp_path, {"train": ["2007_000002", "2007_000001"], "val": ["2008_000005"]})
    root = tmp_path / "VOCdevkit" / "VOC2012"
    train = VOCDataset(root=root)
    assert [p.stem for p, _ in train.samples] == ["2007_000002", "2007_000001"]  # list order
    for index, image_id in enumerate(["2007_000002", "2007_000001"]):
        sample = train.load(index)
        np.testing.assert_array_equal(sample.mask, labels[image_id])
        assert sample.source == str(root / "SegmentationClass" / f"{image_id}.png")
    # the k = 0 image, read as RGB (JPEG: within a few levels)
    assert np.abs(train.load(1).image[0, 0].astype(int) - (0, 10, 200)).max() <= 4
    assert len(VOCDataset(split="val", root=root)) == 1
    assert len(VOCDataset(split="trainval", root=root)) == 3
    assert len(VOCDataset(split="val", root=root, train_split="trainval")) == 1  # val stays val
    with pytest.raises(ConfigError, match="train, val, trainval or train_aug"):
        VOCDataset(split="test", root=root)
    with pytest.raises(ConfigError, match="train_split"):
        VOCDataset(root=root, train_split="val")
    # val_split: the list split "val" reads
    assert VOCDataset(split="val", root=root, val_split="train").samples == train.samples
    with pytest.raises(ConfigError,
                       match="unknown dataset.val_split 'test' for voc: use train, val, "
                             "trainval or train_aug"):
        VOCDataset(split="val", root=root, val_split="test")
    with pytest.raises(DataError, match="num_classes=20") as info:
        VOCDataset(root=root, num_classes=20)
    assert "dataset.num_classes=21" in str(info.value)


def test_voc_train_aug_without_prepare_says_how(tmp_path):
    write_voc(tmp_path, {"train": ["2007_000001"], "val": ["2007_000002"]})
    root = tmp_path / "VOCdevkit" / "VOC2012"
    with pytest.raises(DataError) as info:
        VOCDataset(root=root, train_split="train_aug")
    message = str(info.value)
    assert str(root / "SegmentationClassAug") in message and "train_aug.txt" in message
    assert "scripts/prepare/voc.py" in message and "benchmark.tgz" in message
    assert len(VOCDataset(split="val", root=root, train_split="train_aug")) == 1


def test_voc_wrong_root_and_missing_files(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(DataError) as info:
        VOCDataset(root=missing)
    message = str(info.value)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        assert str(missing / sub) in message
    assert "no folder" in message and "VOCtrainval_11-May-2012.tar" in message

    write_voc(tmp_path / "data", {"train": ["2007_000001", "2007_000003"], "val": ["2007_000002"]})
    with pytest.raises(DataError, match="did you mean") as info:
        VOCDataset(root=tmp_path / "data")
    assert f"dataset.root={tmp_path / 'data' / 'VOCdevkit' / 'VOC2012'}" in str(info.value)
    assert "found VOCdevkit/." in str(info.value)
    root = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    with pytest.raises(DataError, match="itself one of the sub-folders"):
        VOCDataset(root=root / "SegmentationClass")

    (root / "SegmentationClass" / "2007_000003.png").unlink()
    with pytest.raises(DataError) as info:
        VOCDataset(root=root)
    assert "2007_000003 (label)" in str(info.value) and "2007_000001" not in str(info.value)
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DataError, match="val.txt not found"):
        VOCDataset(split="val", root=root)


# -- scripts/prepare/voc.py -------------------------------------------------------------------
def test_train_aug_rule():
    prepare_voc = load_script("prepare/voc")
    ids = prepare_voc.train_aug_ids(sbd_train=["a", "b", "v1"], sbd_val=["c", "b"],
                                    voc_train=["d", "a"], voc_val=["v1", "v2"])
    assert ids == ["a", "b", "c", "d"]  # union, deduplicated, VOC val removed, sorted
    assert prepare_voc.EXPECTED["train_aug"] == 10582


def test_sbd_reader_without_scipy_says_how(monkeypatch, tmp_path):
    prepare_voc = load_script("prepare/voc")
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(PrepareError, match="pip install scipy"):
        prepare_voc.read_sbd_cls(tmp_path / "2008_000002.mat")


VOC_SPLITS = {"train": ["2007_000032", "2007_000039", "2008_000008"],
              "val": ["2007_000033", "2008_000009"]}

SBD_TRAIN = ["2007_000032", "2008_000002", "2008_000003", "2008_000009"]  # 2008_000009 is VOC val

SBD_VAL = ["2008_000004", "2007_000039", "2011_000001"]  # 2011_000001: not in JPEGImages


def make_voc_archives(build: Path, out: Path) -> tuple[dict, dict]:
    labels = write_voc(build, VOC_SPLITS)
    for stem in SBD_TRAIN + SBD_VAL:  # the SBD images VOC2012 has (all but 2011_000001)
        if stem != "2011_000001" and stem not in labels:
            write_rgb(build / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{stem}.jpg", 99, (6, 9))
    segmentations = write_sbd(build, SBD_TRAIN, SBD_VAL)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "VOCtrainval_11-May-2012.tar", "w") as tar:
        tar.add(build / "VOCdevkit", arcname="VOCdevkit")
    with tarfile.open(out / "benchmark.tgz", "w:gz") as tar:
        tar.add(build / "benchmark_RELEASE", arcname="benchmark_RELEASE")
    return labels, segmentations


def test_prepare_voc_builds_train_aug_and_is_idempotent(tmp_path, capsys):
    src, dst = tmp_path / "downloads", tmp_path / "voc"
    labels, segmentations = make_voc_archives(tmp_path / "build", src)
    prepare_voc = load_script("prepare/voc")
    assert prepare_voc.main(["--src", str(src), "--dst", str(dst), "--no-download"]) == 0
    out = capsys.readouterr().out
    root = dst / "VOCdevkit" / "VOC2012"
    ids = (root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    # (SBD train + SBD val + VOC train) minus VOC val, sorted
    assert ids == ["2007_000032", "2007_000039", "2008_000002", "2008_000003", "2008_000004",
                   "2008_000008", "2011_000001"]
    aug = root / "SegmentationClassAug"
    assert sorted(p.stem for p in aug.glob("*.png")) == sorted(set(labels) | set(segmentations))
    for image_id, label in labels.items():  # VOC's own labels win, boundaries (255) kept
        with Image.open(aug / f"{image_id}.png") as png:
            assert png.mode == "L"
            np.testing.assert_array_equal(np.array(png), label)
    for image_id in ("2008_000002", "2008_000004", "2011_000001"):  # SBD-only: from the .mat
        np.testing.assert_array_equal(np.array(Image.open(aug / f"{image_id}.png")),
                                      segmentations[image_id])
    assert (root / "JPEGImages" / "2011_000001.jpg").is_file()  # copied from SBD's img/
    train_aug = VOCDataset(root=root, train_split="train_aug")
    assert len(train_aug) == 7
    assert train_aug.samples[0][1] == aug / "2007_000032.png"
    assert "train_aug" in out and "checks passed" in out and "(allowed: 0..20, 255)" in out
    assert "dataset=voc_aug" in out
    marker = json.loads((root / ".segexp_prepare_voc.json").read_text())
    assert marker["counts"] == {"train": 3, "val": 2, "trainval": 5, "train_aug": 7}
    used = [*labels.values(), *(seg for i, seg in segmentations.items() if i not in labels)]
    assert marker["values"] == sorted(set().union(*(np.unique(a).tolist() for a in used)))

    mtimes = {p: p.stat().st_mtime_ns for p in aug.glob("*.png")}
    assert prepare_voc.main(["--src", str(src), "--dst", str(dst), "--no-download"]) == 0
    out = capsys.readouterr().out
    assert "already prepared" in out and "skipping every step" in out
    assert {p: p.stat().st_mtime_ns for p in aug.glob("*.png")} == mtimes

    # --force redoes everything (extraction included) and ends in the same state
    assert prepare_voc.main(["--src", str(src), "--dst", str(dst), "--force", "--no-download"]) == 0
    out = capsys.readouterr().out
    assert "redoing" in out and "checks passed" in out
    assert (root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split() == ids


def test_prepare_voc_downloads_and_refuses_bad_labels(tmp_path, capsys, monkeypatch):
    mirror = tmp_path / "mirror"
    make_voc_archives(tmp_path / "build", mirror)
    prepare_voc = load_script("prepare/voc")
    src, dst = tmp_path / "downloads", tmp_path / "voc"
    with pytest.raises(PrepareError) as info:
        prepare_voc.main(["--src", str(src), "--dst", str(dst), "--no-download"])
    assert "VOCtrainval_11-May-2012.tar" in str(info.value) and "host.robots.ox.ac.uk" in str(info.value)
    monkeypatch.setattr(prepare_voc, "VOC_URL", file_url(mirror / "VOCtrainval_11-May-2012.tar"))
    monkeypatch.setattr(prepare_voc, "SBD_URL", file_url(mirror / "benchmark.tgz"))
    # a bad SBD label: the run fails, names it, and writes no marker
    scipy_io = pytest.importorskip("scipy.io")
    bad = tmp_path / "build" / "benchmark_RELEASE" / "dataset" / "cls" / "2008_000003.mat"
    scipy_io.savemat(bad, {"GTcls": {"Segmentation": np.full((6, 9), 30, np.uint8)}})
    with tarfile.open(mirror / "benchmark.tgz", "w:gz") as tar:
        tar.add(tmp_path / "build" / "benchmark_RELEASE", arcname="benchmark_RELEASE")
    with pytest.raises(PrepareError, match="2008_000003.mat holds label values"):
        prepare_voc.main(["--src", str(src), "--dst", str(dst)])
    assert (src / "VOCtrainval_11-May-2012.tar").is_file() and (src / "benchmark.tgz").is_file()
    assert not (dst / "VOCdevkit" / "VOC2012" / ".segexp_prepare_voc.json").exists()
    assert "PROBLEM" in capsys.readouterr().out


def test_prepare_voc_in_place_on_extracted_folders(tmp_path, capsys, monkeypatch):
    """--src holding the extracted VOCdevkit/ and benchmark_RELEASE/ (no archives): prepared in
    place, nothing downloaded or copied to the default --dst."""
    write_voc(tmp_path / "src", VOC_SPLITS)
    write_sbd(tmp_path / "src", SBD_TRAIN, SBD_VAL)
    monkeypatch.setenv("SEGEXP_DATA", str(tmp_path / "data"))
    prepare_voc = load_script("prepare/voc")
    argv = ["--src", str(tmp_path / "src"), "--no-download"]
    assert prepare_voc.main(argv) == 0
    root = tmp_path / "src" / "VOCdevkit" / "VOC2012"
    assert "using it in place" in capsys.readouterr().out
    assert len(VOCDataset(root=root, train_split="train_aug")) == 7
    assert not (tmp_path / "data").exists()
    assert prepare_voc.main(argv) == 0
    assert "already prepared" in capsys.readouterr().out
    # a removed output invalidates the marker: the next run redoes the missing file only
    (root / "SegmentationClassAug" / "2008_000004.png").unlink()
    assert prepare_voc.main(argv) == 0
    assert "1 label PNG(s) written, 8 already there" in capsys.readouterr().out


# -- a debug training run on each VOC config --------------------------------------------------
def write_voc_aug(root: Path) -> Path:
    """A prepared tree (what scripts/prepare/voc.py leaves): SegmentationClassAug + train_aug.txt."""
    labels = write_voc(root, {"train": ["2007_000001"], "val": ["2007_000002"]}, shape=(20, 24))
    voc = root / "VOCdevkit" / "VOC2012"
    for k, image_id in enumerate(["2007_000001", "2008_000003", "2008_000004"]):
        if image_id not in labels:
            write_rgb(voc / "JPEGImages" / f"{image_id}.jpg", 40 * k, (20, 24))
        write_gray(voc / "SegmentationClassAug" / f"{image_id}.png",
                   labels.get(image_id, voc_label(k + 3, (20, 24))))
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "2007_000001\n2008_000003\n2008_000004\n")
    return voc


@pytest.mark.parametrize("dataset", ["voc", "voc_aug"])
def test_debug_run_on_each_voc_config(dataset, tmp_path, request):
    if dataset == "voc":  # the real sample: its train list holds one image, trainval two
        root = request.getfixturevalue("shared_datasets") / "samples" / "voc" / "VOCdevkit" / "VOC2012"
        extra = ["dataset.train_split=trainval"]
    else:
        root, extra = write_voc_aug(tmp_path / "data"), []
    cfg = debug_config(dataset, root, *extra)
    if dataset == "voc_aug":
        assert cfg.dataset.train_split == "train_aug"
    assert_debug_run(cfg, tmp_path / "run", num_classes=21)
