"""The Stanford Background dataset (Gould et al., ICCV 2009), in its original iccv09Data layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segexp.data.base import IGNORE_INDEX, Sample, SegmentationDataset, read_image, root_hint
from segexp.errors import ConfigError, DataError

URL = "http://dags.stanford.edu/data/iccv09Data.tar.gz"
SPLIT_SEED = 0
VAL_FRACTION = 0.2
# Images that iccv09Data holds twice, byte for byte, under two ids (their labels differ in 7-13 %
# of the pixels). The fixed split puts 6000257 in val and its copy 6000348 in train: val leaves
# it out, so that no validation image is one the model trained on (segexp.data.overlap).
DUPLICATES = (("6000068", "6000318"), ("6000117", "6000324"), ("6000257", "6000348"))


def read_regions(path: str | Path, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Parse a ``<id>.regions.txt`` label file: a whitespace-separated integer matrix, one line per
    image row; negative values (unknown) become ``ignore_index``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise DataError(f"cannot read label file {path}: {error}. Re-extract {URL}.") from error
    rows = len([line for line in text.splitlines() if line.strip()])
    try:
        # Each token parsed as an int: a non-integer one is an error (np.fromstring would only warn
        # and truncate, and catching that warning is not thread-safe: the mask scan reads in threads).
        values = np.array(text.split(), dtype=np.int32)
    except ValueError as error:
        raise DataError(f"label file {path} holds something other than whitespace-separated "
                        f"integers ({error}). Re-extract {URL}.") from error
    if rows == 0 or values.size % rows:
        raise DataError(f"label file {path} is not a rectangular integer matrix ({values.size} "
                        f"values on {rows} lines). Re-extract {URL}.")
    labels = values.reshape(rows, -1)
    return np.where(labels < 0, ignore_index, labels)


class StanfordBackgroundDataset(SegmentationDataset):
    """715 outdoor scenes of about 320x240 pixels labelled with 8 classes: sky, tree, road, grass,
    water, building, mountain, foreground object (negative labels = unknown -> ignore).

    ``root`` is the ``iccv09Data`` folder holding ``images/<id>.jpg`` and
    ``labels/<id>.regions.txt`` (download and extract ``iccv09Data.tar.gz`` from
    http://dags.stanford.edu/data/). The dataset has no official split; segexp's is fixed: the ids
    sorted, shuffled with ``numpy.random.default_rng(0).permutation``, the first 80% (572 images)
    ``train`` and the remaining 20% ``val``, less the one image whose identical copy is in
    ``train`` (:data:`DUPLICATES`): 142.
    """

    class_names = ("sky", "tree", "road", "grass", "water", "building", "mountain", "foreground")
    palette = ((70, 130, 180), (34, 139, 34), (128, 64, 128), (152, 251, 152),
               (0, 60, 230), (140, 140, 140), (139, 90, 43), (220, 20, 60))

    def __init__(self, split: str = "train", transforms=None, ignore_index: int = IGNORE_INDEX,
                 num_classes: int | None = 8, crop_size: Sequence[int] = (224, 224),
                 base_size: Sequence[int] | None = (240, 320),
                 root: str | Path = "data/stanford_background/iccv09Data") -> None:
        super().__init__(split=split, transforms=transforms, ignore_index=ignore_index,
                         num_classes=num_classes)
        if split not in ("train", "val"):
            raise ConfigError(f"unknown split {split!r} for stanford_background: use train or val.")
        self.root = Path(root)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.base_size = tuple(base_size) if base_size is not None else None
        self.samples = [(self.root / "images" / f"{i}.jpg", self.root / "labels" / f"{i}.regions.txt")
                        for i in self.split_ids(self._find_ids(), split)]
        self.check_num_classes()

    @staticmethod
    def split_ids(ids: Sequence[str], split: str) -> list[str]:
        """The fixed split: sorted ids, shuffled with seed 0, first 80% train, the rest val less
        the images whose copy (:data:`DUPLICATES`) is in train."""
        ids = sorted(ids)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(ids))
        n_val = min(max(round(len(ids) * VAL_FRACTION), 1), len(ids) - 1) if len(ids) >= 2 else 0
        n_train = len(ids) - n_val
        train = [ids[i] for i in sorted(order[:n_train])]
        if split == "train":
            return train
        copies = {a: b for pair in DUPLICATES for a, b in (pair, pair[::-1])}
        in_train = set(train)
        return [ids[i] for i in sorted(order[n_train:]) if copies.get(ids[i]) not in in_train]

    def _find_ids(self) -> list[str]:
        images, labels = self.root / "images", self.root / "labels"
        if not images.is_dir() or not labels.is_dir():
            nested = [p for p in (self.root / "iccv09Data",) if p.is_dir()]
            raise self.data_not_found(
                "Stanford Background", f"the sub-folders {images} and {labels} (iccv09Data layout)",
                f"Download {URL}, extract it and set dataset.root=<path>/iccv09Data or "
                "SEGEXP_DATA=<dir> with <dir>/stanford_background/iccv09Data.",
                hint=root_hint(self.root, nested))
        ids = sorted(p.name[:-4] for p in images.iterdir() if p.name.endswith(".jpg"))
        if not ids:
            raise DataError(f"no <id>.jpg images in {images}. Re-extract {URL}.")
        missing = [i for i in ids if not (labels / f"{i}.regions.txt").is_file()]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise DataError(f"{len(missing)} image(s) in {images} have no labels/<id>.regions.txt: "
                            f"{shown}. Re-extract {URL}.")
        return ids

    def load(self, index: int) -> Sample:
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        mask = read_regions(label_path, self.ignore_index)
        return Sample(image=image, mask=mask, source=str(label_path))
