"""Helpers of the data tests: fixture files in the datasets' own formats (KITTI, Stanford
2D-3D-S, DIS5K, Datumaro, colour-coded folder masks, and the images the Cityscapes and ADE20K
fixtures share), the official Cityscapes id table, images whose pixels say which label they must
have (the transform and augmentation tests' alignment checks), and a trainer=debug run on a
dataset config."""

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


# -- fixture images shared by the dataset tests ----------------------------------------------
SHAPE = (24, 32)


def write_rgb_image(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb.astype(np.uint8), cv2.COLOR_RGB2BGR))


def write_grey_image(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)


def photo(k: int, shape=SHAPE) -> np.ndarray:
    """A distinct image per sample (its red channel carries k, so pairing shows)."""
    image = np.zeros(shape + (3,), np.uint8)
    image[..., 0] = 10 * k + 5
    image[..., 1] = np.arange(shape[1], dtype=np.uint8)[None, :] * 3
    image[..., 2] = 200
    return image


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        cv2.imwrite(str(path), cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
    else:
        Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def solid_rgb(value: int, shape=(8, 16)) -> np.ndarray:
    image = np.zeros(shape + (3,), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = value, 10, 200  # R differs from B: order shows
    return image


# -- Stanford 2D-3D-S ----------------------------------------------------------------------------
# The label list as semantic_labels.json writes it (class_instance_roomType_roomNum_area), with
# its <UNK> entry first and a class outside the 13 ("stairs") that must count as unlabelled.
LABELS_2D3DS = ["<UNK>_0_<UNK>_0_0", "beam_10_hallway_6_1", "ceiling_1_office_1_1",
                "chair_1_office_3_5", "clutter_2_office_3_5", "wall_1_office_1_1",
                "stairs_1_stairs_1_1", "floor_1_office_1_1", "board_1_office_1_1",
                "bookcase_3_office_2_5", "column_1_hallway_1_1", "door_4_office_3_5",
                "sofa_1_lounge_1_6", "<UNK>_0_<UNK>_0_0", "table_2_office_3_5",
                "window_1_office_1_1"]
MISSING = 0x0D0D0D


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
            write_rgb_image(data / "rgb" / f"{name}_rgb.png", photo(k))
            index = semantic_index(k, past_end=past_end)
            write_rgb_image(data / "semantic" / f"{name}_semantic.png", encode(index))
            write_rgb_image(data / "semantic_pretty" / f"{name}_semantic_pretty.png", photo(0))
            write_grey_image(data / "depth" / f"{name}_depth.png", np.zeros(SHAPE))
            (data / "pose").mkdir(exist_ok=True)
            (data / "pose" / f"{name}_pose.json").write_text("{}")
            written[f"{area}/{name}"] = index
            k += 1
        (root / area / "pano" / "rgb").mkdir(parents=True, exist_ok=True)
    if labels:
        (root / "assets").mkdir(parents=True, exist_ok=True)
        (root / "assets" / "semantic_labels.json").write_text(json.dumps(LABELS_2D3DS))
    return written


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
            write_rgb_image(root / subset / "im" / f"{name}.jpg", photo(k, shape))
            gt = anti_aliased_gt(k, shape)
            write_grey_image(root / subset / "gt" / f"{name}.png", gt)
            gts[f"{subset}/{name}"] = gt
            k += 1
    return gts


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
            write_rgb_image(root / subset / "images" / f"{name}.{'png' if i % 2 else 'jpg'}", photo(k))
            mask = index_mask(k)
            if colour:
                rgb = np.zeros(SHAPE + (3,), np.uint8)
                for value, c in enumerate(COLOURS):
                    rgb[mask == value] = c
                mask[mask == 255] = 0
                write_rgb_image(root / subset / "masks" / f"{name}.png", rgb)
            else:
                write_grey_image(root / subset / "masks" / f"{name}.png", mask)
            masks[f"{subset}/{name}"] = mask
            k += 1
    return masks


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
        write_rgb_image(root / "images" / f"s{k}.png", photo(k))
        write_rgb_image(root / "masks" / f"s{k}.png", rgb)
        masks[f"s{k}"] = mask
    return masks


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
