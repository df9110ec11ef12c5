"""PASCAL VOC 2012 segmentation (Everingham et al., IJCV 2010) in its VOCdevkit layout, with the
SBD-augmented ``train_aug`` split (Hariharan et al., ICCV 2011) that ``scripts/prepare/voc.py``
builds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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

URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_URL = ("http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
           "benchmark.tgz")
PREPARE = "python scripts/prepare/voc.py --src <download folder>"
SPLITS = ("train", "val", "trainval", "train_aug")
TRAIN_SPLITS = ("train", "trainval", "train_aug")
AUG_SPLIT = "train_aug"
AUG_LABELS = "SegmentationClassAug"

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """The VOC devkit's ``labelcolormap``: the bits of the class index spread over R, G, B
    (class 1 aeroplane = (128, 0, 0), 15 person = (192, 128, 128), 255 = (224, 224, 192))."""
    colours = []
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return colours


PALETTE = tuple(voc_colormap(len(CLASS_NAMES)))


def read_split_list(path: Path) -> list[str]:
    """Image ids, one per line (blank lines skipped)."""
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


class VOCDataset(SegmentationDataset):
    """PASCAL VOC 2012 segmentation: 1464 train, 1449 val (2913 trainval) images of up to 500x500
    labelled with 20 object classes plus background; 255 marks object boundaries and difficult
    regions (ignored).

    ``root`` is the ``VOCdevkit/VOC2012`` folder that ``VOCtrainval_11-May-2012.tar`` unpacks to
    (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/), holding ``JPEGImages/<id>.jpg``,
    ``SegmentationClass/<id>.png`` (palette PNGs: their pixel values are the class indices) and
    ``ImageSets/Segmentation/{train,val,trainval}.txt``.

    Split ``train_aug`` is the usual 10,582-image training set: (SBD train + SBD val + VOC train)
    minus VOC val, listed in ``ImageSets/Segmentation/train_aug.txt`` with labels in
    ``SegmentationClassAug/<id>.png``; ``scripts/prepare/voc.py`` writes both from SBD's
    ``benchmark.tgz``. ``train_split`` picks the list that ``split="train"`` reads (the trainer
    asks for ``train`` and ``val``): ``train`` (default), ``trainval`` or ``train_aug``;
    ``val_split`` the list that ``split="val"`` reads (``val``, the default).
    """

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, split: str = "train", transforms=None, ignore_index: int = IGNORE_INDEX,
                 num_classes: int | None = 21, crop_size: Sequence[int] = (512, 512),
                 base_size: Sequence[int] | None = (512, 2048),
                 root: str | Path = "data/voc/VOCdevkit/VOC2012", train_split: str = "train",
                 val_split: str = "val") -> None:
        super().__init__(split=split, transforms=transforms, ignore_index=ignore_index,
                         num_classes=num_classes)
        if train_split not in TRAIN_SPLITS:
            raise ConfigError(f"dataset.train_split={train_split!r} for voc: use train, trainval or "
                              "train_aug (the list that split 'train' reads).")
        self.list_name = self.choose_split("voc", "train, val, trainval or train_aug", SPLITS,
                                           train_split, val_split)
        self.root = Path(root)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.base_size = tuple(base_size) if base_size is not None else None
        self.samples = self._find_samples()
        self.check_num_classes()

    def _find_samples(self) -> list[tuple[Path, Path]]:
        aug = self.list_name == AUG_SPLIT
        images = self.root / "JPEGImages"
        labels = self.root / (AUG_LABELS if aug else "SegmentationClass")
        lists = self.root / "ImageSets" / "Segmentation"
        if not images.is_dir() or not (self.root / "SegmentationClass").is_dir() or not lists.is_dir():
            nested = [c for c in (self.root / "VOCdevkit" / "VOC2012", self.root / "VOC2012")
                      if (c / "JPEGImages").is_dir()]
            hint = root_hint(self.root, nested,
                             ("JPEGImages", "SegmentationClass", AUG_LABELS, "ImageSets"))
            if not hint and self.root.name == "Segmentation" and self.root.parent.name == "ImageSets":
                hint = (f" {self.root} is the split-list folder: did you mean "
                        f"dataset.root={self.root.parent.parent}?")
            raise self.data_not_found(
                "PASCAL VOC 2012", f"the sub-folders {images}, {self.root / 'SegmentationClass'} "
                f"and {lists} (VOCdevkit/VOC2012 layout)",
                f"Download {URL} (or run {PREPARE}), extract it and set "
                "dataset.root=<path>/VOCdevkit/VOC2012 or SEGEXP_DATA=<dir> with "
                "<dir>/voc/VOCdevkit/VOC2012.", hint=hint)
        list_file = lists / f"{self.list_name}.txt"
        if aug and (not labels.is_dir() or not list_file.is_file()):
            raise DataError(
                f"VOC split {AUG_SPLIT!r} needs {labels} and {list_file}, which VOC2012 itself does "
                f"not ship: they are built from SBD ({SBD_URL}). Run {PREPARE} (it downloads "
                "VOC2012 and SBD when they are not there), or train on dataset.train_split=train.")
        if not list_file.is_file():
            raise DataError(f"VOC split list {list_file} not found; {lists} holds {found_in(lists)}. "
                            f"Re-extract {URL}.")
        ids = read_split_list(list_file)
        if not ids:
            raise DataError(f"VOC split list {list_file} is empty. Re-extract {URL}"
                            + (f" or re-run {PREPARE}." if aug else "."))
        samples, missing = [], []
        for image_id in ids:
            image, label = images / f"{image_id}.jpg", labels / f"{image_id}.png"
            if image.is_file() and label.is_file():
                samples.append((image, label))
            else:
                missing.append(image_id + ("" if image.is_file() else " (image)")
                               + ("" if label.is_file() else " (label)"))
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise DataError(
                f"{len(missing)} id(s) of {list_file} have no {images}/<id>.jpg or no "
                f"{labels}/<id>.png: {shown}. "
                + (f"Re-run {PREPARE}." if aug else f"Re-extract {URL}."))
        return samples

    def load(self, index: int) -> Sample:
        image_path, label_path = self.samples[index]
        return Sample(image=read_image(image_path), mask=read_mask(label_path), source=str(label_path))
