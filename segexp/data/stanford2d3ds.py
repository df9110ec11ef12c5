"""Stanford 2D-3D-Semantics (Armeni, Sax et al., 2017): the 2D semantic images of the six indoor
areas, with the standard area-based cross-validation folds."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from segexp.data.base import IGNORE_INDEX, Sample, SegmentationDataset, found_in, read_image
from segexp.errors import ConfigError, DataError, first_few

URL = "http://3Dsemantics.stanford.edu"
FORM = "https://goo.gl/forms/2YSPaO2UKmn5Td5m2"
LABELS_URL = "https://github.com/alexsax/2D-3D-Semantics/raw/master/assets/semantic_labels.json"
ARCHIVES = "the noXYZ area archives (area_1.tar ... area_6.tar, with area_5a and area_5b)"
LABELS_FILE = "assets/semantic_labels.json"
RGB_SUFFIX = "_domain_rgb.png"
SEMANTIC_SUFFIX = "_domain_semantic.png"
# The value the semantic images hold where the mesh has no label: beyond len(labels).
MISSING_LABEL = 0x0D0D0D

# The 13 object classes of the dataset, in the usual order; the json's "<UNK>" and anything
# else is "unlabelled".
OBJECT_CLASSES = ("ceiling", "floor", "wall", "beam", "column", "window", "door", "table",
                  "chair", "sofa", "bookcase", "board", "clutter")
UNLABELLED = "unlabelled"
OBJECT_PALETTE = ((241, 255, 82), (102, 168, 226), (0, 255, 0), (113, 143, 65), (89, 173, 163),
                  (254, 158, 137), (190, 123, 75), (100, 22, 116), (0, 18, 141), (84, 84, 84),
                  (85, 116, 127), (255, 31, 33), (228, 228, 228))
UNLABELLED_COLOUR = (0, 0, 0)

# The dataset's three standard area-based folds: (train areas, test areas).
FOLDS = {1: ((1, 2, 3, 4, 6), (5,)), 2: ((1, 3, 5, 6), (2, 4)), 3: ((2, 4, 5), (1, 3, 6))}
SPLITS = ("train", "val", "test")
_AREA = re.compile(r"^area_(\d)([a-z]?)$")


def label_class(label: str) -> str:
    """The class of a ``semantic_labels.json`` entry: the part before the first underscore
    (``"chair_1_office_3_5"`` -> ``"chair"``, ``"<UNK>_0_<UNK>_0_0"`` -> ``"<UNK>"``)."""
    return str(label).split("_", 1)[0]


def label_lut(labels: Sequence[str], unlabelled_as_class: bool = True,
              ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """json index -> class index: the 13 objects are 1..13 with unlabelled 0
    (``unlabelled_as_class``), or 0..12 with unlabelled ``ignore_index``."""
    offset = 1 if unlabelled_as_class else 0
    unlabelled = 0 if unlabelled_as_class else ignore_index
    ids = {name: i + offset for i, name in enumerate(OBJECT_CLASSES)}
    return np.array([ids.get(label_class(label), unlabelled) for label in labels], dtype=np.int32)


def decode_semantic(rgb: np.ndarray, lut: np.ndarray, unlabelled: int) -> np.ndarray:
    """A semantic image (RGB, ``r * 256 * 256 + g * 256 + b`` = index into the labels) -> class
    indices; indices beyond the labels (0x0D0D0D marks missing data) are ``unlabelled``."""
    index = ((rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8)
             | rgb[..., 2].astype(np.int32))
    known = index < len(lut)
    out = np.full(index.shape, unlabelled, dtype=np.int32)
    out[known] = lut[index[known]]
    return out


def load_labels(path: Path) -> list[str]:
    """Read ``semantic_labels.json`` (a JSON list of ``class_instance_roomType_roomNum_area``)."""
    try:
        labels = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read the 2D-3D-S label list {path}: {error}. Download it again "
                        f"from {LABELS_URL}.") from error
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{path} is not the 2D-3D-S label list (a JSON list of strings like "
                        f"\"chair_1_office_3_5\"). Download it again from {LABELS_URL}.")
    return labels


def find_areas(root: Path) -> dict[int, list[Path]]:
    """area number -> its folders (``area_5a`` and ``area_5b`` both count as area 5)."""
    areas: dict[int, list[Path]] = {}
    if root.is_dir():
        for path in sorted(root.iterdir()):
            match = _AREA.match(path.name)
            if match and path.is_dir():
                areas.setdefault(int(match.group(1)), []).append(path)
    return areas


class Stanford2D3DSDataset(SegmentationDataset):
    """The 2D-3D-S perspective images (1080x1080, 70,496 in six areas) with per-pixel semantic
    labels for 13 object classes: ceiling, floor, wall, beam, column, window, door, table, chair,
    sofa, bookcase, board, clutter.

    ``root`` holds the extracted ``area_N/`` folders (area 5 comes as ``area_5a/`` and
    ``area_5b/``; a single ``area_5/`` works too) and ``assets/semantic_labels.json`` from the
    dataset's GitHub repository. Images are ``area_N/data/rgb/<name>_domain_rgb.png``, labels
    ``area_N/data/semantic/<name>_domain_semantic.png``, whose 24-bit colour
    ``r * 256 * 256 + g * 256 + b`` indexes the label list; the class is the part of the label
    before the first underscore. ``<UNK>`` labels, unknown classes and the missing-data value
    0x0D0D0D are "unlabelled": class 0 of 14 (``unlabelled_as_class=true``, the default), or the
    ignore index with the 13 objects as classes 0..12 (then ``num_classes=13``).

    ``fold`` picks the standard area split: 1 = train areas 1, 2, 3, 4, 6 / test area 5;
    2 = train 1, 3, 5, 6 / test 2, 4; 3 = train 2, 4, 5 / test 1, 3, 6. ``val`` and ``test`` are
    both the test areas (the dataset has no separate validation areas). Every area of the split
    must be present unless ``allow_missing_areas=true``.
    """

    def __init__(self, split: str = "train", transforms=None, ignore_index: int = IGNORE_INDEX,
                 num_classes: int | None = 14, crop_size: Sequence[int] = (512, 512),
                 base_size: Sequence[int] | None = (1080, 1080),
                 root: str | Path = "data/stanford2d3ds", fold: int = 1,
                 unlabelled_as_class: bool = True, labels_file: str | Path = LABELS_FILE,
                 allow_missing_areas: bool = False) -> None:
        super().__init__(split=split, transforms=transforms, ignore_index=ignore_index,
                         num_classes=num_classes)
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r} for stanford2d3ds: use train, val or test "
                              "(val and test are both the fold's test areas).")
        if int(fold) not in FOLDS:
            raise ConfigError(f"dataset.fold={fold}: 2D-3D-S has the standard folds 1, 2 and 3 "
                              "(1 = test on area 5).")
        self.root = Path(root)
        self.fold = int(fold)
        self.unlabelled_as_class = bool(unlabelled_as_class)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.base_size = tuple(base_size) if base_size is not None else None
        if self.unlabelled_as_class:
            self.class_names = (UNLABELLED, *OBJECT_CLASSES)
            self.palette = (UNLABELLED_COLOUR, *OBJECT_PALETTE)
        else:
            self.class_names = OBJECT_CLASSES
            self.palette = OBJECT_PALETTE
        self.check_num_classes()
        train_areas, test_areas = FOLDS[self.fold]
        self.areas = train_areas if split == "train" else test_areas
        self.samples = self._find_samples(bool(allow_missing_areas))
        labels_path = Path(labels_file)
        labels_path = labels_path if labels_path.is_absolute() else self.root / labels_path
        if not labels_path.is_file():
            raise DataError(
                f"2D-3D-S label list not found: expected {labels_path} (dataset.labels_file="
                f"{labels_file}, relative to dataset.root). It is not part of the area archives: "
                f"download {LABELS_URL} to {self.root / LABELS_FILE}.")
        self.labels = load_labels(labels_path)
        self._unlabelled = 0 if self.unlabelled_as_class else ignore_index
        self._lut = label_lut(self.labels, self.unlabelled_as_class, ignore_index)

    def _find_samples(self, allow_missing: bool) -> list[tuple[Path, Path]]:
        found = find_areas(self.root)
        if not found:
            hint = ""
            for child in sorted(self.root.iterdir()) if self.root.is_dir() else []:
                if child.is_dir() and find_areas(child):
                    hint = f" It holds {child.name}/ with area folders: did you mean " \
                           f"dataset.root={child}?"
                    break
            if _AREA.match(self.root.name):
                hint = f" {self.root} is itself an area folder: did you mean " \
                       f"dataset.root={self.root.parent}?"
            raise DataError(
                f"Stanford 2D-3D-S data not found: expected the sub-folders "
                f"{self.root / 'area_1'} ... {self.root / 'area_6'} (area 5 as area_5a/ and "
                f"area_5b/), each with data/rgb/ and data/semantic/, and {self.root / LABELS_FILE}; "
                f"found {found_in(self.root, 12)}.{hint} Request access with the form at {FORM} (see "
                f"{URL}), download {ARCHIVES}, extract them into one folder, put {LABELS_URL} in "
                "its assets/ and set dataset.root=<that folder> or SEGEXP_DATA=<dir> with "
                "<dir>/stanford2d3ds (python scripts/prepare/stanford2d3ds.py prints the steps).")
        missing = [area for area in self.areas if area not in found]
        if missing and (not allow_missing or len(missing) == len(self.areas)):
            names = ", ".join(f"area_{a}" + ("a/area_5b" if a == 5 else "") for a in missing)
            present = ", ".join(p.name for a in sorted(found) for p in found[a])
            raise DataError(
                f"fold {self.fold} {self.split!r} uses areas {', '.join(map(str, self.areas))}, but "
                f"{names} {'is' if len(missing) == 1 else 'are'} missing from {self.root} (found "
                f"{present}). Extract the missing area archives there"
                + ("." if len(missing) == len(self.areas) else
                   ", or set dataset.allow_missing_areas=true to use the areas present."))
        samples: list[tuple[Path, Path]] = []
        for area in self.areas:
            for folder in found.get(area, []):
                samples.extend(self._area_samples(folder))
        if not samples:
            raise DataError(f"no <name>{RGB_SUFFIX} images in the data/rgb/ folders of areas "
                            f"{', '.join(map(str, self.areas))} under {self.root}. Re-extract "
                            f"{ARCHIVES}.")
        return samples

    @staticmethod
    def _area_samples(folder: Path) -> list[tuple[Path, Path]]:
        rgb_dir, semantic_dir = folder / "data" / "rgb", folder / "data" / "semantic"
        if not rgb_dir.is_dir() or not semantic_dir.is_dir():
            raise DataError(
                f"2D-3D-S area folder {folder} lacks its 2D data: expected {rgb_dir} and "
                f"{semantic_dir}, found in {folder / 'data'}: {found_in(folder / 'data', 12)}. "
                f"Re-extract the area's archive ({ARCHIVES}).")
        samples, missing = [], []
        for image in sorted(rgb_dir.glob(f"*{RGB_SUFFIX}")):
            label = semantic_dir / (image.name[: -len(RGB_SUFFIX)] + SEMANTIC_SUFFIX)
            if label.is_file():
                samples.append((image, label))
            else:
                missing.append(image.name)
        if missing:
            shown = first_few(missing, 5)
            raise DataError(f"{len(missing)} image(s) in {rgb_dir} have no "
                            f"<name>{SEMANTIC_SUFFIX} in {semantic_dir}: {shown}. Re-extract the "
                            "area's archive.")
        return samples

    def load(self, index: int) -> Sample:
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        encoded = cv2.imread(str(label_path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if encoded is None:
            raise DataError(f"cannot read semantic image {label_path}: it is missing, empty or "
                            "not an image. Re-extract the area's archive.")
        rgb = cv2.cvtColor(encoded, cv2.COLOR_BGR2RGB)
        mask = decode_semantic(rgb, self._lut, self._unlabelled)
        return Sample(image=image, mask=mask, source=str(label_path))
