"""The data checks run_training makes before the first step (segexp.engine.experiment.check_data):
results that would look right but be computed on wrong data are refused before training, as every
training mask is scanned (not the first few); files that cannot be read stop the run, or are left
out with a count under skip_bad_files=true."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from segexp.data.overlap import validation_images_in_training
from segexp.engine.experiment import build_datasets, run_training
from segexp.errors import DataError
from tests.conftest import compose_config

FOLDER = ["dataset=folder", "dataset.class_names=[bg,fg]", "dataset.crop_size=[32,32]",
          "dataset.val_fraction=0.2", "trainer=debug", "model=fcn", "head.channels=8",
          "trainer.measure_speed=false"]


def _layout(root, masks: list[np.ndarray]) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, mask in enumerate(masks):
        cv2.imwrite(str(root / "images" / f"{i:03d}.png"), rng.integers(0, 255, (32, 32, 3), np.uint8))
        cv2.imwrite(str(root / "masks" / f"{i:03d}.png"), mask.astype(np.uint8))


def _binary(value: int) -> np.ndarray:
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = value
    return mask


def test_binary_0_255_masks_after_many_empty_ones_are_refused_before_training(tmp_path):
    # Defect data: the first 12 masks show no defect at all; later ones mark it with 255.
    _layout(tmp_path / "data", [np.zeros((32, 32), np.uint8)] * 12 + [_binary(255)] * 6)
    with pytest.raises(DataError, match=r"only the values 0 and 255") as info:
        run_training(compose_config(*FOLDER, f"dataset.root={tmp_path / 'data'}"), tmp_path / "run")
    assert "mask_map='{255: 1}'" in str(info.value) and ".png" in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training step
    # The fix the message gives trains, and the foreground class is then seen.
    run_training(compose_config(*FOLDER, f"dataset.root={tmp_path / 'data'}",
                                "dataset.mask_map={255:1}"), tmp_path / "fixed")
    assert json.loads((tmp_path / "fixed" / "metrics.json").read_text())["status"] == "completed"


def test_out_of_range_values_anywhere_stop_before_training(tmp_path):
    # The first masks are fine (a check of the first few would pass); later ones hold a 7.
    _layout(tmp_path / "data", [_binary(1)] * 10 + [_binary(7)] * 5)
    with pytest.raises(DataError, match=r"values outside the 2 classes.*7 \(") as info:
        run_training(compose_config(*FOLDER, f"dataset.root={tmp_path / 'data'}"), tmp_path / "run")
    assert "first in" in str(info.value) and ".png" in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _truncate_jpeg(path, keep: float = 0.6) -> None:
    data = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 255, (32, 32, 3), np.uint8))[1]
    path.write_bytes(data.tobytes()[: int(len(data) * keep)])


def test_unreadable_files_stop_before_training_or_are_skipped_with_a_count(tmp_path, caplog):
    root = tmp_path / "data"
    _layout(root, [_binary(1)] * 20)
    # Two training images and one validation image cut short (val_fraction picks 4 of 20).
    for i in range(20):
        (root / "images" / f"{i:03d}.png").rename(root / "images" / f"{i:03d}.jpg")
    for i in range(20):
        _truncate_jpeg(root / "images" / f"{i:03d}.jpg", keep=1.0)
    cfg = compose_config(*FOLDER, f"dataset.root={root}", "dataset.img_suffix=.jpg")
    from segexp.engine.experiment import build_datasets
    train_set, val_set = build_datasets(cfg)
    bad = [train_set.samples[3][0], train_set.samples[9][0], val_set.samples[1][0]]
    for path in bad:
        _truncate_jpeg(path)
    with pytest.raises(DataError, match=r"is truncated") as info:
        run_training(compose_config(*FOLDER, f"dataset.root={root}", "dataset.img_suffix=.jpg"),
                     tmp_path / "run")
    assert bad[0].name in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training step

    caplog.set_level("WARNING")
    run_training(compose_config(*FOLDER, f"dataset.root={root}", "dataset.img_suffix=.jpg",
                                "skip_bad_files=true"), tmp_path / "skipped")
    metrics = json.loads((tmp_path / "skipped" / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    log = caplog.text
    assert f"2 of the {len(train_set)} train samples cannot be read" in log
    assert f"1 of the {len(val_set)} val samples cannot be read" in log
    assert bad[0].name in log and bad[1].name in log and bad[2].name in log
    # Resuming the same run folder leaves the same files out (the cached scan says which).
    caplog.clear()
    run_training(compose_config(*FOLDER, f"dataset.root={root}", "dataset.img_suffix=.jpg",
                                "skip_bad_files=true", "resume=true"), tmp_path / "skipped")
    assert f"2 of the {len(train_set)} train samples cannot be read" in caplog.text


def test_validation_images_that_are_also_training_images_are_named_and_counted(tmp_path, caplog,
                                                                              capsys):
    # Split lists a user wrote by hand: train.txt holds every image, val.txt three of them. The
    # validation scores then measure the fit to training images, which looks like a good model.
    _layout(tmp_path / "data", [_binary(1)] * 10)
    (tmp_path / "data" / "splits").mkdir()
    (tmp_path / "data" / "splits" / "train.txt").write_text("".join(f"{i:03d}\n" for i in range(10)))
    (tmp_path / "data" / "splits" / "val.txt").write_text("002\n005\n009\n")
    with caplog.at_level("WARNING", logger="segexp.engine.experiment"):
        run_training(compose_config(*FOLDER, f"dataset.root={tmp_path / 'data'}"), tmp_path / "run")
    (warning,) = [r.getMessage() for r in caplog.records if "also training images" in r.getMessage()]
    assert warning.startswith("3 of the 3 validation images") and "002.png" in warning
    assert "dataset.train_split / dataset.val_split" in warning
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val_images_in_training"] == 3

    # segexp-eval on that run says it too, and records the count beside the scores.
    from omegaconf import OmegaConf

    from segexp.cli.evaluate import main as evaluate

    (tmp_path / "run" / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(compose_config(*FOLDER, f"dataset.root={tmp_path / 'data'}"),
                   tmp_path / "run" / ".hydra" / "config.yaml")
    evaluate([str(tmp_path / "run"), "--device", "cpu"])
    assert "3 of the 3 val images are also training images" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "eval_val_best.json").read_text())[
        "images_also_in_training"] == 3

    # Disjoint lists: no warning, and the record says 0.
    (tmp_path / "data" / "splits" / "train.txt").write_text(
        "".join(f"{i:03d}\n" for i in range(10) if i not in (2, 5, 9)))
    caplog.clear()
    with caplog.at_level("WARNING", logger="segexp.engine.experiment"):
        run_training(compose_config(*FOLDER, f"dataset.root={tmp_path / 'data'}"), tmp_path / "held_out")
    assert not [r for r in caplog.records if "also training images" in r.getMessage()]
    assert json.loads((tmp_path / "held_out" / "metrics.json").read_text())["val_images_in_training"] == 0


def test_copies_of_training_images_in_the_validation_folder_are_found_by_content(tmp_path):
    # train/ and val/ split folders, val/ made partly by copying training files under new names.
    # Every mask is the same (repeated masks are normal): only the images' bytes count.
    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    for split, count in (("train", 6), ("val", 3)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        for i in range(count):
            cv2.imwrite(str(root / split / "images" / f"{split}{i}.png"),
                        rng.integers(0, 255, (32, 32, 3), np.uint8))
            cv2.imwrite(str(root / split / "masks" / f"{split}{i}.png"), _binary(1))
    for i, k in ((0, 4), (2, 1)):  # val0 and val2 are copies of train4 and train1
        (root / "val" / "images" / f"val{i}.png").write_bytes(
            (root / "train" / "images" / f"train{k}.png").read_bytes())
    options = [*FOLDER, f"dataset.root={root}"]
    train_set, val_set = build_datasets(compose_config(*options))
    assert [p.name for p in validation_images_in_training(train_set, val_set)] == ["val0.png", "val2.png"]
    run_training(compose_config(*options), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val_images_in_training"] == 2


def test_generated_data_has_no_files_to_share(tmp_path):
    train_set, val_set = build_datasets(compose_config("trainer=debug"))
    assert validation_images_in_training(train_set, val_set) == []


def test_without_per_sample_entries_only_the_same_files_count(tmp_path):
    """A dataset that lists its files (``files()``) but not its samples: which file is an image is
    unknown, so identical files (e.g. two empty masks) are not taken for copied images; a file
    read by both splits still counts."""
    from segexp.data.base import SegmentationDataset

    empty = np.zeros((4, 4), np.uint8).tobytes()
    for name in ("a_mask", "b_mask", "c_mask"):
        (tmp_path / name).write_bytes(empty)

    class Listed(SegmentationDataset):
        def __init__(self, names):
            super().__init__(num_classes=2)
            self.paths = [tmp_path / n for n in names]

        def __len__(self):
            return len(self.paths)

        def files(self):
            return self.paths

    assert validation_images_in_training(Listed(["a_mask"]), Listed(["b_mask"])) == []
    assert validation_images_in_training(Listed(["a_mask", "c_mask"]), Listed(["c_mask"])) == \
        [tmp_path / "c_mask"]
