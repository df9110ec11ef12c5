"""Datumaro's "Common Semantic Segmentation" format, as OpenVINO Training Extensions (OTX) reads
and writes semantic-segmentation datasets."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from segexp.data.base import (
    IGNORE_INDEX,
    IMAGE_EXTENSIONS,
    Sample,
    SegmentationDataset,
    found_in,
    read_image,
    read_mask,
    root_hint,
)
from segexp.data.folder import ColourTable
from segexp.errors import ConfigError, DataError, first_few

log = logging.getLogger(__name__)

DOCS = ("https://openvinotoolkit.github.io/datumaro/latest/docs/data-formats/formats/"
        "common_semantic_segmentation.html")
META_FILE = "dataset_meta.json"
IMAGES_DIR, MASKS_DIR = "images", "masks"
# Datumaro's own image formats include no GIF (it decodes with OpenCV): an export holds none.
SAMPLE_EXTENSIONS = tuple(e for e in IMAGE_EXTENSIONS if e != ".gif")
# Folder names accepted for each split (Datumaro takes any subset name; OTX uses these).
SUBSET_NAMES = {"train": ("train", "training"), "val": ("val", "validation", "valid"),
                "test": ("test", "testing")}
BACKGROUND = "background"

_LAYOUT = (f"<root>/<subset>/{META_FILE} (or one <root>/{META_FILE}), <root>/<subset>/{IMAGES_DIR}/ "
           f"and <root>/<subset>/{MASKS_DIR}/ with subsets train, val (or validation) and test")


def parse_meta(path: Path) -> tuple[tuple[str, ...], list | None, int]:
    """Read a ``dataset_meta.json``: class names by index, colours by index (or None) and the
    background index.

    ``label_map`` maps index -> name (Datumaro's older ``labels`` list is read too);
    ``segmentation_colors`` lists ``[r, g, b]`` by index; ``background_label`` (Datumaro's key;
    ``background_label_id`` is accepted too) names the background index, 0 by default. An index
    the label map skips is allowed only for the background, which is then called "background"
    (OTX adds a background class the same way when a label map has none).
    """
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path}: {error}. It must be a JSON object with a "
                        f"\"label_map\" (see {DOCS}).") from error
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object with a \"label_map\", got "
                        f"{type(meta).__name__} (see {DOCS}).")
    names: dict[int, str] = {}
    if isinstance(meta.get("label_map"), dict) and meta["label_map"]:
        for key, name in meta["label_map"].items():
            try:
                index = int(key)
            except (TypeError, ValueError) as error:
                raise DataError(f"{path}: label_map key {key!r} is not a class index; write it "
                                f"as {{\"0\": \"background\", \"1\": \"car\", ...}}.") from error
            if index < 0 or index > 254:
                raise DataError(f"{path}: label_map index {index} is outside 0..254 (255 is the "
                                "ignore index).")
            names[index] = str(name)
    elif isinstance(meta.get("labels"), list) and meta["labels"]:
        names = {i: str(name) for i, name in enumerate(meta["labels"])}
    else:
        raise DataError(f"{path} has no \"label_map\" (index -> class name), e.g. "
                        f"{{\"label_map\": {{\"0\": \"background\", \"1\": \"car\"}}}} (see {DOCS}).")
    background = meta.get("background_label", meta.get("background_label_id", 0))
    try:
        background = int(background)
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: background_label {background!r} is not a class index.") from error
    count = max(max(names) + 1, background + 1)
    gaps = [i for i in range(count) if i not in names and i != background]
    if gaps:
        raise DataError(f"{path}: label_map skips the class index(es) {', '.join(map(str, gaps))}; "
                        "class indices must run 0..N-1 (only the background index may be left "
                        "out).")
    class_names = tuple(names.get(i, BACKGROUND) for i in range(count))
    colours = meta.get("segmentation_colors")
    if colours is not None:
        if not isinstance(colours, list):
            raise DataError(f"{path}: segmentation_colors must be a list of [r, g, b] per class "
                            "index.")
        for colour in colours:
            if colour is not None and (not isinstance(colour, list) or len(colour) != 3
                                       or not all(isinstance(c, int) and 0 <= c <= 255
                                                  for c in colour)):
                raise DataError(f"{path}: segmentation_colors entry {colour!r} is not an "
                                "[r, g, b] colour with values 0..255.")
        if not any(colour is not None for colour in colours):
            colours = None
    return class_names, colours, background


class DatumaroDataset(SegmentationDataset):
    """A dataset in Datumaro's Common Semantic Segmentation layout, with subset folders as OTX
    uses them::

        <root>/train/dataset_meta.json   (or a single <root>/dataset_meta.json)
        <root>/train/images/<id>.jpg|png
        <root>/train/masks/<id>.png
        <root>/val/...                   (or validation/), <root>/test/...

    ``dataset_meta.json`` holds ``label_map`` (class index -> name), optionally
    ``segmentation_colors`` (``[r, g, b]`` per class index) and ``background_label`` (the
    background index, default 0; ``background_label_id`` is read too). A label map without the
    background index gets a class "background" there, as OTX adds one. Masks are class-index
    PNGs, or colour PNGs mapped through ``segmentation_colors`` (palette PNGs too, when colours
    are given, as Datumaro does); a colour that is not listed is an error naming the file, the
    colour and the nearest listed one. 255 is ignored. Images and masks pair by file name
    without extension (after ``image_prefix`` / ``mask_prefix``); as in Datumaro, an image
    without a mask is left out (with a warning) and a mask without an image is an error. Every
    subset's meta file must give the same classes.
    """

    def __init__(self, split: str = "train", transforms=None, ignore_index: int = IGNORE_INDEX,
                 num_classes: int | None = None, crop_size: Sequence[int] = (512, 512),
                 base_size: Sequence[int] | None = None, root: str | Path = "data/datumaro",
                 image_prefix: str = "", mask_prefix: str = "") -> None:
        super().__init__(split=split, transforms=transforms, ignore_index=ignore_index,
                         num_classes=num_classes)
        self.root = Path(root)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.base_size = tuple(base_size) if base_size is not None else None
        self.image_prefix, self.mask_prefix = str(image_prefix or ""), str(mask_prefix or "")
        self.subset_dir = self._subset_dir(split)
        self.meta_path = self._meta_path(self.subset_dir)
        self.class_names, colours, self.background_index = parse_meta(self.meta_path)
        self._check_same_classes()
        self._colour_table = None
        if colours is not None:
            defined = [(i, c) for i, c in enumerate(colours[: len(self.class_names)])
                       if c is not None]
            try:
                self._colour_table = ColourTable([c for _, c in defined],
                                                 what=f"the segmentation_colors of {self.meta_path}",
                                                 names=self.class_names,
                                                 values=[i for i, _ in defined])
            except ConfigError as error:
                raise DataError(str(error)) from error
            if len(defined) == len(self.class_names):
                self.palette = [tuple(c) for _, c in defined]
        self.check_num_classes()
        self.samples = self._find_samples()

    # -- layout --------------------------------------------------------------------------------
    def _subset_dir(self, split: str) -> Path:
        names = SUBSET_NAMES.get(split, (split,))
        for name in names:
            if (self.root / name / MASKS_DIR).is_dir() or (self.root / name / IMAGES_DIR).is_dir():
                return self.root / name
        subsets = sorted(p.name for p in self.root.iterdir()
                         if p.is_dir() and (p / MASKS_DIR).is_dir()) if self.root.is_dir() else []
        expected = " or ".join(str(self.root / name) for name in names)
        if subsets:
            raise DataError(
                f"Datumaro subset for split {split!r} not found: expected {expected} (with "
                f"{IMAGES_DIR}/ and {MASKS_DIR}/); {self.root} has the subsets "
                f"{', '.join(subsets)}. Export the {split} subset too, or rename its folder.")
        if (self.root / MASKS_DIR).is_dir():
            hint = (f" {self.root} holds {IMAGES_DIR}/ and {MASKS_DIR}/ directly: a single-subset "
                    f"dataset. Move them into {self.root / 'train'}/ and add a val/ subset, or "
                    f"use dataset=folder (class-index masks) on it.")
        elif not self.root.is_dir():
            hint = ""
        else:
            nested = [p for p in sorted(self.root.iterdir())
                      if p.is_dir() and any((p / n / MASKS_DIR).is_dir() for n in names)]
            hint = root_hint(self.root, nested, {n for ns in SUBSET_NAMES.values() for n in ns},
                             holds=" with subsets", itself="a subset folder")
        raise self.data_not_found(
            "Datumaro semantic-segmentation", f"the sub-folders {expected} (each with "
            f"{IMAGES_DIR}/ and {MASKS_DIR}/) and a {META_FILE}",
            f"The layout is {_LAYOUT} (Datumaro's common_semantic_segmentation format, {DOCS}); "
            "export the dataset in that format and set dataset.root=<its folder> or "
            "SEGEXP_DATA=<dir> with <dir>/datumaro.", hint=hint, limit=12)

    def _meta_path(self, subset_dir: Path) -> Path:
        for path in (subset_dir / META_FILE, self.root / META_FILE):
            if path.is_file():
                return path
        raise DataError(
            f"no {META_FILE} for the {self.split!r} subset: expected {subset_dir / META_FILE} or "
            f"{self.root / META_FILE}, with the classes as "
            f"{{\"label_map\": {{\"0\": \"background\", \"1\": \"car\"}}}} (see {DOCS}).")

    def _check_same_classes(self) -> None:
        """Every meta file (the root's and the subsets' own) must give the same classes, or class
        indices would differ between training and validation."""
        ours = tuple(name.lower() for name in self.class_names)
        others = [self.root / META_FILE] + [p / META_FILE for p in sorted(self.root.iterdir())]
        for other in others:
            if other == self.meta_path or not other.is_file():
                continue
            names = parse_meta(other)[0]
            if tuple(name.lower() for name in names) != ours:
                raise DataError(
                    f"{other} gives the classes {list(names)} but {self.meta_path} gives "
                    f"{list(self.class_names)}: every subset must use the same class indices. "
                    "Make the label maps agree.")

    def _files(self, folder: Path, prefix: str) -> dict[str, Path]:
        files: dict[str, Path] = {}
        if not folder.is_dir():
            return files
        for path in sorted(folder.rglob("*")):
            if (not path.is_file() or path.name.startswith(".")
                    or path.suffix.lower() not in SAMPLE_EXTENSIONS
                    or not path.name.startswith(prefix)):
                continue
            relative = path.relative_to(folder).with_suffix("")
            key = (relative.parent / relative.name[len(prefix):]).as_posix()
            if key in files:
                raise DataError(f"two files share the id {key!r} in {folder}: "
                                f"{files[key].name} and {path.name}; rename or remove one.")
            files[key] = path
        return files

    def _find_samples(self) -> list[tuple[Path, Path]]:
        images_dir, masks_dir = self.subset_dir / IMAGES_DIR, self.subset_dir / MASKS_DIR
        if not masks_dir.is_dir():
            raise DataError(f"Datumaro subset {self.subset_dir} has no {MASKS_DIR}/ folder (found "
                            f"{found_in(self.subset_dir, 12)}); expected {masks_dir} with one PNG mask "
                            f"per image in {images_dir}.")
        images = self._files(images_dir, self.image_prefix)
        masks = self._files(masks_dir, self.mask_prefix)
        if not masks:
            raise DataError(f"no masks in {masks_dir}" + (
                f" starting with dataset.mask_prefix={self.mask_prefix!r}" if self.mask_prefix
                else "") + f"; found {found_in(masks_dir, 12)}.")
        no_image = sorted(set(masks) - set(images))
        if no_image:
            shown = first_few(no_image, 10)
            raise DataError(f"{len(no_image)} mask(s) in {masks_dir} have no image in {images_dir}"
                            f": {shown}. Images and masks pair by file name without extension"
                            + (" (after dataset.image_prefix / mask_prefix)"
                               if self.image_prefix or self.mask_prefix else "")
                            + "; add the images or remove the masks.")
        unlabelled = sorted(set(images) - set(masks))
        if unlabelled:
            log.warning("%d image(s) in %s have no mask in %s and are left out (as Datumaro does): "
                        "%s", len(unlabelled), images_dir, masks_dir, ", ".join(unlabelled[:5]))
        return [(images[key], masks[key]) for key in sorted(masks)]

    # -- samples -------------------------------------------------------------------------------
    def read_mask(self, path: Path) -> np.ndarray:
        """Class indices from a mask PNG: index masks as they are, colour masks (and palette
        masks, when segmentation_colors are given) through the colours."""
        try:
            with Image.open(path) as im:
                mode = im.mode
                colour = mode in ("RGB", "RGBA") or (mode == "P" and self._colour_table is not None)
                rgb = np.array(im.convert("RGB")) if colour else None
        except OSError as error:
            raise DataError(f"cannot read mask file {path}: {error}. Replace it with a PNG "
                            "mask.") from error
        if rgb is None:
            return read_mask(path)
        if self._colour_table is None:
            raise DataError(
                f"mask {path} is a colour ({mode}) image but {self.meta_path} has no "
                "segmentation_colors to map its colours to classes. Add \"segmentation_colors\": "
                "[[r, g, b], ...] (one per class index) to it, or save the masks as single-channel "
                "class-index PNGs.")
        return self._colour_table(rgb, str(path))

    def load(self, index: int) -> Sample:
        image_path, mask_path = self.samples[index]
        image = read_image(image_path)
        mask = self.read_mask(mask_path)
        return Sample(image=image, mask=mask, source=f"{mask_path} (image {image_path.name})")
