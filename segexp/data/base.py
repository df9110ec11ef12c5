"""The dataset contract every segexp dataset follows.

A dataset yields ``(image, mask)`` pairs: ``image`` a float tensor ``3xHxW`` (after the configured
transforms, usually normalised), ``mask`` an int64 tensor ``HxW`` of class indices with
``ignore_index`` (255) for pixels that count nowhere. It also carries ``class_names`` and a colour
``palette`` for pictures. A new dataset subclasses :class:`SegmentationDataset` and implements
``__len__`` and :meth:`load`; checks, transforms and reproducible augmentation live here once.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from segexp.errors import DataError

IGNORE_INDEX = 255


@dataclass
class Sample:
    """One raw sample as stored on disk: RGB ``uint8`` image ``HxWx3`` and integer mask ``HxW``."""

    image: np.ndarray
    mask: np.ndarray
    source: str  # a file path or name, used in error messages


def default_palette(num_classes: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Distinct, deterministic colours for datasets that do not define their own."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 256, size=(num_classes, 3))
    return [tuple(int(c) for c in colour) for colour in colours]


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB ``uint8``; a clear :class:`DataError` if it cannot be read."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"cannot read image file {path}: it is missing, empty or not an image. "
                        "Remove it from the dataset or replace it with a valid file.")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a single-channel class-index mask (palette PNGs give their indices, not colours)."""
    path = Path(path)
    mask = None
    if path.suffix.lower() == ".png":
        # Pillow keeps the indices of palette ("P" mode) PNGs; OpenCV would expand them to colours.
        from PIL import Image

        try:
            with Image.open(path) as im:
                if im.mode in ("P", "L", "I", "I;16"):
                    mask = np.array(im)
        except OSError:
            mask = None
    if mask is None:
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DataError(f"cannot read mask file {path}: it is missing, empty or not an image. "
                        "Remove the sample or replace the mask with a class-index PNG.")
    if mask.ndim == 3:
        raise DataError(f"mask file {path} has {mask.shape[2]} channels; segexp expects a "
                        "single-channel image of class indices. For colour-coded masks give the "
                        "dataset a palette so colours can be mapped to classes.")
    return mask


def seed_for(base_seed: int, index: int) -> int:
    """A stable 31-bit seed from two integers (hash() is salted per process, so not usable)."""
    return zlib.crc32(f"{base_seed}:{index}".encode()) & 0x7FFFFFFF


class SegmentationDataset(Dataset):
    """Base class: subclasses set ``class_names`` (and optionally ``palette``) and implement
    ``__len__`` and :meth:`load`.

    ``__getitem__`` accepts an int, or ``(index, seed)`` from
    :class:`segexp.data.sampler.ResumableSampler`; with a seed the random transforms draw from an
    RNG seeded by it, so augmentation depends only on (run seed, epoch, index): not on worker
    count, and not on where a resumed run restarted.
    """

    class_names: Sequence[str] = ()
    palette: Sequence[tuple[int, int, int]] | None = None

    def __init__(self, split: str = "train", transforms: Callable | None = None,
                 ignore_index: int = IGNORE_INDEX, num_classes: int | None = None) -> None:
        self.split = split
        self.transforms = transforms
        self.ignore_index = ignore_index
        self._declared_num_classes = num_classes

    # -- to implement -------------------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Sample:
        """Read sample ``index`` from disk (or generate it), before any transform."""
        raise NotImplementedError

    def files(self) -> list[Path] | None:
        """Every file this split's samples are read from, so that anything derived from the data
        (the mask scan of :mod:`segexp.data.scan`) notices when one changes; ``[]`` for data that
        is generated, None when unknown (then nothing derived is cached). By default the paths in
        ``self.samples`` (a list of path tuples, as most datasets keep); override otherwise."""
        samples = getattr(self, "samples", None)
        if samples is None:
            return None
        return [item for entry in samples
                for item in (entry if isinstance(entry, (tuple, list)) else (entry,))
                if isinstance(item, Path)]

    # -- shared behaviour ---------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def colours(self) -> list[tuple[int, int, int]]:
        return list(self.palette) if self.palette else default_palette(self.num_classes)

    def check_num_classes(self) -> None:
        """The configured ``num_classes`` must agree with the class names the data defines."""
        declared = self._declared_num_classes
        if declared is not None and declared != self.num_classes:
            raise DataError(
                f"dataset.num_classes={declared} but the {type(self).__name__} data defines "
                f"{self.num_classes} classes ({', '.join(self.class_names)}). Set "
                f"dataset.num_classes={self.num_classes} or give matching class names.")

    def check_sample(self, sample: Sample) -> None:
        """Size agreement and label range: errors that name the file and say what to do."""
        image, mask = sample.image, sample.mask
        if image.shape[:2] != mask.shape[:2]:
            raise DataError(f"image and mask sizes differ for {sample.source}: image "
                            f"{image.shape[1]}x{image.shape[0]}, mask {mask.shape[1]}x{mask.shape[0]} "
                            "(width x height). Each mask must match its image pixel for pixel.")
        if mask.size and (int(mask.max()) >= self.num_classes or int(mask.min()) < 0):
            values = np.unique(mask)
            bad = [int(v) for v in values
                   if (v >= self.num_classes or v < 0) and v != self.ignore_index]
            if bad:
                shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
                raise DataError(
                    f"mask {sample.source} holds values {shown}, but the dataset has "
                    f"{self.num_classes} classes (valid: 0..{self.num_classes - 1}, and "
                    f"{self.ignore_index} = ignore). Fix dataset.num_classes / the class names, or "
                    "remap the mask values (dataset.mask_map for folder datasets).")

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        sample = self.load(index)
        self.check_sample(sample)
        image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(sample.mask).astype(np.uint8)))
        if self.transforms is not None:
            if seed is None:
                image, mask = self.transforms(image, mask)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    image, mask = self.transforms(image, mask)
        return to_model_input(image, mask)


# -- transform helpers for the YAML pipelines (conf/transforms) ----------------------------------
def to_model_input(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain float32 image and int64 mask, whatever the transforms left."""
    image = image.as_subclass(torch.Tensor)
    if image.dtype == torch.uint8:
        image = image.float().div_(255.0)
    return image.float(), mask.as_subclass(torch.Tensor).long()


def pad_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
                ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples of different sizes by padding to the largest (image 0, mask ignore), so
    whole-image validation on datasets with varied image sizes can still batch."""
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    images = torch.zeros(len(batch), batch[0][0].shape[0], height, width, dtype=batch[0][0].dtype)
    masks = torch.full((len(batch), height, width), ignore_index, dtype=torch.long)
    for i, (image, mask) in enumerate(batch):
        images[i, :, : image.shape[-2], : image.shape[-1]] = image
        masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
    return images, masks
