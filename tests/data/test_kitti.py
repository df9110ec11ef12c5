"""KITTI semantics: the loader on fixtures written as data_semantics.zip unpacks (Cityscapes label
ids converted to train ids, the fixed 160/40 split, the wrong-root messages); a trainer=debug run
on the kitti config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segexp.data.cityscapes import CityscapesDataset
from segexp.data.kitti import KITTIDataset, split_names
from segexp.errors import ConfigError, DataError
from tests.data.conftest import assert_debug_run, debug_config, expected_train_ids, write_kitti


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
    assert kitti_names(KITTIDataset(split="val", root=tmp_path, val_split="trainval")) == \
        kitti_names(trainval)
    with pytest.raises(ConfigError,
                       match="unknown dataset.val_split 'test' for kitti: use train, val or trainval"):
        KITTIDataset(split="val", root=tmp_path, val_split="test")


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


def test_debug_run_on_the_kitti_config(tmp_path):
    write_kitti(tmp_path / "data", n=5, shape=(20, 40))
    assert_debug_run(debug_config("kitti", tmp_path / "data"), tmp_path / "run", num_classes=19)
