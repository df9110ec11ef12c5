"""DIS5K (segexp/data/dis5k.py): fixtures written in tmp_path in the original on-disk format (no
real samples exist in ../shared), checked for the splits, pairing, the foreground threshold on
anti-aliased masks and the errors of a wrong root or an unpaired file."""

from __future__ import annotations

import numpy as np
import pytest

from segexp.data.dis5k import DIS5KDataset, binarize
from segexp.errors import ConfigError, DataError
from tests.data.conftest import SHAPE, write_dis5k


def test_dis5k_splits_pairing_and_threshold(tmp_path):
    gts = write_dis5k(tmp_path)
    lengths = {split: len(DIS5KDataset(split=split, root=tmp_path))
               for split in ("train", "val", "test", "test1", "test2", "test3", "test4")}
    assert lengths == {"train": 3, "val": 1, "test": 5, "test1": 1, "test2": 1, "test3": 2,
                       "test4": 1}
    # train_split / val_split choose what the trainer's splits read
    trainval = DIS5KDataset(split="train", train_split="trainval", root=tmp_path)
    assert [image.parts[-3] for image, _ in trainval.samples] == ["DIS-TR"] * 3 + ["DIS-VD"]
    on_te3 = DIS5KDataset(split="val", val_split="test3", root=tmp_path)
    assert {image.parts[-3] for image, _ in on_te3.samples} == {"DIS-TE3"} and len(on_te3) == 2
    with pytest.raises(ConfigError, match=r"dataset.val_split 'DIS-TE1'.*test1..test4"):
        DIS5KDataset(split="val", val_split="DIS-TE1", root=tmp_path)
    for split in ("train", "test"):
        ds = DIS5KDataset(split=split, root=tmp_path)
        assert ds.class_names == ("background", "foreground") and ds.num_classes == 2
        for i, (image_path, gt_path) in enumerate(ds.samples):
            assert image_path.stem == gt_path.stem and image_path.parts[-3] == gt_path.parts[-3]
            gt = gts[f"{gt_path.parts[-3]}/{gt_path.stem}"]
            assert ((gt > 0) & (gt < 255)).sum() > 10  # the fixture is anti-aliased
            sample = ds.load(i)
            np.testing.assert_array_equal(sample.mask, (gt >= 128).astype(np.uint8))
            assert set(np.unique(sample.mask).tolist()) == {0, 1}
    np.testing.assert_array_equal(binarize(np.array([0, 1, 127, 128, 129, 254, 255])),
                                  [0, 0, 0, 1, 1, 1, 1])  # "threshold at 128": 128 is foreground
    high = DIS5KDataset(root=tmp_path, threshold=250).load(0).mask
    assert high.sum() < DIS5KDataset(root=tmp_path).load(0).mask.sum()
    image, mask = DIS5KDataset(root=tmp_path)[0]
    assert image.shape == (3,) + SHAPE and set(mask.unique().tolist()) == {0, 1}


def test_dis5k_wrong_root_and_unpaired_files(tmp_path):
    with pytest.raises(DataError) as info:
        DIS5KDataset(root=tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "DIS-TR") in message and "DIS-TE4" in message
    assert "DIS5K.zip" in message and "drive.google.com" in message
    write_dis5k(tmp_path / "DIS5K")
    with pytest.raises(DataError, match="did you mean dataset.root=.*DIS5K"):
        DIS5KDataset(root=tmp_path)
    with pytest.raises(DataError, match="itself a subset folder"):
        DIS5KDataset(root=tmp_path / "DIS5K" / "DIS-TR")
    with pytest.raises(ConfigError, match="test1..test4"):
        DIS5KDataset(split="test5", root=tmp_path / "DIS5K")
    lonely = sorted((tmp_path / "DIS5K" / "DIS-VD" / "gt").glob("*.png"))[0]
    lonely.unlink()
    with pytest.raises(DataError, match="have no <name>.png") as info:
        DIS5KDataset(split="val", root=tmp_path / "DIS5K")
    assert lonely.stem in str(info.value)
    for gt in (tmp_path / "DIS5K" / "DIS-TE2" / "gt").iterdir():
        gt.unlink()
    (tmp_path / "DIS5K" / "DIS-TE2" / "gt").rmdir()
    with pytest.raises(DataError, match="DIS-TE2"):
        DIS5KDataset(split="test", root=tmp_path / "DIS5K")
