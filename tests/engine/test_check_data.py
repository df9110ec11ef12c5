"""Results that would look right but be computed on wrong data are refused before training:
every training mask is scanned (not the first few), and classes never seen are said to be."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from segexp.engine.experiment import run_training
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


def test_diverged_weights_never_replace_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The loss can stay finite for a step or two after the weights explode: the checkpoint from
    before the divergence is kept and the error says which iteration it holds."""
    import torch

    from segexp.engine import trainer as trainer_module
    from segexp.errors import TrainingError
    from segexp.weights_io import read_weights_file
    from tests.conftest import tiny_config

    real_step = trainer_module.optimizer_step

    def exploding_step(run):
        real_step(run)
        if run.state.iter == 2:  # during iteration 3: the weights blow up, the loss stays finite
            with torch.no_grad():
                for p in run.model.parameters():
                    p.mul_(1e5)

    monkeypatch.setattr(trainer_module, "optimizer_step", exploding_step)
    with pytest.raises(TrainingError, match="iteration 4 the weights have diverged") as info:
        run_training(tiny_config("trainer.max_iters=6", "trainer.val_interval=2",
                                 "trainer.measure_speed=false"), tmp_path)
    assert "keeps iteration 2" in str(info.value)
    assert read_weights_file(tmp_path / "checkpoints" / "last.pt")["state"]["iter"] == 2


class _RunsCode:
    def __reduce__(self):  # unpickling this would create the marker file
        import os

        return (os.system, ("touch SEGEXP_PWNED",))


def test_weights_files_are_refused_clearly_and_never_executed(tmp_path, monkeypatch):
    import torch

    from segexp.errors import ConfigError
    from tests.conftest import train_py

    monkeypatch.chdir(tmp_path)
    code = tmp_path / "code.pt"
    torch.save({"model": _RunsCode()}, code)
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    common = ["trainer=debug", "model=fcn", "head.channels=8", "dataset.image_size=32"]
    for option in ("resume", "model.checkpoint", "backbone.checkpoint"):
        cases = [(code, "holds Python objects or code"), (cut, "damaged or incomplete")]
        if option != "resume":  # resume=<folder> means a run folder, looked into for its last.pt
            cases.append((tmp_path, "is a folder"))
        for path, expected in cases:
            with pytest.raises(ConfigError, match=expected):
                run_training(compose_config(*common, f"{option}={path}"), tmp_path / "run")
    # Through train.py (and Hydra's instantiation wrapper): one line, no traceback.
    out = train_py(*common, f"backbone.checkpoint={code}", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("segexp: error: backbone.checkpoint")
    assert not (tmp_path / "SEGEXP_PWNED").exists()
