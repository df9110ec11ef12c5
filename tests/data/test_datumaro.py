"""Datumaro's Common Semantic Segmentation (segexp/data/datumaro.py): exports written in tmp_path
in the original on-disk format (no real samples exist in ../shared), checked for pairing, class
names, index and colour masks, the ignore value and the errors of a wrong root, an unknown colour
or disagreeing meta files."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from segexp.data.datumaro import DatumaroDataset
from segexp.errors import DataError
from tests.data.conftest import (
    COLOURS,
    SHAPE,
    index_mask,
    write_datumaro,
    write_grey_image,
    write_rgb_image,
)


def test_datumaro_index_masks_with_otx_background(tmp_path):
    """OTX's assets: per-subset meta files, the train one without a background entry."""
    masks = write_datumaro(tmp_path, {"train": 3}, per_subset_meta={
        "label_map": {"1": "Rectangle", "2": "Circle"}})
    write_datumaro(tmp_path, {"val": 1}, per_subset_meta={
        "label_map": {"0": "Background", "1": "Rectangle", "2": "Circle"}})
    train = DatumaroDataset(root=tmp_path, num_classes=3)
    val = DatumaroDataset(split="val", root=tmp_path, num_classes=3)
    assert train.class_names == ("background", "Rectangle", "Circle")
    assert val.class_names == ("Background", "Rectangle", "Circle")
    assert (len(train), len(val)) == (3, 1)
    for i, (image_path, mask_path) in enumerate(train.samples):
        assert image_path.stem == mask_path.stem
        sample = train.load(i)
        np.testing.assert_array_equal(sample.mask, masks[f"train/{mask_path.stem}"])
        assert abs(int(sample.image[0, 0, 0]) - (10 * int(mask_path.stem[-1]) + 5)) <= 4  # jpg
    image, mask = train[0]
    assert set(mask.unique().tolist()) == {0, 1, 2, 255}  # 255 stays ignored
    with pytest.raises(DataError, match="num_classes=2"):
        DatumaroDataset(root=tmp_path, num_classes=2)


def test_datumaro_colour_masks_and_unknown_colour(tmp_path):
    meta = {"label_map": {"0": "background", "1": "car", "2": "sky"},
            "segmentation_colors": COLOURS, "background_label": "0"}
    masks = write_datumaro(tmp_path, {"train": 2, "validation": 1}, meta=meta, colour=True)
    ds = DatumaroDataset(root=tmp_path, num_classes=3)
    val = DatumaroDataset(split="val", root=tmp_path, num_classes=3)  # "validation" folder
    assert val.subset_dir.name == "validation" and len(val) == 1
    assert ds.colours == [tuple(c) for c in COLOURS]
    for i, (_, mask_path) in enumerate(ds.samples):
        np.testing.assert_array_equal(ds.load(i).mask, masks[f"train/{mask_path.stem}"])
    # A palette ("P") PNG is mapped through its colours too, as Datumaro does (here its palette
    # order differs from the class order: colours decide).
    classes = np.where(index_mask(0) == 255, 0, index_mask(0))
    p_mask = Image.fromarray(np.array([1, 2, 0], np.uint8)[classes], mode="P")
    p_mask.putpalette([0, 128, 255, 0, 0, 0, 255, 0, 0])
    p_mask.save(ds.samples[1][1])
    np.testing.assert_array_equal(ds.load(1).mask, classes)
    # An anti-aliased edge colour is not in segmentation_colors: the error says where and what.
    rgb = cv2.cvtColor(cv2.imread(str(ds.samples[0][1])), cv2.COLOR_BGR2RGB)
    rgb[2, 3] = (250, 3, 2)
    write_rgb_image(ds.samples[0][1], rgb)
    with pytest.raises(DataError) as info:
        ds[0]
    message = str(info.value)
    assert ds.samples[0][1].name in message and "(250, 3, 2)" in message
    assert "at 1 pixel(s)" in message and "nearest palette colour: (255, 0, 0)" in message
    assert "'car'" in message


def test_datumaro_layout_errors(tmp_path):
    with pytest.raises(DataError) as info:
        DatumaroDataset(root=tmp_path / "export", num_classes=2)
    message = str(info.value)
    assert str(tmp_path / "export" / "train") in message and "masks/" in message
    assert "dataset_meta.json" in message
    # a nested export
    write_datumaro(tmp_path / "export" / "dataset", {"train": 2},
                   meta={"label_map": {"0": "bg", "1": "a", "2": "b"}})
    with pytest.raises(DataError, match="did you mean dataset.root=.*dataset"):
        DatumaroDataset(root=tmp_path / "export", num_classes=3)
    root = tmp_path / "export" / "dataset"
    with pytest.raises(DataError, match="has the subsets train"):
        DatumaroDataset(split="val", root=root, num_classes=3)
    # a mask without its image; an image without a mask is left out
    (root / "train" / "images" / "train_0000.jpg").rename(root / "train" / "images" / "x.jpg")
    with pytest.raises(DataError, match="train_0000") as info:
        DatumaroDataset(root=root, num_classes=3)
    assert "no image" in str(info.value)
    write_grey_image(root / "train" / "masks" / "x.png", index_mask(0))
    (root / "train" / "masks" / "train_0000.png").unlink()
    assert [p[0].stem for p in DatumaroDataset(root=root, num_classes=3).samples] == ["train_0001",
                                                                                       "x"]
    # colour masks without segmentation_colors
    write_rgb_image(root / "train" / "masks" / "x.png", np.zeros(SHAPE + (3,), np.uint8))
    with pytest.raises(DataError, match="no segmentation_colors"):
        DatumaroDataset(root=root, num_classes=3).load(1)
    # label maps that disagree between subsets; gaps in the indices; no meta file
    write_datumaro(root, {"val": 1}, per_subset_meta={"label_map": {"0": "bg", "1": "b", "2": "a"}})
    with pytest.raises(DataError, match="same class indices"):
        DatumaroDataset(split="val", root=root, num_classes=3)
    (root / "val" / "dataset_meta.json").write_text(json.dumps({"label_map": {"0": "bg", "2": "b"}}))
    with pytest.raises(DataError, match="skips the class index"):
        DatumaroDataset(split="val", root=root, num_classes=3)
    (root / "val" / "dataset_meta.json").unlink()
    (root / "dataset_meta.json").unlink()
    with pytest.raises(DataError, match="no dataset_meta.json"):
        DatumaroDataset(split="val", root=root, num_classes=3)
