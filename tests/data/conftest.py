"""Helpers of the data tests: fixture files in the datasets' own formats, the official Cityscapes
id table, images whose pixels say which label they must have (the transform and augmentation
tests' alignment checks), and a trainer=debug run on a dataset config."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from segexp.data.base import IGNORE_INDEX
from segexp.engine.experiment import run_training
from tests.conftest import compose_config

# The official Cityscapes id -> trainId table (KITTI uses Cityscapes label ids), written out here
# independently of segexp.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def expected_train_ids(label_ids: np.ndarray) -> np.ndarray:
    out = np.full(label_ids.shape, 255, np.int64)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        out[label_ids == label_id] = train_id
    return out


# -- fixture files ----------------------------------------------------------------------------
def write_gray(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def write_rgb(path: Path, value: int, shape=(8, 12)) -> None:
    image = np.zeros(shape + (3,), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = value, 10, 200  # R differs from B: order shows
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def file_url(path: Path) -> str:
    return path.resolve().as_uri()


def write_kitti(root: Path, n: int = 10, shape=(6, 14)) -> dict[str, np.ndarray]:
    """training/{image_2,semantic,semantic_rgb,instance} and testing/image_2 as
    data_semantics.zip unpacks; semantic PNGs hold Cityscapes label ids."""
    labels = {}
    for k in range(n):
        name = f"{k:06d}_10.png"
        write_rgb(root / "training" / "image_2" / name, 10 * k, shape)
        ids = np.roll(np.resize(np.arange(34), shape[0] * shape[1]), k).reshape(shape)
        labels[name] = ids.astype(np.uint8)
        write_gray(root / "training" / "semantic" / name, labels[name])
        write_gray(root / "training" / "instance" / name, labels[name])
        write_rgb(root / "training" / "semantic_rgb" / name, 5, shape)
        write_rgb(root / "testing" / "image_2" / name, 7, shape)
    return labels


# -- alignment checks -------------------------------------------------------------------------
LABELS = (0, 1, 2, 3)
DATASET = {"base_size": [48, 64], "crop_size": [40, 40], "ignore_index": IGNORE_INDEX}


def block_pattern(height: int, width: int, block: int = 12, seed: int = 0):
    """A mask of random labels on a ``block`` grid and an image that encodes it: every channel
    is ``30 + 60 * label``, so the image says which label each pixel should have (and is never
    0)."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, len(LABELS), size=(-(-height // block), -(-width // block)))
    mask = np.kron(grid, np.ones((block, block), np.int64))[:height, :width].astype(np.uint8)
    image = np.repeat((30 + 60 * mask)[None], 3, axis=0).astype(np.uint8)
    return tv_tensors.Image(torch.from_numpy(image)), tv_tensors.Mask(torch.from_numpy(mask))


def interior(mask: torch.Tensor, size: int = 5) -> torch.Tensor:
    """Pixels whose ``size`` x ``size`` neighbourhood holds one label (not 255), away from the
    crop's edges (beyond which an unseen boundary may lie): resampling cannot blend there."""
    m = mask.long()[None, None].float()
    low = -torch.nn.functional.max_pool2d(-m, size, 1, size // 2)
    high = torch.nn.functional.max_pool2d(m, size, 1, size // 2)
    inside = ((low == high) & (m != IGNORE_INDEX))[0, 0]
    frame = torch.zeros_like(inside)
    frame[size // 2: -(size // 2), size // 2: -(size // 2)] = True
    return inside & frame


def misaligned(image: torch.Tensor, mask: torch.Tensor, size: int = 3) -> int:
    """How many interior pixels have an image value that does not match their mask label."""
    expected = 30 + 60 * mask.long()
    wrong = (image.long() - expected[None]).abs().amax(0) > 3
    return int((wrong & interior(mask, size)).sum())


# -- a trainer=debug run on a dataset config --------------------------------------------------
def debug_config(dataset: str, root: Path, *overrides: str):
    """``dataset=<dataset>`` at ``root`` with trainer=debug and a small FCN."""
    return compose_config(f"dataset={dataset}", f"dataset.root={root}", "trainer=debug", "model=fcn",
                          "head.channels=16", "trainer.num_vis_images=0", *overrides)


def assert_debug_run(cfg, run_dir: Path, num_classes: int) -> None:
    """Trains ``cfg`` in ``run_dir``: it completes its two iterations and reports every class."""
    best = run_training(cfg, run_dir)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["iters"] == 2
    assert 0.0 <= best <= 1.0
    assert len(summary["best_per_class"]) == num_classes
