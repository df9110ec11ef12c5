"""``dataset=folder`` on public layouts by overrides alone: the README's lines, each trained end to
end with ``trainer=debug`` on fixtures written here in the download's exact layout and formats,
with every pair checked; the image and mask readers (formats, EXIF orientation, 16-bit masks);
class-count inference; the layout messages; ``scripts/dataset_stats.py --check``; colour-coded
masks (``mask_palette``, ``colour_masks``): exact mapping, a void colour to ignore, the message
for an unknown colour and the configuration errors."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from segexp.config import instantiate
from segexp.data import base
from segexp.data.base import IGNORE_INDEX, Sample, exif_orientation, read_image, read_mask
from segexp.data.folder import FolderDataset, NameRule, suggest_suffixes
from segexp.engine.experiment import run_training
from segexp.errors import ConfigError, DataError
from segexp.inference import Segmenter, load_run_config
from tests.conftest import ROOT, compose_config, load_script
from tests.data.conftest import FOLDER_PALETTE, write_colour_folder, write_rgb_image

SIZE = 64
LEVELS = np.array([40, 110, 180])  # image intensity (red channel) of pattern level 0, 1, 2


# -- a pattern that ties each mask to its image ---------------------------------------------------
def pattern(k: int, count: int = 2) -> np.ndarray:
    """Pattern ``k`` (distinct for k < 49), levels 0..count-1: level 1 in a top-left block whose
    height and width depend on ``k``; with three levels, level 2 in the opposite block. Edges lie
    on the 8-pixel JPEG grid, so JPEG files keep them."""
    rows, cols = 8 * (1 + k % 7), 8 * (1 + (k // 7) % 7)
    grid = np.zeros((SIZE, SIZE), np.uint8)
    grid[:rows, :cols] = 1
    if count == 3:
        grid[rows:, cols:] = 2
    return grid


def rgb_of(grid: np.ndarray, colour: bool = True) -> np.ndarray:
    """Red = the level's intensity; blue its complement (so a channel swap shows)."""
    red = LEVELS[grid].astype(np.uint8)
    return np.dstack([red, red, 255 - red if colour else red])


def decode(image: np.ndarray) -> np.ndarray:
    """The pattern levels an image read back shows (nearest intensity; JPEG moves a few)."""
    return np.abs(image[..., :1].astype(np.int32) - LEVELS).argmin(axis=-1)


def save_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, **({"quality": 95, "subsampling": 0}
                                       if path.suffix == ".jpg" else {}))


def save_grey(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if values.dtype == np.uint16:
        cv2.imwrite(str(path), values)
    else:
        Image.fromarray(values.astype(np.uint8)).save(path, **({"quality": 90}
                                                               if path.suffix == ".jpg" else {}))


# -- the five public layouts, as their downloads unpack -------------------------------------------
# Each writer returns {split: image file names} (split "all" when dataset.val_fraction splits)
# and the mask value each pattern level must load as.
def write_drive(root: Path):
    names, k = {"train": [], "val": []}, 0
    for folder, split, tag, ids in (("training", "train", "training", (21, 22, 23, 24)),
                                    ("test", "val", "test", (1, 2))):
        for i in ids:
            grid = pattern(k)
            k += 1
            save_rgb(root / folder / "images" / f"{i:02d}_{tag}.tif", rgb_of(grid))
            save_grey(root / folder / "1st_manual" / f"{i:02d}_manual1.gif",
                      np.array([0, 255])[grid])
            save_grey(root / folder / "mask" / f"{i:02d}_{tag}_mask.gif",  # field of view
                      np.full((SIZE, SIZE), 255))
            names[split].append(f"{i:02d}_{tag}.tif")
    return names, (0, 1)


def write_kvasir(root: Path):
    names = []
    for k in range(6):
        name = f"cju{k:03d}kwl35piu0993l0dewei2"
        grid = pattern(k)
        save_rgb(root / "images" / f"{name}.jpg", rgb_of(grid))
        mask = np.array([0, 255], np.uint8)[grid]
        save_rgb(root / "masks" / f"{name}.jpg", np.dstack([mask] * 3))  # RGB JPEG, as shipped
        names.append(f"{name}.jpg")
    (root / "kavsir_bboxes.json").write_text("{}")
    return {"all": names}, (0, 1)


def write_isic(root: Path):
    names = []
    images = root / "ISIC2018_Task1-2_Training_Input"
    truths = root / "ISIC2018_Task1_Training_GroundTruth"
    for k in range(6):
        stem = f"ISIC_{k:07d}"
        grid = pattern(k)
        save_rgb(images / f"{stem}.jpg", rgb_of(grid))
        save_grey(truths / f"{stem}_segmentation.png", np.array([0, 255])[grid])
        names.append(f"{stem}.jpg")
    for folder in (images, truths):
        (folder / "LICENSE.txt").write_text("CC-BY-NC")
    (images / "ATTRIBUTION.txt").write_text("ISIC")
    return {"all": names}, (0, 1)


def write_oxford_pet(root: Path):
    """Trimaps: 1 pet, 2 background, 3 border; lists ``<stem> <class> <species> <breed>``."""
    names, lines, k = {"train": [], "val": []}, {"train": [], "val": []}, 0
    for breed, class_id, species in (("Abyssinian", 1, 1), ("american_bulldog", 2, 2)):
        for n in range(1, 4):
            stem = f"{breed}_{n}"
            grid = pattern(k, 3)
            k += 1
            save_rgb(root / "images" / f"{stem}.jpg", rgb_of(grid))
            save_grey(root / "annotations" / "trimaps" / f"{stem}.png", np.array([2, 1, 3])[grid])
            split = "val" if n == 3 else "train"
            names[split].append(f"{stem}.jpg")
            lines[split].append(f"{stem} {class_id} {species} {n}")
    # as in the download: an image in neither list, a stray .mat, macOS ._ files, the xmls
    save_rgb(root / "images" / "Bengal_9.jpg", rgb_of(pattern(40, 3)))
    (root / "images" / "Abyssinian_100.mat").write_bytes(b"MATLAB 5.0")
    (root / "annotations" / "trimaps" / "._Abyssinian_1.png").write_bytes(b"\0\5\26\7")
    (root / "annotations" / "xmls").mkdir()
    annotations = root / "annotations"
    (annotations / "trainval.txt").write_text("\n".join(lines["train"]) + "\n")
    (annotations / "test.txt").write_text("\n".join(lines["val"]) + "\n")
    (annotations / "list.txt").write_text("#Image CLASS-ID SPECIES BREED ID\n"
                                          + "\n".join(lines["train"] + lines["val"]) + "\n")
    return names, (1, 0, IGNORE_INDEX)


def write_medical(root: Path):
    """16-bit grey scans in train|val/image, class-index PNG labels 0/1/2 in train|val/label."""
    names, k = {"train": [], "val": []}, 0
    for split, count in (("train", 4), ("val", 2)):
        for n in range(count):
            grid = pattern(k, 3)
            k += 1
            save_grey(root / split / "image" / f"case_{n:03d}.png",
                      (LEVELS[grid] * 257).astype(np.uint16))
            save_grey(root / split / "label" / f"case_{n:03d}.png", grid)
            names[split].append(f"case_{n:03d}.png")
    return names, (0, 1, 2)


LAYOUTS = {  # README row -> (writer, classes, colour images)
    "DRIVE": (write_drive, 2, True),
    "Kvasir-SEG": (write_kvasir, 2, True),
    "ISIC 2018 (task 1)": (write_isic, 2, True),
    "Oxford-IIIT Pet": (write_oxford_pet, 2, True),
    "medical `image` / `label`": (write_medical, 3, False),
}


def readme_command(layout: str) -> list[str]:
    """The README's override line for ``layout`` (table "Public layouts by overrides"), as the
    shell would pass it to train.py."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("#### Public layouts by overrides"):]
    for row in section.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if cells and cells[0] == layout:
            command = re.fullmatch(r"`(.*)`", cells[-1]).group(1)
            words = shlex.split(command)
            assert words[:2] == ["python", "train.py"], command
            return words[2:]
    raise AssertionError(f"README has no row for {layout!r} in 'Public layouts by overrides'")


def with_root(overrides: list[str], root: Path) -> list[str]:
    assert any(o.startswith("dataset.root=") for o in overrides)
    return [f"dataset.root={root}" if o.startswith("dataset.root=") else o for o in overrides]


def assert_paired(dataset: FolderDataset, loaded: tuple[int, ...], colour: bool) -> None:
    """Every sample's mask is the one drawn for its image: the levels the image shows, mapped to
    the values they must load as, equal the mask everywhere."""
    for i in range(len(dataset)):
        sample = dataset.load(i)
        dataset.check_sample(sample)
        assert sample.image.shape == (SIZE, SIZE, 3) and sample.image.dtype == np.uint8
        red, blue = sample.image[..., 0].astype(int), sample.image[..., 2].astype(int)
        # RGB order (blue is the complement of red) or grey channels, as written
        expected_blue = 255 - red if colour else red
        assert np.abs(blue - expected_blue).mean() < 8, sample.source
        expected = np.array(loaded)[decode(sample.image)]
        np.testing.assert_array_equal(sample.mask, expected, err_msg=sample.source)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_public_layout_trains_by_the_readme_overrides(layout, tmp_path, caplog):
    writer, classes, colour = LAYOUTS[layout]
    root = tmp_path / "data"
    names, loaded = writer(root)
    overrides = with_root(readme_command(layout), root)
    cfg = compose_config(*overrides, "trainer=debug", "trainer.measure_speed=false")

    # Pairs: each split holds the expected images, and each mask belongs to its image.
    found = {}
    for split in ("train", "val"):
        dataset = instantiate(cfg.dataset, split=split, transforms=None)
        found[split] = [image.name for image, _ in dataset.samples]
        assert_paired(dataset, loaded, colour)
    if "all" in names:  # a seeded val_fraction split: disjoint, together all of them
        assert sorted(found["train"] + found["val"]) == sorted(names["all"])
        assert found["val"] and not set(found["train"]) & set(found["val"])
    else:
        assert {split: sorted(files) for split, files in found.items()} == \
            {split: sorted(files) for split, files in names.items()}

    # End to end: two training iterations and a validation, by these overrides alone.
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what Hydra writes before the run
    with caplog.at_level(logging.WARNING):
        run_training(cfg, run_dir)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["iters"] == 2
    assert len(summary["best_per_class"]) == classes
    if layout.startswith("medical"):  # no class names: the count came from the masks
        assert cfg.dataset.num_classes == 3 and cfg.model.num_classes == 3
        assert any("inferred 3 classes" in r.getMessage() for r in caplog.records)
        assert load_run_config(run_dir).dataset.num_classes == 3  # from the checkpoint
        segmenter = Segmenter.from_run(run_dir, device="cpu")
        prediction = segmenter.predict(rgb_of(pattern(3, 3), colour=False))
        assert prediction.shape == (SIZE, SIZE) and int(prediction.max()) < 3


# -- name rules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, name, stem", [
    ("_training.tif", "21_training.tif", "21"),
    ("_training.tif", "21_training.TIF", "21"),
    ("_training.tif", "21_training.png", None),
    ("_manual1.gif", "21_manual1.gif", "21"),
    ("_segmentation.png", "ISIC_0000000_segmentation.png", "ISIC_0000000"),
    ("_segmentation", "ISIC_0000000_segmentation.png", "ISIC_0000000"),
    ("_segmentation", "ISIC_0000000.png", None),
    ("_mask.png", "x_mask.png", "x"),
    ("_mask", "x_mask.jpg", "x"),
    (".jpg", "x.jpg", "x"),
    (".jpg", "x.png", None),
    (None, "x.tiff", "x"),
    (None, "notes.txt", None),
    (["_training.tif", "_test.tif"], "01_test.tif", "01"),
    ("_mask", "_mask.png", None),  # nothing left for the stem
])
def test_suffix_is_the_name_end_after_the_stem(suffix, name, stem):
    assert NameRule.parse(suffix, "dataset.mask_suffix").stem(name) == stem


def test_suffix_options_are_checked():
    with pytest.raises(ConfigError, match="dataset.img_suffix"):
        NameRule.parse(5, "dataset.img_suffix")
    with pytest.raises(ConfigError, match="path separator"):
        NameRule.parse("masks/_m.png", "dataset.mask_suffix")


def test_suffixes_are_suggested_from_the_unpaired_names():
    images = [Path(f"{i}_training.tif") for i in range(21, 25)]
    masks = [Path(f"{i}_manual1.gif") for i in range(21, 25)]
    assert suggest_suffixes(images, masks) == ("_training", "_manual1")
    images = [Path(f"ISIC_{i:07d}.jpg") for i in range(5)]
    masks = [Path(f"ISIC_{i:07d}_segmentation.png") for i in range(5)]
    assert suggest_suffixes(images, masks) == ("", "_segmentation")
    assert suggest_suffixes([Path("cat.jpg")], [Path("dog.png")]) is None


# -- layouts: folders, splits, lists --------------------------------------------------------------
def write_flat(root: Path, stems, image_dir="images", mask_dir="masks", image_ext=".png",
               mask_name="{stem}.png", start: int = 0) -> None:
    for k, stem in enumerate(stems, start):
        grid = pattern(k)
        save_rgb(root / image_dir / f"{stem}{image_ext}", rgb_of(grid))
        save_grey(root / mask_dir / mask_name.format(stem=stem), grid)


def test_split_folders_below_with_other_names(tmp_path):
    write_flat(tmp_path, ["a", "b"], "im/training", "gt/training")
    write_flat(tmp_path, ["c"], "im/validation", "gt/validation", start=5)
    options = dict(root=tmp_path, image_dir="im", mask_dir="gt", num_classes=2,
                   train_split="training", val_split="validation")
    train, val = FolderDataset(**options), FolderDataset(split="val", **options)
    assert train.layout == val.layout == "subfolders"
    assert [p.name for p, _ in train.samples] == ["a.png", "b.png"]
    assert [p.name for p, _ in val.samples] == ["c.png"]
    assert_paired(val, (0, 1), True)
    with pytest.raises(DataError) as info:  # default names: it says which folders there are
        FolderDataset(root=tmp_path, image_dir="im", mask_dir="gt", num_classes=2)
    message = str(info.value)
    assert "training, validation" in message and "dataset.train_split=training" in message


def test_split_folders_above_and_a_missing_split(tmp_path):
    write_flat(tmp_path, ["a", "b"], "train/image", "train/label")
    train = FolderDataset(root=tmp_path, image_dir="image", mask_dir="label", num_classes=2)
    assert [p.parent for p, _ in train.samples] == [tmp_path / "train" / "image"] * 2
    with pytest.raises(DataError) as info:
        FolderDataset(split="val", root=tmp_path, image_dir="image", mask_dir="label",
                      num_classes=2)
    message = str(info.value)
    assert "dataset.val_split=val" in message and str(tmp_path / "val" / "image") in message


def test_images_and_masks_in_one_folder(tmp_path):
    write_flat(tmp_path, ["x", "y"], "data", "data", image_ext=".jpg",
               mask_name="{stem}_segmentation.png")
    ds = FolderDataset(root=tmp_path, image_dir="data", mask_dir="data",
                       mask_suffix="_segmentation", num_classes=2, val_fraction=0)
    assert [(p.name, m.name) for p, m in ds.samples] == [
        ("x.jpg", "x_segmentation.png"), ("y.jpg", "y_segmentation.png")]
    assert_paired(ds, (0, 1), True)
    with pytest.raises(ConfigError, match="dataset.mask_suffix"):
        FolderDataset(root=tmp_path, image_dir="data", mask_dir="data", num_classes=2)


def test_list_files_name_images_or_stems(tmp_path):
    write_flat(tmp_path, ["a", "b", "c", "d"], image_ext=".jpg")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "fold1_train.txt").write_text("# training images\na.jpg\nimages/b.jpg\n\nc 7 1\n")
    (lists / "fold1_val.txt").write_text("d\n")
    options = dict(root=tmp_path, split_files="lists", train_split="fold1_train",
                   val_split="fold1_val", num_classes=2)
    train, val = FolderDataset(**options), FolderDataset(split="val", **options)
    assert train.layout == "split_files"
    assert [p.name for p, _ in train.samples] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [p.name for p, _ in val.samples] == ["d.jpg"]
    with pytest.raises(DataError) as info:  # a list name that is not there
        FolderDataset(split="val", **{**options, "val_split": "fold2_val"})
    message = str(info.value)
    assert "fold2_val.txt" in message and "fold1_train, fold1_val" in message
    assert "dataset.val_split" in message


# -- unpaired files -----------------------------------------------------------------------------
def test_unpaired_files_are_named_with_the_options_to_set(tmp_path):
    for i in (21, 22, 23):
        save_rgb(tmp_path / "images" / f"{i}_training.tif", rgb_of(pattern(i)))
        save_grey(tmp_path / "masks" / f"{i}_manual1.gif", np.array([0, 255])[pattern(i)])
    with pytest.raises(DataError) as info:
        FolderDataset(root=tmp_path, num_classes=2)
    message = str(info.value)
    assert "3 image(s)" in message and "21_training.tif" in message
    assert "3 mask(s)" in message and "23_manual1.gif" in message
    assert "dataset.img_suffix=_training dataset.mask_suffix=_manual1" in message
    ds = FolderDataset(root=tmp_path, img_suffix="_training", mask_suffix="_manual1",
                       mask_map={255: 1}, num_classes=2, val_fraction=0)
    assert len(ds) == 3
    assert_paired(ds, (0, 1), True)


def test_allow_unpaired_warns_and_uses_the_pairs(tmp_path, caplog):
    write_flat(tmp_path, ["a", "b", "c"])
    (tmp_path / "masks" / "b.png").unlink()
    save_grey(tmp_path / "masks" / "orphan.png", pattern(1))
    save_grey(tmp_path / "masks" / "notes.bmp", pattern(1))
    with pytest.raises(DataError) as info:
        FolderDataset(root=tmp_path, num_classes=2, val_fraction=0)
    message = str(info.value)
    assert "b.png" in message and "orphan.png" in message and "notes.bmp" in message
    assert "dataset.allow_unpaired=true" in message and "2 pairs" in message
    with caplog.at_level(logging.WARNING, logger="segexp.data.folder"):
        ds = FolderDataset(root=tmp_path, num_classes=2, val_fraction=0, allow_unpaired=True)
    assert [p.name for p, _ in ds.samples] == ["a.png", "c.png"]
    assert any("b.png" in r.getMessage() and "allow_unpaired" in r.getMessage()
               for r in caplog.records)


def test_missing_root_and_file_as_root(tmp_path):
    with pytest.raises(DataError) as info:
        FolderDataset(root=tmp_path / "nowhere", num_classes=2)
    message = str(info.value)
    assert "does not exist" in message and "python train.py dataset=folder dataset.root=" in message
    assert "dataset.image_dir" in message
    afile = tmp_path / "data.zip"
    afile.write_bytes(b"PK")
    with pytest.raises(DataError) as info:
        FolderDataset(root=afile, num_classes=2)
    message = str(info.value)
    assert "is a file, not a folder" in message and "does not exist" not in message
    write_flat(tmp_path / "unzipped" / "Kvasir-SEG", ["a"])  # the archive's own top folder
    with pytest.raises(DataError) as info:
        FolderDataset(root=tmp_path / "unzipped", num_classes=2)
    assert f"dataset.root={tmp_path / 'unzipped' / 'Kvasir-SEG'}" in str(info.value)


def test_train_py_without_a_root_says_how_to_lay_data_out(tmp_path):
    """dataset=folder alone: no MissingMandatoryValue traceback, but where data goes and how."""
    env = {**os.environ, "SEGEXP_DATA": str(tmp_path)}
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "dataset=folder",
                          "trainer=debug", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.startswith("segexp: error: folder dataset not found")
    assert str(tmp_path / "folder" / "images") in out.stderr
    assert "python train.py dataset=folder dataset.root=" in out.stderr
    assert "Traceback" not in out.stderr and "MissingMandatoryValue" not in out.stderr


# -- num_classes --------------------------------------------------------------------------------
def test_num_classes_inferred_from_the_masks_and_logged(tmp_path, caplog):
    for k, top in enumerate((1, 3, 2)):
        mask = np.zeros((8, 8), np.uint8)
        mask[0, :top + 1] = np.arange(top + 1)
        mask[7] = IGNORE_INDEX  # ignored pixels do not count
        save_rgb(tmp_path / "images" / f"s{k}.png", np.zeros((8, 8, 3), np.uint8))
        save_grey(tmp_path / "masks" / f"s{k}.png", mask)
    with caplog.at_level(logging.WARNING, logger="segexp.data.folder"):
        ds = FolderDataset(root=tmp_path, val_fraction=0)
    assert ds.num_classes == 4 and ds.class_names == ("class_0", "class_1", "class_2", "class_3")
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "inferred 4 classes" in message and "largest mask value, 3" in message
    assert "dataset.class_names" in message
    # given names win, and are checked against the masks when read
    assert FolderDataset(root=tmp_path, val_fraction=0, class_names=list("abcd")).num_classes == 4


def test_num_classes_cannot_be_inferred_from_empty_masks(tmp_path):
    write_flat(tmp_path, ["a"])
    save_grey(tmp_path / "masks" / "a.png", np.zeros((SIZE, SIZE), np.uint8))
    with pytest.raises(DataError, match="cannot be inferred") as info:
        FolderDataset(root=tmp_path, val_fraction=0)
    assert "dataset.class_names" in str(info.value)


def test_binary_255_masks_still_trapped_when_inferring(tmp_path):
    write_flat(tmp_path, ["a", "b"])
    for stem in "ab":
        save_grey(tmp_path / "masks" / f"{stem}.png", np.array([0, 255])[pattern(2)])
    with pytest.raises(DataError, match="mask_map"):
        FolderDataset(root=tmp_path, val_fraction=0)


# -- mask formats -------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".png", ".gif", ".tif", ".bmp"])
def test_index_mask_formats(ext, tmp_path):
    values = pattern(9, 3) * 3  # 0, 3, 6
    save_grey(tmp_path / f"m{ext}", values)
    mask = read_mask(tmp_path / f"m{ext}")
    assert mask.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(mask, values)


def test_gif_with_a_grey_palette_reads_its_grey_levels_and_a_colour_palette_its_indices(tmp_path):
    binary = np.array([0, 255], np.uint8)[pattern(4)]
    image = Image.fromarray((binary > 0).astype(np.uint8), "P")
    image.putpalette([0, 0, 0, 255, 255, 255])  # indices 0/1 shown black/white
    image.save(tmp_path / "grey.gif")
    np.testing.assert_array_equal(read_mask(tmp_path / "grey.gif"), binary)
    image.putpalette([0, 0, 0, 200, 30, 30])  # a colour palette: the indices are the classes
    image.save(tmp_path / "colour.gif")
    np.testing.assert_array_equal(read_mask(tmp_path / "colour.gif"), binary > 0)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_masks_keep_values_above_255(ext, tmp_path):
    values = (pattern(5).astype(np.uint16) * 257)
    values[0, 0] = 299
    save_grey(tmp_path / f"m{ext}", values)
    mask = read_mask(tmp_path / f"m{ext}")
    assert int(mask.max()) == 299
    np.testing.assert_array_equal(mask, values)


def test_mask_value_257_survives_the_dataset_and_its_transforms(tmp_path):
    write_flat(tmp_path, ["a"])
    mask = (pattern(3).astype(np.uint16) * 257)  # 0 / 257
    save_grey(tmp_path / "masks" / "a.png", mask)
    transforms = instantiate(compose_config("dataset=folder", "dataset.crop_size=[32,32]",
                                            "dataset.base_size=[64,64]").transforms.train)
    plain = FolderDataset(root=tmp_path, num_classes=300, val_fraction=0)
    augmented = FolderDataset(root=tmp_path, num_classes=300, val_fraction=0,
                              crop_size=(32, 32), transforms=transforms)
    assert plain.mask_dtype == np.int32
    _, out = plain[0]
    assert out.dtype == torch.int64
    np.testing.assert_array_equal(out.numpy(), mask)  # 257, not 257 % 256 = 1
    seen = set()
    for seed in range(6):
        _, out = augmented[(0, seed)]
        seen |= set(out.unique().tolist())
    assert 257 in seen and 1 not in seen and seen <= {0, 257, IGNORE_INDEX}


def test_binary_jpeg_masks_are_thresholded_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(base, "_warned_lossy_masks", False)
    disc = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(disc, (30, 34), 19, 1, -1)  # curved edges: JPEG rings around them
    expected = disc * 255
    for name in ("first", "second"):
        save_grey(tmp_path / f"{name}.jpg", expected)
    save_rgb(tmp_path / "rgb.jpg", np.dstack([expected] * 3))
    raw = cv2.imread(str(tmp_path / "first.jpg"), cv2.IMREAD_GRAYSCALE)
    assert len(np.unique(raw)) > 10  # the file really is lossy
    kernel = np.ones((3, 3), np.uint8)
    edge = cv2.dilate(disc, kernel) != cv2.erode(disc, kernel)  # one pixel either side
    with caplog.at_level(logging.WARNING, logger="segexp.data.base"):
        for name in ("first", "second", "rgb"):
            mask = read_mask(tmp_path / f"{name}.jpg")
            assert set(np.unique(mask).tolist()) == {0, 255}
            assert not ((mask != expected) & ~edge).any()  # only edge pixels may flip
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(tmp_path / "first.jpg") in warnings[0]
    # A 0/1 mask saved as JPEG: a level of difference is within the codec's noise, so errors
    # reach across the 8x8 block at an edge, but no further, and stay few.
    save_grey(tmp_path / "zero_one.jpg", disc)
    mask = read_mask(tmp_path / "zero_one.jpg")
    assert set(np.unique(mask).tolist()) == {0, 1}
    block = np.ones((17, 17), np.uint8)
    near_edge = cv2.dilate(disc, block) != cv2.erode(disc, block)
    assert not ((mask != disc) & ~near_edge).any() and (mask != disc).mean() < 0.05


def test_multilevel_jpeg_masks_are_refused(tmp_path):
    levels = np.array([0, 60, 120, 190, 250], np.uint8)[(np.arange(SIZE) // 13)][None].repeat(SIZE, 0)
    save_grey(tmp_path / "classes.jpg", levels)
    with pytest.raises(DataError, match="PNG") as info:
        read_mask(tmp_path / "classes.jpg")
    assert "classes.jpg" in str(info.value)


def test_colour_masks_are_still_refused_and_grey_rgb_masks_read(tmp_path):
    grid = pattern(6)
    Image.fromarray(np.dstack([grid] * 3)).save(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "grey_rgb.png"), grid)
    colour = np.dstack([grid * 200, grid, grid]).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="channels"):
        read_mask(tmp_path / "colour.png")


# -- image formats ------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".jpg", ".png", ".tif", ".bmp", ".gif"])
def test_rgb_image_formats(ext, tmp_path):
    grid = pattern(12)
    path = tmp_path / f"i{ext}"
    if ext == ".gif":  # GIF holds a palette of exact colours
        Image.fromarray(rgb_of(grid)).quantize(colors=4).save(path)
    else:
        save_rgb(path, rgb_of(grid))
    image = read_image(path)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(decode(image), grid)
    assert np.abs(image[..., 2].astype(int) - (255 - image[..., 0].astype(int))).mean() < 4


def test_grey_rgba_and_16bit_images(tmp_path):
    grid = pattern(13)
    grey = LEVELS[grid].astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    image = read_image(tmp_path / "grey.png")
    assert image.shape == (SIZE, SIZE, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], grey)
    rgba = np.dstack([rgb_of(grid), np.where(grid == 1, 0, 255).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb_of(grid))  # alpha dropped
    for ext in (".png", ".tif"):
        save_grey(tmp_path / f"deep{ext}", (grey.astype(np.uint16) * 257))
        image = read_image(tmp_path / f"deep{ext}")
        assert image.dtype == np.uint8
        np.testing.assert_array_equal(image[..., 0], grey)  # 16-bit scaled to 8: 257 v -> v
    colour16 = (rgb_of(grid).astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "colour16.tif"), cv2.cvtColor(colour16, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(read_image(tmp_path / "colour16.tif"), rgb_of(grid))


# -- EXIF orientation ---------------------------------------------------------------------------
def save_with_orientation(path: Path, array: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[base.EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray(array).save(path, exif=exif, quality=95, subsampling=0)


def test_exif_orientation_is_ignored_for_image_and_mask_alike(tmp_path):
    """A portrait phone photo stored landscape (tag 6): pixels come as stored for both files, so
    the mask drawn on the stored pixels stays aligned and the sizes are not swapped."""
    grid = pattern(14)[:, :40]  # 64 high, 40 wide: a swap would show
    (tmp_path / "images").mkdir()
    save_with_orientation(tmp_path / "images" / "p.jpg", rgb_of(grid), 6)
    save_grey(tmp_path / "masks" / "p.png", grid)
    (tmp_path / "masks_jpg").mkdir()
    save_with_orientation(tmp_path / "masks_jpg" / "p.jpg", np.array([0, 255], np.uint8)[grid], 6)
    assert exif_orientation(tmp_path / "images" / "p.jpg") == 6
    rotated_by_default = cv2.imread(str(tmp_path / "images" / "p.jpg"), cv2.IMREAD_COLOR)
    assert rotated_by_default.shape[:2] == (40, 64)  # what a plain imread would have given
    ds = FolderDataset(root=tmp_path, num_classes=2, val_fraction=0)
    sample = ds.load(0)
    assert sample.image.shape[:2] == sample.mask.shape == (SIZE, 40)
    ds.check_sample(sample)
    np.testing.assert_array_equal(decode(sample.image), sample.mask)
    jpeg_mask = read_mask(tmp_path / "masks_jpg" / "p.jpg")
    assert jpeg_mask.shape == (SIZE, 40)
    np.testing.assert_array_equal(jpeg_mask, np.array([0, 255])[grid])


def test_size_mismatch_message_mentions_exif(tmp_path):
    grid = pattern(15)[:, :40]
    (tmp_path / "images").mkdir()
    save_with_orientation(tmp_path / "images" / "p.jpg", rgb_of(grid), 6)
    save_grey(tmp_path / "masks" / "p.png", grid.T)  # drawn on the rotated view: 40 high
    ds = FolderDataset(root=tmp_path, num_classes=2, val_fraction=0)
    with pytest.raises(DataError, match="sizes differ") as info:
        ds[0]
    message = str(info.value)
    assert "EXIF orientation tag 6" in message and "p.jpg" in message
    # without a tag, swapped sizes still name the possibility
    sample = Sample(np.zeros((64, 40, 3), np.uint8), np.zeros((40, 64), np.uint8), "q.png")
    with pytest.raises(DataError, match="EXIF"):
        ds.check_sample(sample)


# -- dataset_stats.py --check -------------------------------------------------------------------
def stats_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "dataset_stats.py"), *args,
                           "--check", "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_dataset_stats_check_reports_a_good_and_a_broken_layout(tmp_path, capsys):
    script = load_script("dataset_stats")
    root = tmp_path / "DRIVE"
    write_drive(root)
    overrides = with_root(readme_command("DRIVE"), root)
    good = script.main([*overrides, "--check", "--no-progress", "--out-dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert good["ok"] and not good["problems"] and not (tmp_path / "o").exists()
    assert "train split reads 'training': 4 pairs" in out and "val split reads 'test': 2 pairs" in out
    assert re.search(r"^\s+0 background\s+\d+ px in 4 image\(s\)", out, re.M)
    assert re.search(r"^\s+1 vessel\s+\d+ px in 4 image\(s\)", out, re.M)
    assert "image sizes (w x h: images): 64x64: 4" in out and "check: OK" in out
    assert "also training images" not in out

    # a training image copied into the test split: still a readable layout, but said
    copies = [(root / "training" / "images" / "21_training.tif", root / "test" / "images" / "05_test.tif"),
              (root / "training" / "1st_manual" / "21_manual1.gif",
               root / "test" / "1st_manual" / "05_manual1.gif")]
    for source, copy in copies:
        copy.write_bytes(source.read_bytes())
    copied = script.main([*overrides, "--check", "--no-progress"])
    out = capsys.readouterr().out
    assert copied["ok"] and "warning: 1 of the 3 validation images are also training images" in out
    assert "05_test.tif" in out
    for _, copy in copies:
        copy.unlink()

    # broken: the suffixes left out, one mask deleted, one stray image
    (root / "training" / "1st_manual" / "22_manual1.gif").unlink()
    save_rgb(root / "test" / "images" / "03_test.tif", rgb_of(pattern(1)))
    broken = stats_check(*overrides)
    assert broken.returncode == 1
    assert "1 image(s) without a mask: 22_training.tif" in broken.stdout
    assert "1 image(s) without a mask: 03_test.tif" in broken.stdout
    assert "train split reads 'training': 3 pairs" in broken.stdout  # the rest is still read
    assert "the layout is broken" in broken.stderr and "Traceback" not in broken.stderr
    no_suffix = [o for o in overrides if "suffix" not in o]
    unpaired = script.main([*no_suffix, "--check", "--no-progress"])
    out = capsys.readouterr().out
    assert not unpaired["ok"]
    assert "4 image(s) without a mask: 21_training.tif, 22_training.tif, 23_training.tif, " \
        "24_training.tif" in out
    assert "3 mask(s) without an image: 21_manual1.gif, 23_manual1.gif, 24_manual1.gif" in out
    assert any("dataset.img_suffix=_training dataset.mask_suffix=_manual1" in problem
               for problem in unpaired["problems"])


def test_a_model_built_without_the_data_asks_for_the_class_count():
    from segexp.models import build_model

    cfg = compose_config("dataset=folder")
    assert cfg.dataset.num_classes is None
    with pytest.raises(ConfigError, match="dataset.num_classes=<N>"):
        build_model(cfg)


def test_jpeg_mask_warning_is_given_once_while_the_dataset_is_built(tmp_path, monkeypatch, caplog):
    """Given in the main process at construction (loader workers fork later and inherit that it
    was given), naming the first JPEG mask; reading the samples adds none."""
    monkeypatch.setattr(base, "_warned_lossy_masks", False)
    write_kvasir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="segexp.data.base"):
        ds = FolderDataset(root=tmp_path, mask_map={255: 1}, class_names=["bg", "polyp"],
                           val_fraction=0)
        assert len([r for r in caplog.records if "is a JPEG" in r.getMessage()]) == 1
        for i in range(len(ds)):
            ds[i]
    warnings = [r.getMessage() for r in caplog.records if "is a JPEG" in r.getMessage()]
    assert len(warnings) == 1 and ds.samples[0][1].name in warnings[0]


# -- folder dataset with colour-coded masks ------------------------------------------------------
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
    write_rgb_image(tmp_path / "masks" / "s1.png", rgb)
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
