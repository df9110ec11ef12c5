"""DIS5K (Qin et al., ECCV 2022): dichotomous image segmentation, highly accurate binary masks of
one foreground object per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from segexp.data.base import (
    IGNORE_INDEX,
    JPEG_EXTENSIONS,
    Sample,
    SegmentationDataset,
    found_in,
    read_image,
    root_hint,
)
from segexp.errors import ConfigError, DataError

URL = "https://github.com/xuebinqin/DIS"
DRIVE_URL = "https://drive.google.com/file/d/1jOC2zK0GowBvEt03B7dGugCRDVAoeIqq/view"
ARCHIVE = "DIS5K.zip"
TEST_SUBSETS = ("DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4")
SUBSETS = {"train": ("DIS-TR",), "val": ("DIS-VD",), "trainval": ("DIS-TR", "DIS-VD"),
           "test": TEST_SUBSETS, **{f"test{i}": (f"DIS-TE{i}",) for i in range(1, 5)}}
# Published sizes, for the prepare script's check.
SUBSET_SIZES = {"DIS-TR": 3000, "DIS-VD": 470, "DIS-TE1": 500, "DIS-TE2": 500, "DIS-TE3": 500,
                "DIS-TE4": 500}
# DIS5K ships JPEG images (PNG ground truths); anything else in im/ is not a sample.
SAMPLE_EXTENSIONS = (*JPEG_EXTENSIONS, ".png")
THRESHOLD = 128


def binarize(gt: np.ndarray, threshold: int = THRESHOLD) -> np.ndarray:
    """A 0/255 ground truth with anti-aliased edges -> 0 (background) / 1 (foreground):
    values ``>= threshold`` are foreground."""
    return (gt >= threshold).astype(np.uint8)


def read_gt(path: str | Path) -> np.ndarray:
    """Read a DIS5K ground-truth PNG as one grey channel (a colour PNG is converted)."""
    gt = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    if gt is None:
        raise DataError(f"cannot read ground-truth mask {path}: it is missing, empty or not an "
                        f"image. Re-extract {ARCHIVE} ({URL}).")
    return gt


class DIS5KDataset(SegmentationDataset):
    """5,470 high-resolution images of 225 categories with one highly accurate binary mask each:
    ``DIS-TR`` (3000, ``train``), ``DIS-VD`` (470, ``val``) and ``DIS-TE1`` .. ``DIS-TE4`` (500
    each, of increasing shape complexity: ``test1`` .. ``test4``; ``test`` is all four;
    ``trainval`` is DIS-TR + DIS-VD). ``train_split`` / ``val_split`` pick what the trainer's
    ``train`` / ``val`` read (e.g. ``val_split=test1`` validates on DIS-TE1).

    ``root`` is the ``DIS5K`` folder that ``DIS5K.zip`` (Google Drive link in
    https://github.com/xuebinqin/DIS) unpacks to, holding ``<subset>/im/<name>.jpg`` and
    ``<subset>/gt/<name>.png``. Masks are stored as 0/255 with anti-aliased edges; pixels
    ``>= threshold`` (128) are foreground (class 1), the rest background (class 0).
    """

    class_names = ("background", "foreground")
    palette = ((0, 0, 0), (255, 255, 255))

    def __init__(self, split: str = "train", transforms=None, ignore_index: int = IGNORE_INDEX,
                 num_classes: int | None = 2, crop_size: Sequence[int] = (1024, 1024),
                 base_size: Sequence[int] | None = (1024, 1024), root: str | Path = "data/DIS5K",
                 threshold: int = THRESHOLD, train_split: str = "train",
                 val_split: str = "val") -> None:
        super().__init__(split=split, transforms=transforms, ignore_index=ignore_index,
                         num_classes=num_classes)
        self.list_name = self.choose_split(
            "dis5k", "train (DIS-TR), val (DIS-VD), trainval (both), test1..test4 (DIS-TE1..4) or "
            "test (all four)", SUBSETS, train_split, val_split)
        if not 0 < int(threshold) <= 255:
            raise ConfigError(f"dataset.threshold={threshold} must be in 1..255.")
        self.root = Path(root)
        self.threshold = int(threshold)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.base_size = tuple(base_size) if base_size is not None else None
        self.subsets = SUBSETS[self.list_name]
        self.samples = self._find_samples()
        self.check_num_classes()

    def _find_samples(self) -> list[tuple[Path, Path]]:
        folders = [self.root / subset for subset in self.subsets]
        if not any((self.root / subset).is_dir() for subset in SUBSET_SIZES):
            nested = [p for p in (self.root / "DIS5K",) if (p / "DIS-TR").is_dir()]
            hint = root_hint(self.root, nested, SUBSET_SIZES, itself="a subset folder")
            if not hint and self.root.name in ("im", "gt") and self.root.parent.name in SUBSET_SIZES:
                hint = (f" {self.root} is a subset's {self.root.name}/ folder: did you mean "
                        f"dataset.root={self.root.parent.parent}?")
            raise self.data_not_found(
                "DIS5K", f"the sub-folders {', '.join(str(self.root / s) for s in SUBSET_SIZES)} "
                "(each with im/ and gt/)",
                f"Download {ARCHIVE} from Google Drive ({DRIVE_URL}, linked from {URL}), unzip it "
                "and set dataset.root=<path>/DIS5K or SEGEXP_DATA=<dir> with <dir>/DIS5K (python "
                "scripts/prepare/dis5k.py prints the steps).", hint=hint, limit=12)
        samples = []
        for folder in folders:
            images_dir, gts_dir = folder / "im", folder / "gt"
            if not images_dir.is_dir() or not gts_dir.is_dir():
                raise DataError(
                    f"DIS5K {self.list_name!r} needs {images_dir} and {gts_dir}; found in "
                    f"{folder}: {found_in(folder, 12)} (and in {self.root}: {found_in(self.root, 12)}). "
                    f"Re-extract {ARCHIVE} ({DRIVE_URL}).")
            images = {p.stem: p for p in sorted(images_dir.iterdir())
                      if p.suffix.lower() in SAMPLE_EXTENSIONS and not p.name.startswith(".")}
            gts = {p.stem: p for p in sorted(gts_dir.iterdir())
                   if p.suffix.lower() == ".png" and not p.name.startswith(".")}
            no_gt, no_image = sorted(set(images) - set(gts)), sorted(set(gts) - set(images))
            if no_gt or no_image:
                problems = []
                if no_gt:
                    problems.append(f"{len(no_gt)} image(s) in {images_dir} have no <name>.png in "
                                    f"{gts_dir}: {', '.join(no_gt[:5])}")
                if no_image:
                    problems.append(f"{len(no_image)} mask(s) in {gts_dir} have no image in "
                                    f"{images_dir}: {', '.join(no_image[:5])}")
                raise DataError("; ".join(problems) + f". Re-extract {ARCHIVE} ({DRIVE_URL}).")
            if not images:
                raise DataError(f"no images in {images_dir}. Re-extract {ARCHIVE} ({DRIVE_URL}).")
            samples.extend((images[stem], gts[stem]) for stem in sorted(images))
        return samples

    def load(self, index: int) -> Sample:
        image_path, gt_path = self.samples[index]
        image = read_image(image_path)
        mask = binarize(read_gt(gt_path), self.threshold)
        return Sample(image=image, mask=mask, source=str(gt_path))
