"""Cityscapes and ADE20K: label conversion checked against the real samples in
../shared/datasets/samples (skipped without them), and loaders, errors and Hydra composition
checked on fixtures written in the original on-disk layouts; scripts/prepare/cityscapes.py and
scripts/prepare/ade20k.py on local archives."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from segexp.data.ade20k import ADE20KDataset, reduce_zero_label
from segexp.data.cityscapes import CityscapesDataset, label_ids_to_train_ids
from segexp.data.prepare import PrepareError
from segexp.errors import ConfigError, DataError
from tests.conftest import compose_config, load_script
from tests.data.conftest import expected_train_ids, file_url, write_gray, write_rgb

FRAME = "frankfurt_000000_000294"


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        cv2.imwrite(str(path), cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
    else:
        Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def rgb(value: int, shape=(8, 16)) -> np.ndarray:
    image = np.zeros(shape + (3,), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = value, 10, 200  # R differs from B: order shows
    return image


# -- fixtures in the original layouts ---------------------------------------------------------
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
            write_png(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", rgb(10 * k))
            gt = root / "gtFine" / split / city
            label_ids = all_label_ids(shift=k)
            write_png(gt / f"{name}_gtFine_labelIds.png", label_ids)
            write_png(gt / f"{name}_gtFine_instanceIds.png", label_ids)
            write_png(gt / f"{name}_gtFine_color.png", rgb(1))
            (gt / f"{name}_gtFine_polygons.json").write_text("{}")
            if train_ids:
                write_png(gt / f"{name}_gtFine_labelTrainIds.png", expected_train_ids(label_ids))
            labels[f"{split}/{city_name}"] = label_ids
    (root / "README").write_text("cityscapes")
    (root / "license.txt").write_text("licence")
    return labels


def ade_annotation(k: int, shape=(6, 10)) -> np.ndarray:
    """Values spread over 0..150, always holding 0 ("other"), 1 and 150."""
    annotation = ((np.arange(shape[0] * shape[1]) * 7 + k) % 151).reshape(shape)
    annotation[0, :3] = (0, 1, 150)
    return annotation.astype(np.uint8)


def write_ade20k(root: Path, names: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """``names``: folder (training/validation) -> stems. Returns stem -> raw annotation."""
    annotations = {}
    for folder, stems in names.items():
        for k, stem in enumerate(stems):
            (root / "images" / folder).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "images" / folder / f"{stem}.jpg"), rgb(50 * k, (6, 10)))
            annotations[stem] = ade_annotation(k)
            write_png(root / "annotations" / folder / f"{stem}.png", annotations[stem])
    (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n")
    (root / "sceneCategories.txt").write_text("")
    return annotations


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
    with pytest.raises(ConfigError, match="train, val or test"):
        CityscapesDataset(root=tmp_path, split="validation")


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


# -- ADE20K -----------------------------------------------------------------------------------
def test_ade20k_fixture_reduce_zero_label(tmp_path):
    raw = write_ade20k(tmp_path, {"training": ["ADE_train_00000002", "ADE_train_00000001"],
                                  "validation": ["ADE_val_00000001"]})
    train = ADE20KDataset(root=tmp_path)
    val = ADE20KDataset(split="val", root=tmp_path)
    assert (len(train), len(val)) == (2, 1)
    assert [image.stem for image, _ in train.samples] == ["ADE_train_00000001",
                                                          "ADE_train_00000002"]
    for ds in (train, val):
        for index, (image_path, _) in enumerate(ds.samples):
            sample = ds.load(index)
            annotation = raw[image_path.stem].astype(np.int64)
            np.testing.assert_array_equal(sample.mask,
                                          np.where(annotation == 0, 255, annotation - 1))
            assert sample.image.shape == (6, 10, 3)
    mask = train.load(0).mask
    assert mask.min() == 0 and mask.max() == 255 and 149 in mask  # 1 -> 0, 0 -> 255, 150 -> 149
    image, mask = val[0]
    assert image.dtype == torch.float32 and image.shape == (3, 6, 10) and mask.dtype == torch.int64


def test_ade20k_metadata_and_reduce_function():
    names = ADE20KDataset.class_names
    assert len(names) == len(set(names)) == len(ADE20KDataset.palette) == 150
    assert names[:8] == ("wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed")
    assert names[-1] == "flag" and all(name == name.strip() for name in names)
    assert ADE20KDataset.palette[0] == (120, 120, 120) and ADE20KDataset.palette[-1] == (92, 0, 255)
    values = np.arange(256, dtype=np.uint8)
    expected = np.where(values == 0, 255, values.astype(np.int64) - 1)
    expected[255] = 255
    np.testing.assert_array_equal(reduce_zero_label(values), expected)


def test_ade20k_values_above_150_are_refused(tmp_path):
    write_ade20k(tmp_path, {"validation": ["ADE_val_00000001"]})
    bad = np.zeros((6, 10), np.uint8)
    bad[0, 0] = 200
    write_png(tmp_path / "annotations" / "validation" / "ADE_val_00000001.png", bad)
    with pytest.raises(DataError, match="values 199") as info:
        ADE20KDataset(split="val", root=tmp_path)[0]
    assert "ADE_val_00000001.png" in str(info.value)


def test_ade20k_missing_annotation_names_the_image(tmp_path):
    write_ade20k(tmp_path, {"training": ["ADE_train_00000001", "ADE_train_00000002"]})
    (tmp_path / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(DataError, match="ADE_train_00000002") as info:
        ADE20KDataset(root=tmp_path)
    assert "ADE_train_00000001" not in str(info.value)


def test_ade20k_wrong_root_names_expected_subfolders(tmp_path):
    with pytest.raises(DataError) as info:
        ADE20KDataset(root=tmp_path / "missing")
    message = str(info.value)
    assert str(tmp_path / "missing" / "images" / "training") in message
    assert str(tmp_path / "missing" / "annotations" / "training") in message
    assert "ADEChallengeData2016.zip" in message and "no folder" in message

    write_ade20k(tmp_path / "ADEChallengeData2016", {"validation": ["ADE_val_00000001"]})
    with pytest.raises(DataError, match="did you mean") as info:
        ADE20KDataset(split="val", root=tmp_path)
    assert f"dataset.root={tmp_path / 'ADEChallengeData2016'}" in str(info.value)
    # a tree with validation only has no training split
    with pytest.raises(DataError, match="found annotations/, images/, objectInfo150.txt"):
        ADE20KDataset(split="train", root=tmp_path / "ADEChallengeData2016")
    with pytest.raises(ConfigError, match="train or val"):
        ADE20KDataset(split="validation", root=tmp_path / "ADEChallengeData2016")


def test_ade20k_num_classes_disagreement(tmp_path):
    write_ade20k(tmp_path, {"validation": ["ADE_val_00000001"]})
    with pytest.raises(DataError, match="num_classes=151") as info:
        ADE20KDataset(split="val", root=tmp_path, num_classes=151)
    assert "dataset.num_classes=150" in str(info.value)


def test_ade20k_real_samples_reduce_zero_label(shared_datasets):
    root = shared_datasets / "samples" / "ade20k" / "ADEChallengeData2016"
    for split, folder in (("train", "training"), ("val", "validation")):
        ds = ADE20KDataset(split=split, root=root)
        assert len(ds) == 1
        image_path, annotation_path = ds.samples[0]
        assert annotation_path.parent == root / "annotations" / folder
        raw = np.array(Image.open(annotation_path)).astype(np.int64)
        assert raw.max() <= 150 and (raw == 0).any() and (raw > 0).any()
        sample = ds.load(0)
        np.testing.assert_array_equal(sample.mask, np.where(raw == 0, 255, raw - 1))
        assert sample.image.shape == raw.shape + (3,) and sample.image.dtype == np.uint8
        image, mask = ds[0]
        assert image.shape == (3,) + raw.shape and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= set(range(150)) | {255}


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
    prepare = load_script("prepare/ade20k")
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


# -- Hydra composition ------------------------------------------------------------------------
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


def test_hydra_ade20k_config_instantiates(tmp_path, monkeypatch):
    root = tmp_path / "ade20k" / "ADEChallengeData2016"
    write_ade20k(root, {"validation": ["ADE_val_00000001"]})
    monkeypatch.setenv("SEGEXP_DATA", str(tmp_path))
    assert compose_config("dataset=ade20k").dataset.root == str(root)
    cfg = compose_config("dataset=ade20k", f"dataset.root={root}")
    assert list(cfg.dataset.crop_size) == [512, 512] and list(cfg.dataset.base_size) == [512, 2048]
    assert cfg.dataset.num_classes == 150
    ds = instantiate(cfg.dataset, split="val", transforms=instantiate(cfg.transforms.val))
    assert isinstance(ds, ADE20KDataset)
    image, mask = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 512, 853)  # 6x10 -> short side 512
    assert mask.dtype == torch.int64 and mask.shape == (512, 853)
    assert set(mask.unique().tolist()) <= set(range(150)) | {255} and 255 in mask


def test_debug_training_on_the_real_samples(tmp_path, shared_datasets):
    """trainer=debug on the Cityscapes and ADE20K configs pointed at the real samples."""
    from segexp.engine.experiment import run_training

    samples = shared_datasets / "samples"
    cityscapes = tmp_path / "cityscapes"  # the sample has a val split only: reuse it for train
    for split in ("train", "val"):
        for top in ("leftImg8bit", "gtFine"):
            shutil.copytree(samples / "cityscapes" / top / "val", cityscapes / top / split)
    runs = {"cityscapes": cityscapes, "ade20k": samples / "ade20k" / "ADEChallengeData2016"}
    for name, root in runs.items():
        run_dir = tmp_path / f"run_{name}"
        run_training(compose_config(f"dataset={name}", f"dataset.root={root}", "trainer=debug",
                                    "trainer.batch_size=1"), run_dir)  # one training image each
        summary = json.loads((run_dir / "metrics.json").read_text())
        assert summary["status"] == "completed", name
        assert len(summary["best_per_class"]) == {"cityscapes": 19, "ade20k": 150}[name]
