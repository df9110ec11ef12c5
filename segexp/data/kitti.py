"""The KITTI semantic segmentation benchmark (Alhaija et al., IJCV 2018), in the layout that
``data_semantics.zip`` unpacks to; labels follow Cityscapes, so the 19 Cityscapes classes are used."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segexp.data.base import IGNORE_INDEX, Sample, SegmentationDataset, read_image, read_mask, root_hint
from segexp.data.cityscapes import CityscapesDataset, label_ids_to_train_ids
from segexp.errors import ConfigError, DataError

URL = "https://www.cvlibs.net/datasets/kitti/eval_semseg.php?benchmark=semantics2015"
ARCHIVE = "data_semantics.zip"
SPLITS = ("train", "val", "trainval")
TRAIN_SPLITS = ("train", "trainval")
SPLIT_SEED = 0
VAL_FRACTION = 0.2


def split_names(names: Sequence[str], split: str) -> list[str]:
    """The fixed split of the labelled images: names sorted, shuffled with
    ``numpy.random.default_rng(0).permutation``, the last 20% (40 of 200) ``val`` and the rest
    (160) ``train``; ``trainval`` is all of them. Returned sorted."""
    names = sorted(names)
    if split == "trainval":
        return names
    order = np.random.default_rng(SPLIT_SEED).permutation(len(names))
    n_val = min(max(round(len(names) * VAL_FRACTION), 1), len(names) - 1) if len(names) >= 2 else 0
    n_train = len(names) - n_val
    chosen = order[:n_train] if split == "train" else order[n_train:]
    return [names[i] for i in sorted(chosen)]


class KITTIDataset(SegmentationDataset):
    """KITTI semantic segmentation: 200 labelled training images of about 1242x375 pixels (and
    200 unlabelled test images), annotated with the Cityscapes label ids and evaluated on the same
    19 classes (trainIds; every other id ignored).

    ``root`` is the folder holding ``training/`` (and ``testing/``), i.e. where
    ``data_semantics.zip`` (from http://www.cvlibs.net/datasets/kitti/, free registration) was
    unzipped: images are ``training/image_2/<name>.png`` and labels
    ``training/semantic/<name>.png`` (label ids, converted with Cityscapes' id -> trainId table).
    KITTI has no validation split; segexp's is fixed: the 200 names sorted, shuffled with
    ``numpy.random.default_rng(0).permutation``, the first 160 ``train`` and the last 40 ``val``;
    ``trainval`` is all 200. ``train_split`` picks what the trainer's ``train`` reads
    (``train`` or ``trainval``), ``val_split`` what its ``val`` reads (``val``, the default).
    """

    class_names = CityscapesDataset.class_names
    palette = CityscapesDataset.palette

    def __init__(self, split: str = "train", transforms=None, ignore_index: int = IGNORE_INDEX,
                 num_classes: int | None = 19, crop_size: Sequence[int] = (352, 704),
                 base_size: Sequence[int] | None = (375, 1242),
                 root: str | Path = "data/kitti/data_semantics", train_split: str = "train",
                 val_split: str = "val") -> None:
        super().__init__(split=split, transforms=transforms, ignore_index=ignore_index,
                         num_classes=num_classes)
        if train_split not in TRAIN_SPLITS:
            raise ConfigError(f"dataset.train_split={train_split!r} for kitti: use train or "
                              "trainval (the list that split 'train' reads).")
        self.list_name = self.choose_split("kitti", "train, val or trainval", SPLITS, train_split,
                                           val_split)
        self.root = Path(root)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.base_size = tuple(base_size) if base_size is not None else None
        self.samples = [(self.images / name, self.labels / name)
                        for name in split_names(self._find_names(), self.list_name)]
        self.check_num_classes()

    @property
    def images(self) -> Path:
        return self.root / "training" / "image_2"

    @property
    def labels(self) -> Path:
        return self.root / "training" / "semantic"

    def _find_names(self) -> list[str]:
        images, labels = self.images, self.labels
        if not images.is_dir() or not labels.is_dir():
            nested = [p for p in (self.root / "data_semantics",) if (p / "training").is_dir()]
            hint = root_hint(self.root, nested, ("training", "testing"))
            if not hint and self.root.name in ("image_2", "semantic"):
                hint = (f" {self.root} is an image/label folder: did you mean "
                        f"dataset.root={self.root.parent.parent}?")
            raise self.data_not_found(
                "KITTI semantics", f"the sub-folders {images} and {labels} (the layout {ARCHIVE} "
                "unpacks to)",
                f"Download {ARCHIVE} from {URL} (free registration), unzip it into a folder and "
                "set dataset.root=<that folder> or SEGEXP_DATA=<dir> with <dir>/kitti/data_semantics.",
                hint=hint)
        names = sorted(p.name for p in images.iterdir() if p.suffix.lower() == ".png")
        if not names:
            raise DataError(f"no <name>.png images in {images}. Re-extract {ARCHIVE} from {URL}.")
        missing = [name for name in names if not (labels / name).is_file()]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise DataError(f"{len(missing)} image(s) in {images} have no label in {labels}: "
                            f"{shown}. Re-extract {ARCHIVE} from {URL}.")
        return names

    def load(self, index: int) -> Sample:
        image_path, label_path = self.samples[index]
        label_ids = read_mask(label_path)
        if label_ids.size and (int(label_ids.min()) < 0 or int(label_ids.max()) > 255):
            raise DataError(f"KITTI label {label_path} holds values outside 0..255 "
                            f"({int(label_ids.min())}..{int(label_ids.max())}); the semantic/ PNGs "
                            f"hold Cityscapes label ids 0..33. Re-extract {ARCHIVE} from {URL}.")
        mask = label_ids_to_train_ids(label_ids, self.ignore_index, source=str(label_path))
        return Sample(image=read_image(image_path), mask=mask, source=str(label_path))
