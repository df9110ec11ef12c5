"""The ADE20K scene-parsing benchmark (Zhou et al., CVPR 2017), in its ADEChallengeData2016 layout."""

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

URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
SPLIT_FOLDERS = {"train": "training", "val": "validation"}
SPLITS = ("train", "val", "trainval")  # trainval: training + validation

# SceneParsing's objectInfo150 classes (annotation values 1..150) and colours, as MMSegmentation's
# ADE20KDataset lists them (mmseg/datasets/ade.py; its stray trailing space in 'bed ' removed).
CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)
PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)


def reduce_zero_label(mask: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """ADE20K's label shift (MMSegmentation's ``reduce_zero_label``): 0 ("other") becomes
    ``ignore_index``, 1..254 become 0..253 and 255 stays ignored."""
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 255):
        raise DataError(f"ADE20K annotation holds values outside 0..255 ({int(mask.min())}.."
                        f"{int(mask.max())}); expected 0..150. Re-extract {URL}.")
    lut = np.arange(-1, 255, dtype=np.int32)
    lut[0] = lut[255] = ignore_index
    return lut[mask.astype(np.intp)]


class ADE20KDataset(SegmentationDataset):
    """ADE20K SceneParsing (MIT Scene Parsing Benchmark): 20210 training and 2000 validation
    images of varied sizes labelled with 150 classes.

    ``root`` is the ``ADEChallengeData2016`` folder that ``ADEChallengeData2016.zip`` unpacks to
    (http://data.csail.mit.edu/places/ADEchallenge/), holding
    ``images/{training,validation}/<name>.jpg`` and ``annotations/{training,validation}/<name>.png``;
    split ``train`` reads ``training``, ``val`` ``validation``, ``trainval`` both; ``train_split``
    / ``val_split`` pick what the trainer's ``train`` / ``val`` read. Annotations hold 0..150 with
    0 = "other": it is ignored and 1..150 become classes 0..149 (MMSegmentation's
    reduce-zero-label).
    """

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, split: str = "train", transforms=None, ignore_index: int = IGNORE_INDEX,
                 num_classes: int | None = 150, crop_size: Sequence[int] = (512, 512),
                 base_size: Sequence[int] | None = (512, 2048),
                 root: str | Path = "data/ade20k/ADEChallengeData2016", train_split: str = "train",
                 val_split: str = "val") -> None:
        super().__init__(split=split, transforms=transforms, ignore_index=ignore_index,
                         num_classes=num_classes)
        self.list_name = self.choose_split("ade20k", "train, val or trainval", SPLITS,
                                           train_split, val_split)
        self.root = Path(root)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.base_size = tuple(base_size) if base_size is not None else None
        parts = ("train", "val") if self.list_name == "trainval" else (self.list_name,)
        self.samples = [sample for part in parts for sample in self._find_samples(part)]
        self.check_num_classes()

    def _find_samples(self, split: str) -> list[tuple[Path, Path]]:
        folder = SPLIT_FOLDERS[split]
        images, annotations = self.root / "images" / folder, self.root / "annotations" / folder
        if not images.is_dir() or not annotations.is_dir():
            nested = [p for p in (self.root / "ADEChallengeData2016",) if p.is_dir()]
            raise self.data_not_found(
                "ADE20K", f"the sub-folders {images} and {annotations} (ADEChallengeData2016 layout)",
                f"Download {URL}, extract it and set dataset.root=<path>/ADEChallengeData2016 or "
                "SEGEXP_DATA=<dir> with <dir>/ade20k/ADEChallengeData2016.",
                hint=root_hint(self.root, nested, ("images", "annotations")))
        image_paths = sorted(p for p in images.iterdir() if p.suffix == ".jpg")
        if not image_paths:
            raise DataError(f"no <name>.jpg images in {images}. Re-extract {URL}.")
        samples, missing = [], []
        for image in image_paths:
            annotation = annotations / f"{image.stem}.png"
            if annotation.is_file():
                samples.append((image, annotation))
            else:
                missing.append(image.stem)
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise DataError(f"{len(missing)} image(s) in {images} have no {annotations}/<name>.png: "
                            f"{shown}. Re-extract {URL}.")
        return samples

    def load(self, index: int) -> Sample:
        image_path, annotation_path = self.samples[index]
        image = read_image(image_path)
        mask = reduce_zero_label(read_mask(annotation_path), self.ignore_index)
        return Sample(image=image, mask=mask, source=str(annotation_path))
