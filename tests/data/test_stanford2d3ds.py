"""Stanford 2D-3D-S (segexp/data/stanford2d3ds.py): fixtures written in tmp_path in the original
on-disk format (no real samples exist in ../shared), checked for pairing, class counts, value
ranges, the unlabelled/ignore mapping, the folds and the errors of a wrong root."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segexp.data.stanford2d3ds import Stanford2D3DSDataset
from segexp.errors import ConfigError, DataError
from tests.data.conftest import LABELS_2D3DS, MISSING, SHAPE, semantic_index, write_2d3ds

# The paper's class order, written out independently of the module (0 = unlabelled).
CLASSES_2D3DS = ["unlabelled", "ceiling", "floor", "wall", "beam", "column", "window", "door",
                 "table", "chair", "sofa", "bookcase", "board", "clutter"]


def expected_2d3ds(index: np.ndarray, unlabelled_as_class: bool = True) -> np.ndarray:
    out = np.zeros(index.shape, np.int64)
    for i, label in enumerate(LABELS_2D3DS):
        name = label.split("_")[0]
        out[index == i] = CLASSES_2D3DS.index(name) if name in CLASSES_2D3DS else 0
    out[index >= len(LABELS_2D3DS)] = 0
    if not unlabelled_as_class:
        out = np.where(out == 0, 255, out - 1)
    return out


@pytest.fixture
def root_2d3ds(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "2d3ds"
    return root, write_2d3ds(root, {"area_1": 3, "area_5a": 1, "area_5b": 1})


def test_2d3ds_decodes_unk_missing_and_unknown_classes_to_unlabelled(root_2d3ds):
    root, written = root_2d3ds
    train = Stanford2D3DSDataset(root=root, allow_missing_areas=True)
    val = Stanford2D3DSDataset(split="val", root=root)
    test = Stanford2D3DSDataset(split="test", root=root)
    assert (len(train), len(val), len(test)) == (3, 2, 2)
    assert list(train.class_names) == CLASSES_2D3DS and train.num_classes == 14
    assert len(train.colours) == 14
    # area_5a and area_5b together are area 5
    assert sorted(p[0].parts[-4] for p in val.samples) == ["area_5a", "area_5b"]
    for ds in (train, val):
        for i, (image_path, label_path) in enumerate(ds.samples):
            assert image_path.name[: -len("_rgb.png")] == label_path.name[: -len("_semantic.png")]
            sample = ds.load(i)
            index = written[f"{image_path.parts[-4]}/{image_path.name[: -len('_rgb.png')]}"]
            np.testing.assert_array_equal(sample.mask, expected_2d3ds(index))
            assert sample.mask.min() >= 0 and sample.mask.max() <= 13
            assert sample.image.shape == SHAPE + (3,)
    sample = train.load(0)
    index = semantic_index(0)
    # <UNK>, 0x0D0D0D and the unknown "stairs" class are class 0; every object class appears.
    assert (sample.mask[index == 0] == 0).all() and (sample.mask[index == MISSING] == 0).all()
    assert (sample.mask[index == LABELS_2D3DS.index("stairs_1_stairs_1_1")] == 0).all()
    assert set(np.unique(sample.mask).tolist()) == set(range(14))
    image, mask = train[0]
    assert image.shape == (3,) + SHAPE and mask.shape == SHAPE


def test_2d3ds_pairs_images_with_their_own_labels(root_2d3ds):
    root, written = root_2d3ds
    ds = Stanford2D3DSDataset(root=root, allow_missing_areas=True)
    for i, (image_path, _) in enumerate(ds.samples):
        k = int(image_path.name.split("_")[1][:4], 16)
        sample = ds.load(i)
        assert sample.image[0, 0, 0] == 10 * k + 5
        np.testing.assert_array_equal(sample.mask, expected_2d3ds(semantic_index(k)))


def test_2d3ds_unlabelled_as_ignore(root_2d3ds):
    root, _ = root_2d3ds
    ds = Stanford2D3DSDataset(split="val", root=root, num_classes=13, unlabelled_as_class=False)
    assert list(ds.class_names) == CLASSES_2D3DS[1:]
    sample = ds.load(0)
    k = int(ds.samples[0][0].name.split("_")[1][:4], 16)
    np.testing.assert_array_equal(sample.mask, expected_2d3ds(semantic_index(k), False))
    assert set(np.unique(sample.mask).tolist()) == set(range(13)) | {255}
    with pytest.raises(DataError, match="num_classes=14"):
        Stanford2D3DSDataset(split="val", root=root, num_classes=14, unlabelled_as_class=False)


def test_2d3ds_folds_and_missing_areas(root_2d3ds):
    root, _ = root_2d3ds
    with pytest.raises(DataError) as info:  # fold 1 trains on 1, 2, 3, 4, 6: four are missing
        Stanford2D3DSDataset(root=root)
    message = str(info.value)
    assert "area_2" in message and "area_6" in message and "allow_missing_areas" in message
    # fold 3: val = areas 1, 3, 6 (only area_1 here); train = 2, 4, 5 (area 5 only)
    val = Stanford2D3DSDataset(split="val", root=root, fold=3, allow_missing_areas=True)
    train = Stanford2D3DSDataset(root=root, fold=3, allow_missing_areas=True)
    assert {p[0].parts[-4] for p in val.samples} == {"area_1"}
    assert {p[0].parts[-4] for p in train.samples} == {"area_5a", "area_5b"}
    with pytest.raises(DataError, match="area_2"):  # fold 2 tests on 2 and 4: none present
        Stanford2D3DSDataset(split="test", root=root, fold=2, allow_missing_areas=True)
    with pytest.raises(ConfigError, match="folds 1, 2 and 3"):
        Stanford2D3DSDataset(root=root, fold=4)
    with pytest.raises(ConfigError, match="split"):
        Stanford2D3DSDataset(split="training", root=root)


def test_2d3ds_single_area_5_folder_works(tmp_path):
    write_2d3ds(tmp_path, {"area_5": 2})
    assert len(Stanford2D3DSDataset(split="test", root=tmp_path)) == 2


def test_2d3ds_wrong_root_names_expected_subfolders(tmp_path):
    with pytest.raises(DataError) as info:
        Stanford2D3DSDataset(root=tmp_path / "missing")
    message = str(info.value)
    assert str(tmp_path / "missing" / "area_1") in message and "area_5a" in message
    assert "semantic_labels.json" in message and "no folder" in message
    write_2d3ds(tmp_path / "download" / "2D-3D-Semantics", {"area_5a": 1})
    with pytest.raises(DataError, match="did you mean dataset.root=.*2D-3D-Semantics"):
        Stanford2D3DSDataset(split="val", root=tmp_path / "download")
    with pytest.raises(DataError, match="itself an area folder"):
        Stanford2D3DSDataset(split="val", root=tmp_path / "download" / "2D-3D-Semantics" / "area_5a")


def test_2d3ds_missing_labels_file_and_unpaired_image(tmp_path):
    write_2d3ds(tmp_path, {"area_5a": 2}, labels=False)
    with pytest.raises(DataError, match="semantic_labels.json") as info:
        Stanford2D3DSDataset(split="val", root=tmp_path)
    assert "github.com/alexsax/2D-3D-Semantics" in str(info.value)
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "semantic_labels.json").write_text('{"not": "a list"}')
    with pytest.raises(DataError, match="not the 2D-3D-S label list"):
        Stanford2D3DSDataset(split="val", root=tmp_path)
    (tmp_path / "assets" / "semantic_labels.json").write_text(json.dumps(LABELS_2D3DS))
    semantic = sorted((tmp_path / "area_5a" / "data" / "semantic").glob("*.png"))[0]
    semantic.unlink()
    with pytest.raises(DataError, match="have no <name>_domain_semantic.png") as info:
        Stanford2D3DSDataset(split="val", root=tmp_path)
    assert semantic.name.replace("_semantic.png", "_rgb.png") in str(info.value)
    (tmp_path / "area_5a" / "data" / "semantic").rename(tmp_path / "area_5a" / "data" / "sem")
    with pytest.raises(DataError, match="lacks its 2D data"):
        Stanford2D3DSDataset(split="val", root=tmp_path)
