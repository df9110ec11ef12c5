"""ADE20K (segexp/data/ade20k.py): reduce_zero_label checked on the real samples in
../shared/datasets/samples (skipped without them), and the loader, its errors and Hydra
composition checked on fixtures written in the original on-disk layout;
scripts/prepare/ade20k.py on a local archive."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from segexp.data.ade20k import ADE20KDataset, reduce_zero_label
from segexp.data.cityscapes import CityscapesDataset
from segexp.data.prepare import PrepareError
from segexp.errors import ConfigError, DataError
from tests.conftest import compose_config, load_script
from tests.data.conftest import file_url, solid_rgb, write_gray, write_png, write_rgb


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
            cv2.imwrite(str(root / "images" / folder / f"{stem}.jpg"), solid_rgb(50 * k, (6, 10)))
            annotations[stem] = ade_annotation(k)
            write_png(root / "annotations" / folder / f"{stem}.png", annotations[stem])
    (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n")
    (root / "sceneCategories.txt").write_text("")
    return annotations


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
    with pytest.raises(ConfigError, match="train, val or trainval"):
        ADE20KDataset(split="validation", root=tmp_path / "ADEChallengeData2016")
    with pytest.raises(ConfigError, match="dataset.val_split 'validation'"):
        ADE20KDataset(root=tmp_path / "ADEChallengeData2016", val_split="validation")
    # With validation only, training on it is a matter of naming the split.
    assert len(ADE20KDataset(split="train", train_split="val",
                             root=tmp_path / "ADEChallengeData2016")) == 1


def test_ade20k_trainval_reads_training_then_validation(tmp_path):
    write_ade20k(tmp_path, {"training": ["ADE_train_00000001", "ADE_train_00000002"],
                            "validation": ["ADE_val_00000001"]})
    both = ADE20KDataset(split="train", train_split="trainval", root=tmp_path)
    assert [image.name for image, _ in both.samples] == [
        "ADE_train_00000001.jpg", "ADE_train_00000002.jpg", "ADE_val_00000001.jpg"]
    assert ADE20KDataset(split="val", val_split="train", root=tmp_path).samples == both.samples[:2]


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

