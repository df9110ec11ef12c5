"""The Cityscapes dataset (Cordts et al., CVPR 2016), fine annotations, in its original layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segexp.data.base import (
    IGNORE_INDEX,
    Sample,
    SegmentationDataset,
    found_in,
    read_image,
    read_mask,
    root_hint,
)
from segexp.errors import ConfigError, DataError

URL = "https://www.cityscapes-dataset.com/downloads/"
ARCHIVES = "gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip"
SPLITS = ("train", "val", "test", "trainval")  # trainval: train + val (before a test submission)
IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_ID_SUFFIX = "_gtFine_labelIds.png"

# The official id -> trainId table (cityscapesScripts' labels.py): the 19 evaluated classes get
# trainIds 0..18 in this order; every other id (unlabeled, ego vehicle, rectification border,
# out of roi, static, dynamic, ground, parking, rail track, guard rail, bridge, tunnel,
# polegroup, caravan, trailer, license plate) is ignored.
EVALUATED_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def id_to_train_id_lut(ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A 256-entry lookup table mapping a ``labelIds`` value to its trainId (others: ignore)."""
    lut = np.full(256, ignore_index, dtype=np.uint8)
    lut[list(EVALUATED_IDS)] = np.arange(len(EVALUATED_IDS), dtype=np.uint8)
    return lut


def label_ids_to_train_ids(label_ids: np.ndarray, ignore_index: int = IGNORE_INDEX,
                           source: str = "labelIds mask") -> np.ndarray:
    """Convert a ``*_gtFine_labelIds.png`` array (ids 0..33) to trainIds (0..18, ignore)."""
    if label_ids.size and (int(label_ids.min()) < 0 or int(label_ids.max()) > 255):
        raise DataError(f"{source} holds values outside 0..255 ({int(label_ids.min())}.."
                        f"{int(label_ids.max())}); Cityscapes labelIds are 0..33. Re-extract "
                        f"{ARCHIVES} from {URL}.")
    return id_to_train_id_lut(ignore_index)[label_ids.astype(np.intp)]


class CityscapesDataset(SegmentationDataset):
    """5000 street scenes (2975 train, 500 val, 1525 test) of 2048x1024 pixels from 50 cities,
    with fine labels for 19 classes (trainIds; every other label id is ignored).

    ``root`` holds ``leftImg8bit/`` and ``gtFine/`` as ``leftImg8bit_trainvaltest.zip`` and
    ``gtFine_trainvaltest.zip`` unpack (both need a free login at
    https://www.cityscapes-dataset.com/downloads/). Images are
    ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png``; labels
    ``gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png`` where cityscapesScripts'
    ``createTrainIdLabelImgs`` has written them, otherwise ``<name>_gtFine_labelIds.png``
    converted on the fly with the official id -> trainId table. The ``test`` split's labels
    are withheld by the benchmark (its masks are all ignore). ``train_split`` / ``val_split``
    pick what the trainer's ``train`` / ``val`` read: ``trainval`` trains on train + val for a
    final model before a test-server submission (its validation scores are then not held out).
    """

    class_names = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                   "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                   "truck", "bus", "train", "motorcycle", "bicycle")
    palette = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
               (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
               (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
               (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))

    def __init__(self, split: str = "train", transforms=None, ignore_index: int = IGNORE_INDEX,
                 num_classes: int | None = 19, crop_size: Sequence[int] = (512, 1024),
                 base_size: Sequence[int] | None = (1024, 2048),
                 root: str | Path = "data/cityscapes", train_split: str = "train",
                 val_split: str = "val") -> None:
        super().__init__(split=split, transforms=transforms, ignore_index=ignore_index,
                         num_classes=num_classes)
        self.list_name = self.choose_split("cityscapes", "train, val, test or trainval", SPLITS,
                                           train_split, val_split)
        if val_split == "test":
            raise ConfigError(
                "dataset.val_split=test for cityscapes: the benchmark withholds the test labels "
                "(every pixel is ignore), so nothing could be scored. Validate on val, and predict "
                "the test images with segexp-predict for the evaluation server.")
        self.root = Path(root)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.base_size = tuple(base_size) if base_size is not None else None
        parts = ("train", "val") if self.list_name == "trainval" else (self.list_name,)
        # (image path, label path, whether the label holds labelIds that need converting)
        self.samples = [sample for part in parts for sample in self._find_samples(part)]
        self.check_num_classes()

    def _find_samples(self, split: str) -> list[tuple[Path, Path, bool]]:
        images_root, labels_root = self.root / "leftImg8bit", self.root / "gtFine"
        if not images_root.is_dir() or not labels_root.is_dir():
            nested = [p for p in (self.root / "cityscapes",) if (p / "leftImg8bit").is_dir()]
            hint = root_hint(self.root, nested, ("leftImg8bit", "gtFine"))
            if not hint and (images_root.is_dir() or labels_root.is_dir()):
                missing = "gtFine_trainvaltest.zip" if images_root.is_dir() else \
                    "leftImg8bit_trainvaltest.zip"
                hint = f" Extract {missing} there as well."
            raise self.data_not_found(
                "Cityscapes", f"the sub-folders {images_root} and {labels_root}",
                f"Download {ARCHIVES} from {URL} (free login), extract both into one folder and "
                "set dataset.root=<that folder> or SEGEXP_DATA=<dir> with <dir>/cityscapes.",
                hint=hint)
        split_images, split_labels = images_root / split, labels_root / split
        if not split_images.is_dir() or not split_labels.is_dir():
            option = {"train": " (dataset.train_split)", "val": " (dataset.val_split)"}.get(self.split, "")
            raise DataError(
                f"Cityscapes split {split!r}{option} not found: expected {split_images} and "
                f"{split_labels}; {images_root} holds {found_in(images_root)} and {labels_root} "
                f"holds {found_in(labels_root)}. Re-extract {ARCHIVES} from {URL}, or name a "
                "split that is there with dataset.train_split / dataset.val_split.")
        images = sorted(split_images.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise DataError(f"no <city>/<name>{IMAGE_SUFFIX} images in {split_images}. "
                            f"Re-extract leftImg8bit_trainvaltest.zip from {URL}.")
        samples, missing = [], []
        for image in images:
            name = image.name[: -len(IMAGE_SUFFIX)]
            folder = split_labels / image.parent.name
            train_ids, label_ids = folder / f"{name}{TRAIN_ID_SUFFIX}", folder / f"{name}{LABEL_ID_SUFFIX}"
            if train_ids.is_file():
                samples.append((image, train_ids, False))
            elif label_ids.is_file():
                samples.append((image, label_ids, True))
            else:
                missing.append(f"{image.parent.name}/{name}")
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise DataError(
                f"{len(missing)} image(s) in {split_images} have neither "
                f"<name>{TRAIN_ID_SUFFIX} nor <name>{LABEL_ID_SUFFIX} in {split_labels}/<city>/: "
                f"{shown}. Re-extract gtFine_trainvaltest.zip from {URL}.")
        return samples

    def load(self, index: int) -> Sample:
        image_path, label_path, convert = self.samples[index]
        image = read_image(image_path)
        mask = read_mask(label_path)
        if convert:
            mask = label_ids_to_train_ids(mask, self.ignore_index, source=str(label_path))
        return Sample(image=image, mask=mask, source=str(label_path))
