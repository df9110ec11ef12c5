"""Stanford 2D-3D-S, DIS5K, Datumaro's Common Semantic Segmentation and colour-coded folder masks:
fixtures written in tmp_path in the original on-disk formats (no real samples of these exist in
../shared), checked for pairing, class counts, value ranges, the unlabelled/ignore mapping, the
errors of a wrong root or an unknown colour, and a trainer=debug run on each dataset config."""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segexp.data.datumaro import DatumaroDataset
from segexp.data.dis5k import DIS5KDataset, binarize
from segexp.data.folder import FolderDataset
from segexp.data.stanford2d3ds import Stanford2D3DSDataset
from segexp.engine.experiment import run_training
from segexp.errors import ConfigError, DataError
from tests.conftest import compose_config, load_script

SHAPE = (24, 32)


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb.astype(np.uint8), cv2.COLOR_RGB2BGR))


def write_grey(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)


def photo(k: int, shape=SHAPE) -> np.ndarray:
    """A distinct image per sample (its red channel carries k, so pairing shows)."""
    image = np.zeros(shape + (3,), np.uint8)
    image[..., 0] = 10 * k + 5
    image[..., 1] = np.arange(shape[1], dtype=np.uint8)[None, :] * 3
    image[..., 2] = 200
    return image


# -- Stanford 2D-3D-S -------------------------------------------------------------------------
# The label list as semantic_labels.json writes it (class_instance_roomType_roomNum_area), with
# its <UNK> entry first and a class outside the 13 ("stairs") that must count as unlabelled.
LABELS_2D3DS = ["<UNK>_0_<UNK>_0_0", "beam_10_hallway_6_1", "ceiling_1_office_1_1",
                "chair_1_office_3_5", "clutter_2_office_3_5", "wall_1_office_1_1",
                "stairs_1_stairs_1_1", "floor_1_office_1_1", "board_1_office_1_1",
                "bookcase_3_office_2_5", "column_1_hallway_1_1", "door_4_office_3_5",
                "sofa_1_lounge_1_6", "<UNK>_0_<UNK>_0_0", "table_2_office_3_5",
                "window_1_office_1_1"]
# The paper's class order, written out independently of the module (0 = unlabelled).
CLASSES_2D3DS = ["unlabelled", "ceiling", "floor", "wall", "beam", "column", "window", "door",
                 "table", "chair", "sofa", "bookcase", "board", "clutter"]
MISSING = 0x0D0D0D


def expected_2d3ds(index: np.ndarray, unlabelled_as_class: bool = True) -> np.ndarray:
    out = np.zeros(index.shape, np.int64)
    for i, label in enumerate(LABELS_2D3DS):
        name = label.split("_")[0]
        out[index == i] = CLASSES_2D3DS.index(name) if name in CLASSES_2D3DS else 0
    out[index >= len(LABELS_2D3DS)] = 0
    if not unlabelled_as_class:
        out = np.where(out == 0, 255, out - 1)
    return out


def semantic_index(k: int, shape=SHAPE, past_end: bool = True) -> np.ndarray:
    """Every label index, the missing-data value 0x0D0D0D and (``past_end``) an index just past
    the list."""
    extra = [MISSING, len(LABELS_2D3DS), MISSING] if past_end else [MISSING]
    values = np.append(np.arange(len(LABELS_2D3DS)), extra)
    return np.roll(np.resize(values, shape[0] * shape[1]), k).reshape(shape)


def encode(index: np.ndarray) -> np.ndarray:
    """The dataset's encoding: RGB = the index as a 24-bit base-256 number."""
    return np.stack([(index >> 16) & 255, (index >> 8) & 255, index & 255], axis=-1).astype(np.uint8)


def write_2d3ds(root: Path, areas: dict[str, int], labels: bool = True,
                past_end: bool = True) -> dict[str, np.ndarray]:
    """``areas``: folder name -> image count. Writes data/{rgb,semantic} plus the modalities a
    loader must skip (semantic_pretty, depth, pose) and assets/semantic_labels.json."""
    written, k = {}, 0
    for area, count in areas.items():
        data = root / area / "data"
        for i in range(count):
            name = f"camera_{k:04x}a1b2_office_{i + 1}_frame_{i}_domain"
            write_rgb(data / "rgb" / f"{name}_rgb.png", photo(k))
            index = semantic_index(k, past_end=past_end)
            write_rgb(data / "semantic" / f"{name}_semantic.png", encode(index))
            write_rgb(data / "semantic_pretty" / f"{name}_semantic_pretty.png", photo(0))
            write_grey(data / "depth" / f"{name}_depth.png", np.zeros(SHAPE))
            (data / "pose").mkdir(exist_ok=True)
            (data / "pose" / f"{name}_pose.json").write_text("{}")
            written[f"{area}/{name}"] = index
            k += 1
        (root / area / "pano" / "rgb").mkdir(parents=True, exist_ok=True)
    if labels:
        (root / "assets").mkdir(parents=True, exist_ok=True)
        (root / "assets" / "semantic_labels.json").write_text(json.dumps(LABELS_2D3DS))
    return written


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


# -- DIS5K ------------------------------------------------------------------------------------
DIS_SUBSETS = {"DIS-TR": 3, "DIS-VD": 1, "DIS-TE1": 1, "DIS-TE2": 1, "DIS-TE3": 2, "DIS-TE4": 1}


def anti_aliased_gt(k: int, shape=SHAPE) -> np.ndarray:
    """A 0/255 disc with blurred (anti-aliased) edges: values strictly between 0 and 255."""
    gt = np.zeros(shape, np.uint8)
    cv2.circle(gt, (shape[1] // 2 + k % 5, shape[0] // 2), min(shape) // 3 - k % 3, 255, -1)
    return cv2.GaussianBlur(gt, (5, 5), 1.5)


def write_dis5k(root: Path, subsets=DIS_SUBSETS, shape=SHAPE) -> dict[str, np.ndarray]:
    gts, k = {}, 0
    for subset, count in subsets.items():
        for i in range(count):
            name = f"{i + 1}#Category#{k}#Sub#{k}_{i}"
            write_rgb(root / subset / "im" / f"{name}.jpg", photo(k, shape))
            gt = anti_aliased_gt(k, shape)
            write_grey(root / subset / "gt" / f"{name}.png", gt)
            gts[f"{subset}/{name}"] = gt
            k += 1
    return gts


def test_dis5k_splits_pairing_and_threshold(tmp_path):
    gts = write_dis5k(tmp_path)
    lengths = {split: len(DIS5KDataset(split=split, root=tmp_path))
               for split in ("train", "val", "test", "test1", "test2", "test3", "test4")}
    assert lengths == {"train": 3, "val": 1, "test": 5, "test1": 1, "test2": 1, "test3": 2,
                       "test4": 1}
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


# -- Datumaro Common Semantic Segmentation -------------------------------------------------------
COLOURS = [[0, 0, 0], [255, 0, 0], [0, 128, 255]]


def index_mask(k: int, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[: shape[0] // 2, : shape[1] // 2 + k] = 1
    mask[shape[0] // 2:, shape[1] // 2:] = 2
    mask[-1, :3] = 255  # ignored pixels
    return mask


def write_datumaro(root: Path, subsets: dict[str, int], meta: dict | None = None,
                   per_subset_meta: dict | None = None, colour: bool = False) -> dict:
    masks, k = {}, 0
    if meta is not None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "dataset_meta.json").write_text(json.dumps(meta))
    for subset, count in subsets.items():
        if per_subset_meta is not None:
            (root / subset).mkdir(parents=True, exist_ok=True)
            (root / subset / "dataset_meta.json").write_text(json.dumps(per_subset_meta))
        for i in range(count):
            name = f"{subset}_{i:04d}"
            write_rgb(root / subset / "images" / f"{name}.{'png' if i % 2 else 'jpg'}", photo(k))
            mask = index_mask(k)
            if colour:
                rgb = np.zeros(SHAPE + (3,), np.uint8)
                for value, c in enumerate(COLOURS):
                    rgb[mask == value] = c
                mask[mask == 255] = 0
                write_rgb(root / subset / "masks" / f"{name}.png", rgb)
            else:
                write_grey(root / subset / "masks" / f"{name}.png", mask)
            masks[f"{subset}/{name}"] = mask
            k += 1
    return masks


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
    write_rgb(ds.samples[0][1], rgb)
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
    write_grey(root / "train" / "masks" / "x.png", index_mask(0))
    (root / "train" / "masks" / "train_0000.png").unlink()
    assert [p[0].stem for p in DatumaroDataset(root=root, num_classes=3).samples] == ["train_0001",
                                                                                       "x"]
    # colour masks without segmentation_colors
    write_rgb(root / "train" / "masks" / "x.png", np.zeros(SHAPE + (3,), np.uint8))
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


# -- folder dataset with colour-coded masks ------------------------------------------------------
FOLDER_PALETTE = [[0, 0, 0], [200, 30, 30], [30, 200, 30]]


def write_colour_folder(root: Path, count: int = 4, void: bool = False) -> dict[str, np.ndarray]:
    masks = {}
    for k in range(count):
        mask = np.where(index_mask(k) == 255, 0, index_mask(k)).astype(np.uint8)
        rgb = np.zeros(SHAPE + (3,), np.uint8)
        for value, c in enumerate(FOLDER_PALETTE):
            rgb[mask == value] = c
        if void:
            rgb[0, :4] = (255, 255, 255)
            mask[0, :4] = 255
        write_rgb(root / "images" / f"s{k}.png", photo(k))
        write_rgb(root / "masks" / f"s{k}.png", rgb)
        masks[f"s{k}"] = mask
    return masks


def test_folder_colour_masks_map_exactly(tmp_path):
    masks = write_colour_folder(tmp_path)
    ds = FolderDataset(root=tmp_path, num_classes=3, val_fraction=0, mask_palette=FOLDER_PALETTE)
    assert ds.colours == [tuple(c) for c in FOLDER_PALETTE]  # pictures use the masks' colours
    for i, (image_path, _) in enumerate(ds.samples):
        np.testing.assert_array_equal(ds.load(i).mask, masks[image_path.stem])
    # the same through colour_masks + palette
    ds2 = FolderDataset(root=tmp_path, num_classes=3, val_fraction=0, palette=FOLDER_PALETTE,
                        colour_masks=True)
    np.testing.assert_array_equal(ds2.load(2).mask, masks["s2"])
    _, mask = ds2[2]
    assert set(mask.unique().tolist()) == {0, 1, 2}


def test_folder_colour_masks_void_colour_to_ignore(tmp_path):
    masks = write_colour_folder(tmp_path, void=True)
    ds = FolderDataset(root=tmp_path, num_classes=3, val_fraction=0,
                       mask_palette=FOLDER_PALETTE + [[255, 255, 255]], mask_map={3: 255})
    np.testing.assert_array_equal(ds.load(0).mask, masks["s0"])
    assert ds.colours == [tuple(c) for c in FOLDER_PALETTE]


def test_folder_unknown_colour_names_file_colour_and_nearest(tmp_path):
    write_colour_folder(tmp_path)
    rgb = cv2.cvtColor(cv2.imread(str(tmp_path / "masks" / "s1.png")), cv2.COLOR_BGR2RGB)
    rgb[5, 5:8] = (190, 40, 35)
    write_rgb(tmp_path / "masks" / "s1.png", rgb)
    ds = FolderDataset(root=tmp_path, class_names=["bg", "red", "green"], val_fraction=0,
                       mask_palette=FOLDER_PALETTE)
    ds.load(0)
    with pytest.raises(DataError) as info:
        ds.load(1)
    message = str(info.value)
    assert "s1.png" in message and "(190, 40, 35)" in message and "at 3 pixel(s)" in message
    assert "nearest palette colour: (200, 30, 30) #C81E1E = class 1 'red'" in message


def test_folder_colour_mask_configuration_errors(tmp_path):
    write_colour_folder(tmp_path)
    with pytest.raises(DataError, match="mask_palette"):  # colour masks read as index masks
        FolderDataset(root=tmp_path, num_classes=3, val_fraction=0)
    with pytest.raises(ConfigError, match="palette"):
        FolderDataset(root=tmp_path, num_classes=3, val_fraction=0, colour_masks=True)
    with pytest.raises(ConfigError, match="at least one"):
        FolderDataset(root=tmp_path, num_classes=3, val_fraction=0, mask_palette=FOLDER_PALETTE[:2])
    with pytest.raises(ConfigError, match="both"):
        FolderDataset(root=tmp_path, num_classes=3, val_fraction=0,
                      mask_palette=[[0, 0, 0], [1, 2, 3], [1, 2, 3]])
    with pytest.raises(ConfigError, match="0..255"):
        FolderDataset(root=tmp_path, num_classes=3, val_fraction=0,
                      mask_palette=[[0, 0, 0], [1, 2, 3], [1, 2, 300]])


# -- prepare scripts ---------------------------------------------------------------------------
def test_prepare_stanford2d3ds_extracts_and_verifies(tmp_path, capsys):
    script = load_script("prepare/stanford2d3ds")
    staging, src, dst = tmp_path / "staging", tmp_path / "src", tmp_path / "data" / "s3d"
    write_2d3ds(staging, {"area_1": 2, "area_5a": 1}, labels=False, past_end=False)
    src.mkdir()
    for area in ("area_1", "area_5a"):
        with tarfile.open(src / f"{area}_no_xyz.tar", "w") as tar:
            tar.add(staging / area, arcname=area)
    args = ["--src", str(src), "--dst", str(dst), "--no-download"]
    with pytest.raises(DataError, match="semantic_labels.json"):  # not in the archives
        script.main(args)
    (src / "semantic_labels.json").write_text(json.dumps(LABELS_2D3DS))
    assert script.main(args) == 0
    out = capsys.readouterr().out
    assert (dst / "area_1" / "data" / "rgb").is_dir() and (dst / "assets" / "semantic_labels.json").is_file()
    assert "area_1              2" in out and "area_5a             1" in out
    assert "label values found: 0..13" in out and "checks passed." in out
    assert "fold 1: train 2 / test 1" in out and "allow_missing_areas=true" in out
    assert script.main(args) == 0 and "already prepared" in capsys.readouterr().out
    # a semantic_pretty-like image in place of an encoded one is caught
    semantic = sorted((dst / "area_1" / "data" / "semantic").glob("*.png"))[1]
    write_rgb(semantic, photo(3))
    with pytest.raises(DataError, match=semantic.name):
        script.main([*args, "--force"])


def test_prepare_dis5k_unzips_and_verifies(tmp_path, capsys):
    script = load_script("prepare/dis5k")
    staging, src, dst = tmp_path / "staging", tmp_path / "src", tmp_path / "data" / "DIS5K"
    write_dis5k(staging / "DIS5K", shape=(96, 128))
    src.mkdir()
    with zipfile.ZipFile(src / "DIS5K.zip", "w") as zf:
        for path in sorted((staging / "DIS5K").rglob("*")):
            zf.write(path, path.relative_to(staging).as_posix())
    with pytest.raises(DataError, match="drive.google.com"):  # nothing to work with
        script.main(["--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "x")])
    args = ["--src", str(src), "--dst", str(dst)]
    assert script.main(args) == 0
    out = capsys.readouterr().out
    assert (dst / "DIS-TR" / "gt").is_dir() and not (dst / "DIS5K").exists()
    assert "train               3           3000" in out and "test3               2" in out
    assert "label values found: 0, 1" in out and "checks passed." in out
    assert script.main(args) == 0 and "already prepared" in capsys.readouterr().out
    gts = sorted((dst / "DIS-VD" / "gt").glob("*.png"))
    write_grey(gts[0], np.tile(np.linspace(0, 255, 128), (96, 1)))  # a soft matte, not 0/255
    empty = sorted((dst / "DIS-TE1" / "gt").glob("*.png"))[0]
    write_grey(empty, np.full((96, 128), 60))  # nothing reaches the threshold
    with pytest.raises(DataError) as info:
        script.main([*args, "--force"])
    message = str(info.value)
    assert gts[0].name in message and "neither 0 nor 255" in message
    assert empty.name in message and "no foreground" in message


# -- a debug training run on every dataset config -------------------------------------------------
def _debug_overrides(name: str, tmp_path: Path) -> list[str]:
    root = tmp_path / name
    if name == "stanford2d3ds":
        write_2d3ds(root, {"area_1": 2, "area_5a": 1})
        return [f"dataset.root={root}", "dataset.allow_missing_areas=true"]
    if name == "dis5k":
        write_dis5k(root)
        return [f"dataset.root={root}"]
    if name == "datumaro":
        write_datumaro(root, {"train": 2, "val": 1}, colour=True, meta={
            "label_map": {"0": "background", "1": "car", "2": "sky"},
            "segmentation_colors": COLOURS})
        return [f"dataset.root={root}", "dataset.num_classes=3"]
    write_colour_folder(root)
    return [f"dataset.root={root}", "dataset.num_classes=3", "dataset.val_fraction=0.25",
            f"dataset.mask_palette={json.dumps(FOLDER_PALETTE).replace(' ', '')}"]


@pytest.mark.parametrize("name", ["stanford2d3ds", "dis5k", "datumaro", "folder"])
def test_dataset_config_runs_with_trainer_debug(name, tmp_path):
    cfg = compose_config(f"dataset={name}", *_debug_overrides(name, tmp_path), "trainer=debug",
                         "dataset.crop_size=[64,64]")
    run_dir = tmp_path / "run"
    run_training(cfg, run_dir)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["iters"] == 2
    expected = {"stanford2d3ds": 14, "dis5k": 2, "datumaro": 3, "folder": 3}[name]
    assert len(summary["best_per_class"]) == expected
