"""Bad input gets a clear message (what, where, what to do) before training, not a traceback."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from segexp.engine.experiment import run_training
from segexp.errors import ConfigError, DataError, IncompatibleBackboneError, SegexpError
from tests.conftest import tiny_config, train_py


def make_folder_dataset(root: Path, n: int = 4, size: int = 32, values=(0, 1)) -> Path:
    """A user's folder dataset: images/{train,val}/*.png and class-index masks/{train,val}/*.png."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / "images" / split / f"im{i}.png"),
                        rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
            cv2.imwrite(str(root / "masks" / split / f"im{i}.png"),
                        rng.choice(np.array(values, dtype=np.uint8), (size, size)))
    return root


def folder_config(root: Path, *overrides: str):
    return tiny_config("dataset=folder", f"dataset.root={root}", "dataset.num_classes=2",
                       "dataset.class_names=[background,object]", "dataset.crop_size=[32,32]",
                       # two iterations read every sample: broken files are found when read
                       "trainer.max_iters=2", "trainer.val_interval=2", *overrides)


def run_expecting(error: type[SegexpError], cfg, run_dir: Path) -> str:
    with pytest.raises(error) as info:
        run_training(cfg, run_dir)
    return str(info.value)


def test_missing_dataset_root_says_what_was_expected(tmp_path):
    cfg = tiny_config("dataset=stanford_background", f"dataset.root={tmp_path / 'nowhere'}")
    message = run_expecting(DataError, cfg, tmp_path / "run")
    assert str(tmp_path / "nowhere") in message and "images" in message and "labels" in message


def test_unreadable_image_is_named(tmp_path):
    root = make_folder_dataset(tmp_path / "data")
    (root / "images" / "train" / "im2.png").write_bytes(b"not an image at all")
    message = run_expecting(DataError, folder_config(root), tmp_path / "run")
    assert "im2.png" in message and "cannot read image" in message


def test_image_mask_size_mismatch_is_named(tmp_path):
    root = make_folder_dataset(tmp_path / "data")
    cv2.imwrite(str(root / "masks" / "train" / "im1.png"), np.zeros((20, 32), np.uint8))
    message = run_expecting(DataError, folder_config(root), tmp_path / "run")
    assert "im1" in message and "32x32" in message and "32x20" in message


def test_mask_values_beyond_the_classes_are_named(tmp_path):
    root = make_folder_dataset(tmp_path / "data", values=(0, 1, 7))
    message = run_expecting(DataError, folder_config(root), tmp_path / "run")
    assert "7" in message and "im" in message and "num_classes" in message


def test_binary_mask_stored_as_0_255_is_detected(tmp_path):
    root = make_folder_dataset(tmp_path / "data", values=(0, 255))
    message = run_expecting(DataError, folder_config(root), tmp_path / "run")
    assert "mask_map" in message and "255" in message


def test_num_classes_disagreeing_with_the_dataset(tmp_path):
    root = make_folder_dataset(tmp_path / "data")
    message = run_expecting(DataError, folder_config(root, "dataset.num_classes=3"), tmp_path / "r")
    assert "dataset.num_classes=3" in message and "2 classes" in message
    message = run_expecting(ConfigError, tiny_config("model.num_classes=4"), tmp_path / "r2")
    assert "4 classes" in message and "6" in message


def test_crop_size_the_backbone_cannot_take(tmp_path):
    cfg = tiny_config("model=fcn", "head.channels=16", "dataset.crop_size=[40,40]")  # ResNet-18: /32
    message = run_expecting(ConfigError, cfg, tmp_path)
    assert "multiple of 32" in message and "dataset.crop_size=[32,32]" in message


def test_head_that_cannot_take_the_backbone(tmp_path):
    cfg = tiny_config("model=upernet", "backbone.out_indices=[3,4]")
    message = run_expecting(IncompatibleBackboneError, cfg, tmp_path)
    assert "resnet18" in message and "4" in message


def test_unknown_metric_and_batch_of_one(tmp_path):
    assert "mIoU" in run_expecting(ConfigError, tiny_config("metric=miou"), tmp_path / "a")
    message = run_expecting(ConfigError, tiny_config("model=pspnet", "trainer.batch_size=1"),
                            tmp_path / "b")
    assert "trainer.batch_size" in message


def test_train_py_prints_the_message_not_a_traceback_before_training(tmp_path):
    # A mask value outside the classes is found by the scan of every training mask before the
    # loader workers start, and reported as one line naming the value and a file.
    root = make_folder_dataset(tmp_path / "data", values=(0, 1, 9))
    out = train_py("trainer=debug", "dataset=folder", f"dataset.root={root}",
                   "dataset.num_classes=2", "dataset.class_names=[bg,fg]", "trainer.num_workers=2",
                   "dataset.crop_size=[32,32]", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("segexp: error: the train split's masks hold values outside")
    assert "9 (" in out.stderr and ".png" in out.stderr


def test_an_error_raised_in_a_loader_worker_shows_only_its_message():
    """DataLoader re-raises a worker's exception with the worker's traceback in its text."""
    from segexp.cli import message_of

    err = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most "
                    "recent call last):\n  File \"x.py\", line 1, in load\nsegexp.errors.DataError: "
                    "mask a.png holds values 9")
    assert message_of(err) == "mask a.png holds values 9"


def test_unknown_group_option_lists_the_choices(tmp_path):
    out = train_py("model=nosuch", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0
    assert "nosuch" in out.stderr and "Available options" in out.stderr and "upernet" in out.stderr


def test_long_lists_in_messages_are_cut_the_same_way():
    from segexp.errors import first_few, first_line

    assert first_few(list("abcdefgh"), 3) == "a, b, c ... (8 in all)"
    assert first_few(["x", "y"], 2, sep=" | ") == "x | y"
    assert first_few([]) == ""
    assert first_line(ValueError("\n  first\nsecond")) == "first"
    assert first_line(KeyError()) == "KeyError"
