"""Cityscapes (segexp/data/cityscapes.py): label conversion checked against the real sample in
../shared/datasets/samples (skipped without it), and the loader, its errors and Hydra composition
checked on fixtures written in the original on-disk layout; scripts/prepare/cityscapes.py on local
archives."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from segexp.data.cityscapes import CityscapesDataset, label_ids_to_train_ids
from segexp.data.prepare import PrepareError
from segexp.errors import ConfigError, DataError
from tests.conftest import compose_config, load_script
from tests.data.conftest import expected_train_ids, solid_rgb, write_gray, write_png, write_rgb

FRAME = "frankfurt_000000_000294"


def all_label_ids(shape=(8, 16), shift: int = 0) -> np.ndarray:
    """Every Cityscapes label id 0..33 (and an unknown 250), rolled by ``shift``."""
    values = np.resize(np.append(np.arange(34), 250), shape[0] * shape[1])
    return np.roll(values, shift).reshape(shape).astype(np.uint8)


def write_cityscapes(root: Path, frames: dict[str, list[str]], train_ids: bool = False) -> dict:
    """``frames``: split -> ["city/name", ...]. Writes leftImg8bit + gtFine as the zips unpack
    (with the colour / instance / polygon files a loader must skip). Returns path -> labelIds."""
    labels = {}
    for split, names in frames.items():
        for k, city_name in enumerate(names):
            city, name = city_name.split("/")
            write_png(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", solid_rgb(10 * k))
            gt = root / "gtFine" / split / city
            label_ids = all_label_ids(shift=k)
            write_png(gt / f"{name}_gtFine_labelIds.png", label_ids)
            write_png(gt / f"{name}_gtFine_instanceIds.png", label_ids)
            write_png(gt / f"{name}_gtFine_color.png", solid_rgb(1))
            (gt / f"{name}_gtFine_polygons.json").write_text("{}")
            if train_ids:
                write_png(gt / f"{name}_gtFine_labelTrainIds.png", expected_train_ids(label_ids))
            labels[f"{split}/{city_name}"] = label_ids
    (root / "README").write_text("cityscapes")
    (root / "license.txt").write_text("licence")
    return labels



CITY_FRAMES = {"train": ["bremen/bremen_000000_000019", "aachen/aachen_000001_000019",
                         "aachen/aachen_000000_000019"],
               "val": ["lindau/lindau_000000_000019"],
               "test": ["berlin/berlin_000000_000019"]}


# -- Cityscapes -------------------------------------------------------------------------------
def test_cityscapes_label_ids_fixture_converts_with_official_table(tmp_path):
    labels = write_cityscapes(tmp_path, CITY_FRAMES)
    train = CityscapesDataset(root=tmp_path)
    assert len(train) == 3 and train.num_classes == 19 and len(train.colours) == 19
    assert [image.name for image, _, _ in train.samples] == [
        "aachen_000000_000019_leftImg8bit.png", "aachen_000001_000019_leftImg8bit.png",
        "bremen_000000_000019_leftImg8bit.png"]
    for index, key in enumerate(["aachen/aachen_000000_000019", "aachen/aachen_000001_000019",
                                 "bremen/bremen_000000_000019"]):
        sample = train.load(index)
        raw = labels[f"train/{key}"]
        np.testing.assert_array_equal(sample.mask, expected_train_ids(raw))
        assert sample.source.endswith("_gtFine_labelIds.png")
    # every trainId appears, and so do ignored ids (0..6, 9, 10, ..., 250)
    assert set(np.unique(train.load(0).mask).tolist()) == set(range(19)) | {255}
    sample = train.load(2)  # bremen, the fixture's k = 0 frame: red 0
    assert sample.image.shape == (8, 16, 3) and tuple(sample.image[0, 0]) == (0, 10, 200)
    image, mask = train[2]
    assert image.dtype == torch.float32 and image.shape == (3, 8, 16)
    assert mask.dtype == torch.int64
    np.testing.assert_array_equal(mask.numpy(), expected_train_ids(labels[
        "train/bremen/bremen_000000_000019"]))
    assert len(CityscapesDataset(split="val", root=tmp_path)) == 1
    assert len(CityscapesDataset(split="test", root=tmp_path)) == 1


def test_cityscapes_prefers_label_train_ids(tmp_path):
    write_cityscapes(tmp_path, {"val": CITY_FRAMES["val"]})
    # A labelTrainIds file that differs from the conversion proves which file is read.
    trainids = tmp_path / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"
    write_png(trainids, np.full((8, 16), 7, np.uint8))
    sample = CityscapesDataset(split="val", root=tmp_path).load(0)
    assert sample.source == str(trainids)
    np.testing.assert_array_equal(sample.mask, np.full((8, 16), 7))


def test_cityscapes_conversion_function_is_the_official_table():
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(label_ids_to_train_ids(ids), expected_train_ids(ids))
    assert CityscapesDataset.class_names[:3] == ("road", "sidewalk", "building")
    assert CityscapesDataset.class_names[-1] == "bicycle"
    assert CityscapesDataset.palette[0] == (128, 64, 128)
    assert CityscapesDataset.palette[13] == (0, 0, 142)  # car


def test_cityscapes_missing_labels_name_the_frame(tmp_path):
    write_cityscapes(tmp_path, {"train": CITY_FRAMES["train"]})
    (tmp_path / "gtFine/train/bremen/bremen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError) as info:
        CityscapesDataset(root=tmp_path)
    message = str(info.value)
    assert "bremen/bremen_000000_000019" in message and "aachen" not in message
    assert "labelTrainIds" in message and "labelIds" in message


def test_cityscapes_wrong_root_names_expected_subfolders(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(DataError) as info:
        CityscapesDataset(root=missing)
    message = str(info.value)
    assert str(missing / "leftImg8bit") in message and str(missing / "gtFine") in message
    assert "no folder" in message and "cityscapes-dataset.com" in message
    assert "gtFine_trainvaltest.zip" in message and "leftImg8bit_trainvaltest.zip" in message

    write_cityscapes(tmp_path / "cityscapes", {"val": CITY_FRAMES["val"]})
    with pytest.raises(DataError, match="did you mean") as info:
        CityscapesDataset(root=tmp_path, split="val")
    assert f"dataset.root={tmp_path / 'cityscapes'}" in str(info.value)
    assert "found cityscapes/." in str(info.value)

    with pytest.raises(DataError, match="itself one of the sub-folders"):
        CityscapesDataset(root=tmp_path / "cityscapes" / "gtFine", split="val")

    shutil.rmtree(tmp_path / "cityscapes" / "gtFine")
    with pytest.raises(DataError, match="Extract gtFine_trainvaltest.zip there"):
        CityscapesDataset(root=tmp_path / "cityscapes", split="val")


def test_cityscapes_missing_split_and_bad_split(tmp_path):
    write_cityscapes(tmp_path, {"val": CITY_FRAMES["val"]})
    with pytest.raises(DataError) as info:
        CityscapesDataset(root=tmp_path, split="train")
    message = str(info.value)
    assert str(tmp_path / "leftImg8bit" / "train") in message and "holds val/" in message
    assert "(dataset.train_split)" in message and "dataset.train_split / dataset.val_split" in message
    with pytest.raises(ConfigError, match="train, val, test or trainval"):
        CityscapesDataset(root=tmp_path, split="validation")
    with pytest.raises(ConfigError, match="dataset.train_split 'training'"):
        CityscapesDataset(root=tmp_path, train_split="training")
    # A download with val only (as the shared sample) still trains, by naming the split.
    assert len(CityscapesDataset(root=tmp_path, split="train", train_split="val")) == \
        len(CITY_FRAMES["val"])


def test_cityscapes_trainval_reads_both_splits_and_test_labels_are_never_scored(tmp_path):
    write_cityscapes(tmp_path, CITY_FRAMES)
    train = CityscapesDataset(root=tmp_path, split="train")
    val = CityscapesDataset(root=tmp_path, split="val")
    both = CityscapesDataset(root=tmp_path, split="train", train_split="trainval")
    assert [s[0] for s in both.samples] == [s[0] for s in train.samples + val.samples]
    assert CityscapesDataset(root=tmp_path, split="trainval").samples == both.samples
    swapped = CityscapesDataset(root=tmp_path, split="val", val_split="train")
    assert swapped.samples == train.samples
    with pytest.raises(ConfigError, match="withholds the test labels.*segexp-predict"):
        CityscapesDataset(root=tmp_path, split="val", val_split="test")


def test_cityscapes_num_classes_disagreement(tmp_path):
    write_cityscapes(tmp_path, {"val": CITY_FRAMES["val"]})
    with pytest.raises(DataError, match="num_classes=20") as info:
        CityscapesDataset(root=tmp_path, split="val", num_classes=20)
    assert "dataset.num_classes=19" in str(info.value)
    assert CityscapesDataset(root=tmp_path, split="val", num_classes=None).num_classes == 19


def test_cityscapes_real_label_ids_convert_to_label_train_ids(shared_datasets, tmp_path):
    """The real frame's labelIds, converted, against its labelTrainIds.

    The two files of this downscaled (256x128) sample were resampled separately: they agree
    exactly inside every region but 77 of 32768 pixels on region boundaries differ by a
    one- or two-pixel shift (the labelIds agree exactly with the frame's instanceIds, so it is
    labelTrainIds that moved). So: exact inside regions, boundary pixels within 2 pixels."""
    root = shared_datasets / "samples" / "cityscapes"
    gt = root / "gtFine" / "val" / "frankfurt"
    label_ids = np.array(Image.open(gt / f"{FRAME}_gtFine_labelIds.png"))
    train_ids = np.array(Image.open(gt / f"{FRAME}_gtFine_labelTrainIds.png"))
    assert label_ids.shape == train_ids.shape == (128, 256) and len(np.unique(label_ids)) > 5
    converted = label_ids_to_train_ids(label_ids)
    kernel = np.ones((5, 5), np.uint8)
    interior = cv2.dilate(label_ids, kernel) == cv2.erode(label_ids, kernel)  # uniform 5x5
    assert interior.mean() > 0.6
    np.testing.assert_array_equal(converted[interior], train_ids[interior])
    assert set(np.unique(converted).tolist()) == set(np.unique(train_ids).tolist())
    differ = converted != train_ids
    assert differ.sum() <= 0.005 * differ.size
    padded = np.pad(converted, 2, constant_values=254)
    nearby = np.zeros(differ.shape, bool)
    for dy in range(5):
        for dx in range(5):
            nearby |= padded[dy:dy + 128, dx:dx + 256] == train_ids
    assert nearby.all(), np.argwhere(~nearby)[:10]

    # The dataset on the real tree reads labelTrainIds ...
    ds = CityscapesDataset(split="val", root=root)
    assert len(ds) == 1
    sample = ds.load(0)
    assert sample.source.endswith("_gtFine_labelTrainIds.png")
    assert sample.image.shape == (128, 256, 3) and sample.image.dtype == np.uint8
    np.testing.assert_array_equal(sample.mask, train_ids)
    # ... and a copy without them converts labelIds.
    copy = tmp_path / "cityscapes"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("*labelTrainIds.png"))
    converted_ds = CityscapesDataset(split="val", root=copy)
    assert converted_ds.load(0).source.endswith("_gtFine_labelIds.png")
    np.testing.assert_array_equal(converted_ds.load(0).mask, expected_train_ids(label_ids))
    image, mask = converted_ds[0]
    assert image.shape == (3, 128, 256) and mask.dtype == torch.int64
    np.testing.assert_array_equal(mask.numpy(), converted)


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
    prepare = load_script("prepare/cityscapes")
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
    prepare = load_script("prepare/cityscapes")
    assert prepare.main(["--src", str(tmp_path / "nothing"), "--dst", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "no train split" in out and "checks passed" in out
    gt = copy / "gtFine" / "val" / "frankfurt"
    label_ids = np.array(Image.open(gt / "frankfurt_000000_000294_gtFine_labelIds.png"))
    written = np.array(Image.open(gt / "frankfurt_000000_000294_gtFine_labelTrainIds.png"))
    np.testing.assert_array_equal(written, expected_train_ids(label_ids))



def test_hydra_cityscapes_config_instantiates(tmp_path, monkeypatch):
    write_cityscapes(tmp_path / "cityscapes", {"val": CITY_FRAMES["val"],
                                               "train": CITY_FRAMES["train"][:1]})
    monkeypatch.setenv("SEGEXP_DATA", str(tmp_path))
    cfg = compose_config("dataset=cityscapes")
    assert cfg.dataset.root == str(tmp_path / "cityscapes")  # the SEGEXP_DATA default
    cfg = compose_config("dataset=cityscapes", f"dataset.root={tmp_path / 'cityscapes'}")
    assert list(cfg.dataset.crop_size) == [512, 1024] and list(cfg.dataset.base_size) == [1024, 2048]
    assert cfg.dataset.num_classes == 19
    ds = instantiate(cfg.dataset, split="val", transforms=instantiate(cfg.transforms.val))
    assert isinstance(ds, CityscapesDataset) and len(ds) == 1
    image, mask = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 1024, 2048)  # 8x16 fits base_size
    assert mask.dtype == torch.int64 and mask.shape == (1024, 2048)
    assert set(mask.unique().tolist()) == set(range(19)) | {255}
    train = instantiate(cfg.dataset, split="train", transforms=instantiate(cfg.transforms.train))
    image, mask = train[(0, 1)]
    assert image.shape == (3, 512, 1024) and mask.shape == (512, 1024)

