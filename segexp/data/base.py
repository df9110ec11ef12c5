"""The dataset contract every segexp dataset follows.

A dataset yields ``(image, mask)`` pairs: ``image`` a float tensor ``3xHxW`` (after the configured
transforms, usually normalised), ``mask`` an int64 tensor ``HxW`` of class indices with
``ignore_index`` (255) for pixels that count nowhere. It also carries ``class_names`` and a colour
``palette`` for pictures. A new dataset subclasses :class:`SegmentationDataset`, fills ``samples``
and implements :meth:`load`; length, file list, checks, transforms, reproducible augmentation and
the "expected ..., found ..." message for a wrong ``dataset.root`` live here once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from segexp.errors import ConfigError, DataError

IGNORE_INDEX = 255

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One raw sample as stored on disk: RGB ``uint8`` image ``HxWx3`` and integer mask ``HxW``."""

    image: np.ndarray
    mask: np.ndarray
    source: str  # a file path or name, used in error messages
    image_path: Path | None = None  # the image file, when there is one: its EXIF tag explains
    # some size mismatches


def default_palette(num_classes: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Distinct, deterministic colours for datasets that do not define their own."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 256, size=(num_classes, 3))
    return [tuple(int(c) for c in colour) for colour in colours]


# Image files segexp reads (OpenCV; GIF through Pillow): what folder datasets and
# scripts/predict.py accept. A dataset with a published layout takes the subset its files use.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
# Mask files read with Pillow: it keeps the indices of palette images (OpenCV expands them to
# colours), reads GIF (which OpenCV builds may lack) and never applies EXIF orientation.
PILLOW_MASK_EXTENSIONS = (".png", ".gif", ".bmp", ".tif", ".tiff")
JPEG_EXTENSIONS = (".jpg", ".jpeg")
EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATIONS = {2: "mirrored", 3: "rotated 180 degrees", 4: "flipped upside down",
                 5: "mirrored and rotated 90 degrees", 6: "rotated 90 degrees clockwise",
                 7: "mirrored and rotated 90 degrees", 8: "rotated 90 degrees counter-clockwise"}
# A JPEG mask is two-level (binary) when at least this share of its pixels lies within
# JPEG_LEVEL_MARGIN of 0 or of 255; the rest are compression artefacts at edges.
JPEG_TWO_LEVEL_SHARE = 0.95
JPEG_LEVEL_MARGIN = 63
# A JPEG mask whose values stay at or below this is a 0/1 mask (compression moves values by a few).
JPEG_ZERO_ONE_MAX = 15
# Loader workers are forked after the dataset has been built, so a warning given while the
# dataset was built (which reads masks) is not repeated by every worker.
_warned_lossy_masks = False


def exif_orientation(path: str | Path) -> int | None:
    """The EXIF orientation tag (1..8) of an image file, or None when it has none (or cannot be
    read). Only the header is read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            value = im.getexif().get(EXIF_ORIENTATION_TAG)
    except (OSError, ValueError, SyntaxError):
        return None
    return int(value) if isinstance(value, int) else None


def _to_uint8(image: np.ndarray, path: str | Path) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:  # the full 16-bit range onto 0..255
        return np.round(image.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    raise DataError(f"image file {path} holds {image.dtype} pixels; segexp reads 8-bit and 16-bit "
                    "images. Convert it to an 8-bit (or 16-bit) PNG or TIFF.")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB ``uint8`` ``HxWx3``; a clear :class:`DataError` if it cannot be
    read. Grayscale becomes three equal channels, an alpha channel is dropped, 16-bit pixels are
    scaled to 8 bits. The EXIF orientation tag is ignored: pixels come as stored, because masks
    are drawn on the stored pixels (rotating only the image would misalign the pair)."""
    path = Path(path)
    image = None
    if path.suffix.lower() in (".jpg", ".jpeg"):
        check_complete_jpeg(path)
    if path.suffix.lower() != ".gif":
        image = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
                           | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:  # GIF, or a format this OpenCV build does not decode
        image = _read_with_pillow(path, "RGB")
        if image is None:
            raise DataError(f"cannot read image file {path}: it is missing, empty or not an "
                            "image. Remove it or replace it with a valid file.")
        return image
    image = _to_uint8(image, path)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def check_complete_jpeg(path: Path) -> None:
    """A truncated JPEG decodes "successfully": libjpeg warns (unnamed) and fills the missing rows
    with grey, which would then be trained on or predicted as if real. A complete file has its
    end-of-image marker (FF D9) after its last start-of-scan marker (FF DA); in the compressed
    data a 0xFF byte is always followed by 0x00 or a restart marker, so FF D9 appears nowhere else
    past the scan (a thumbnail's own markers come before it)."""
    try:
        data = path.read_bytes()
    except OSError:
        return  # missing / unreadable: the decoder's own error names it
    if data[:2] != b"\xff\xd8":
        return  # not a JPEG after all: let the decoder decide
    scan = data.rfind(b"\xff\xda")
    if scan >= 0 and data.rfind(b"\xff\xd9") < scan:
        raise DataError(
            f"image file {path} is truncated: its JPEG data ends before the end-of-image marker "
            f"({len(data)} bytes), so part of it would be decoded as grey. Re-copy or re-download "
            "it, or remove it from the dataset.")


def _read_with_pillow(path: Path, mode: str) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert(mode))
    except (OSError, ValueError, SyntaxError):
        return None


def read_mask(path: str | Path) -> np.ndarray:
    """Read a single-channel class-index mask as stored (no EXIF rotation, like the images).

    * PNG / GIF / BMP / TIFF through Pillow: palette images give their indices, not colours,
      except a GIF whose colours are all greys, which gives the grey levels (GIF has no grey mode,
      so binary 0/255 masks are stored with a grey palette); 16-bit masks keep values above 255.
    * JPEG (lossy): a two-level mask (values near 0 and near 255, or near 0 and 1) is
      thresholded back to 0/255 (0/1), with one warning naming the first such file; a JPEG mask
      with more levels is refused (compression has changed its class indices at every edge).
    * A colour image whose channels are all equal is read as one channel; other colour images are
      refused (colour-coded masks need the dataset's palette).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    mask = None
    if suffix in PILLOW_MASK_EXTENSIONS:
        mask = _read_mask_with_pillow(path)
    if mask is None:
        flags = (cv2.IMREAD_ANYCOLOR | cv2.IMREAD_IGNORE_ORIENTATION if suffix in JPEG_EXTENSIONS
                 else cv2.IMREAD_UNCHANGED)  # IMREAD_UNCHANGED ignores EXIF orientation too
        mask = cv2.imread(str(path), flags)
    if mask is None:
        raise DataError(f"cannot read mask file {path}: it is missing, empty or not an image. "
                        "Remove the sample or replace the mask with a class-index PNG.")
    mask = _single_channel(mask, path)
    if suffix in JPEG_EXTENSIONS:
        mask = _repair_jpeg_mask(mask, path)
    elif mask.dtype.kind == "f":
        if not np.array_equal(mask, np.round(mask)):
            raise DataError(f"mask file {path} holds fractional values (dtype {mask.dtype}); "
                            "class-index masks hold whole numbers. Save it as an integer image.")
        mask = mask.astype(np.int32)
    return mask


def _read_mask_with_pillow(path: Path) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode == "P" and path.suffix.lower() == ".gif" and _grey_palette(im):
                return np.array(im.convert("L"))
            if im.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "F"):
                return np.array(im)
            if im.mode == "1":  # bilevel: 0/255, as OpenCV reads it
                return np.array(im.convert("L"))
    except (OSError, ValueError, SyntaxError):
        return None
    return None  # colour modes: OpenCV reads them, channels are checked after


def _grey_palette(im) -> bool:
    """Whether every palette entry the image uses is a grey (r = g = b)."""
    palette = np.frombuffer(bytes(im.getpalette() or []), np.uint8).reshape(-1, 3)
    used = np.unique(np.array(im))
    used = used[used < len(palette)]
    colours = palette[used]
    return bool((colours[:, 0] == colours[:, 1]).all() and (colours[:, 1] == colours[:, 2]).all())


def _single_channel(mask: np.ndarray, path: Path) -> np.ndarray:
    if mask.ndim == 2:
        return mask
    colour = mask[..., :3] if mask.shape[2] >= 3 else mask[..., :1]
    first = colour[..., :1]
    # JPEG moves grey pixels' channels apart by a few levels; stored greys elsewhere are exact.
    tolerance = 32 if path.suffix.lower() in JPEG_EXTENSIONS else 0
    spread = np.abs(colour.astype(np.int32) - first.astype(np.int32)).max() if colour.size else 0
    if spread <= tolerance:
        if tolerance:
            return cv2.cvtColor(np.ascontiguousarray(colour), cv2.COLOR_BGR2GRAY)
        return np.ascontiguousarray(first[..., 0])
    raise DataError(f"mask file {path} has {mask.shape[2]} channels with differing colours; segexp "
                    "expects a single-channel image of class indices. For colour-coded masks give "
                    "the dataset a palette so colours can be mapped to classes.")


def _repair_jpeg_mask(mask: np.ndarray, path: Path) -> np.ndarray:
    global _warned_lossy_masks
    if mask.size == 0:
        return mask
    if int(mask.max()) <= JPEG_ZERO_ONE_MAX:
        repaired, levels = (mask >= 1).astype(np.uint8), "0/1 (values >= 1 become 1)"
    else:
        near = (mask <= JPEG_LEVEL_MARGIN) | (mask >= 255 - JPEG_LEVEL_MARGIN)
        if near.mean() < JPEG_TWO_LEVEL_SHARE:
            values = np.unique(mask)
            raise DataError(
                f"mask file {path} is a JPEG with {len(values)} distinct values spread over "
                f"{int(values[0])}..{int(values[-1])}: JPEG compression changes class indices at "
                "every edge, and only two-level (binary 0/255 or 0/1) JPEG masks can be repaired "
                "by thresholding. Save the masks losslessly (PNG) from their source.")
        repaired, levels = np.where(mask >= 128, 255, 0).astype(np.uint8), "0/255 at 128"
    if not _warned_lossy_masks:
        _warned_lossy_masks = True
        log.warning(f"mask {path} is a JPEG (lossy compression blurs its edges): binary JPEG "
                    f"masks are thresholded to {levels}. Warned once, for the first such file; "
                    "PNG masks avoid this.")
    return repaired


def _orientation_hint(sample: Sample) -> str:
    """What EXIF orientation may have to do with an image/mask size mismatch."""
    image, mask = sample.image, sample.mask
    swapped = image.shape[:2] == mask.shape[1::-1]
    orientation = exif_orientation(sample.image_path) if sample.image_path is not None else None
    if orientation is not None and orientation != 1:
        return (f" The image file {sample.image_path} carries the EXIF orientation tag "
                f"{orientation} ({_ORIENTATIONS.get(orientation, 'unknown')}): viewers show it "
                "turned, but segexp reads images and masks as stored (EXIF ignored for both, since "
                "masks are drawn on the stored pixels). If this mask was drawn on the turned view, "
                "save the image with the rotation applied and the tag removed (e.g. Pillow's "
                "ImageOps.exif_transpose) so the pair agrees.")
    if swapped:
        return (" Width and height are swapped: a mask drawn on an EXIF-rotated view of the image "
                "(phone photos carry an orientation tag that viewers apply) looks like this; "
                "segexp ignores EXIF orientation and reads the pixels as stored.")
    return ""


def found_in(folder: Path, limit: int = 10) -> str:
    """What ``folder`` holds, for "expected ..., found ..." messages: its first ``limit`` entries
    (sub-folders marked with ``/``), "an empty folder", or "no folder <path>"."""
    if not folder.is_dir():
        return f"no folder {folder}"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(entries[:limit]) + (" ..." if len(entries) > limit else "") or "an empty folder"


def root_hint(root: Path, nested: Sequence[Path] = (), subfolders: Collection[str] = (), *,
              holds: str = "", itself: str = "one of the sub-folders") -> str:
    """The usual reasons a ``dataset.root`` misses its layout, as a hint (" ..." or ""): the data
    sits one level down (``nested``: the folders under ``root`` found to hold it, first wins;
    ``holds`` describes them, e.g. " with subsets"), or ``root`` is one of the layout's own
    sub-folders (its name in ``subfolders``; ``itself`` says which kind)."""
    if nested:
        return (f" It holds {nested[0].relative_to(root)}/{holds}: did you mean "
                f"dataset.root={nested[0]}?")
    if root.name in subfolders:
        return f" {root} is itself {itself}: did you mean dataset.root={root.parent}?"
    return ""


class SegmentationDataset(Dataset):
    """Base class: subclasses set ``class_names`` (and optionally ``palette``) and ``samples``
    (one entry per sample, usually ``(image path, mask path, ...)`` tuples) and implement
    :meth:`load`. A dataset without such a list (generated data) overrides ``__len__`` and
    :meth:`files`.

    ``__getitem__`` accepts an int, or ``(index, seed)`` from
    :class:`segexp.data.sampler.ResumableSampler`; with a seed the random transforms draw from an
    RNG seeded by it, so augmentation depends only on (run seed, epoch, index): not on worker
    count, and not on where a resumed run restarted.
    """

    class_names: Sequence[str] = ()
    palette: Sequence[tuple[int, int, int]] | None = None
    samples: list  # set by the subclass; what __len__, files() and drop_samples() work on
    root: Path  # the data folder, for datasets read from disk

    def __init__(self, split: str = "train", transforms: Callable | None = None,
                 ignore_index: int = IGNORE_INDEX, num_classes: int | None = None) -> None:
        self.split = split
        self.transforms = transforms
        self.ignore_index = ignore_index
        self._declared_num_classes = num_classes

    # -- to implement (or keep) ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Sample:
        """Read sample ``index`` from disk (or generate it), before any transform."""
        raise NotImplementedError

    def files(self) -> list[Path] | None:
        """Every file this split's samples are read from, so that anything derived from the data
        (the mask scan of :mod:`segexp.data.scan`) notices when one changes; ``[]`` for data that
        is generated, None when unknown (then nothing derived is cached). By default the paths in
        ``self.samples``; override otherwise."""
        samples = getattr(self, "samples", None)
        if samples is None:
            return None
        return [item for entry in samples
                for item in (entry if isinstance(entry, (tuple, list)) else (entry,))
                if isinstance(item, Path)]

    # -- shared behaviour ---------------------------------------------------------------------
    def choose_split(self, dataset: str, choices: str, allowed: Collection[str],
                     train_split: str = "train", val_split: str = "val") -> str:
        """What this split reads: the trainer's ``train`` reads ``dataset.train_split``, its
        ``val`` ``dataset.val_split``, any other split itself. Each must be in ``allowed``
        (``choices`` says them to the user); ``train_split`` / ``val_split`` are kept."""
        for name, value in (("split", self.split), ("dataset.train_split", train_split),
                            ("dataset.val_split", val_split)):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r} for {dataset}: use {choices}.")
        self.train_split, self.val_split = train_split, val_split
        return {"train": train_split, "val": val_split}.get(self.split, self.split)

    def drop_samples(self, indices) -> None:
        """Leave out the samples at ``indices`` (``skip_bad_files=true``: files that cannot be
        read). Works on ``self.samples``, the list the dataset indexes its samples by."""
        drop = set(indices)
        items = getattr(self, "samples", None)
        if isinstance(items, list) and len(items) == len(self):
            self.samples = [item for i, item in enumerate(items) if i not in drop]
            return
        raise ConfigError(f"{type(self).__name__} cannot leave samples out, so skip_bad_files "
                          "does not apply to it: remove or repair the files named.")

    def data_not_found(self, title: str, expected: str, remedy: str, *, hint: str = "",
                       limit: int = 10) -> DataError:
        """The error for a ``dataset.root`` without the expected layout: ``"<title> data not found:
        expected <expected>, found <what root holds>.<hint> <remedy>"``."""
        return DataError(f"{title} data not found: expected {expected}, found "
                         f"{found_in(self.root, limit)}.{hint} {remedy}")

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

    @property
    def mask_dtype(self) -> type:
        """The narrowest integer type that holds every valid mask value (classes and ignore):
        ``uint8`` as a rule, ``int32`` when there are more classes than 8 bits can number."""
        fits = self.num_classes <= 256 and 0 <= self.ignore_index <= 255
        return np.uint8 if fits else np.int32

    def check_sample(self, sample: Sample) -> None:
        """Size agreement and label range: errors that name the file and say what to do."""
        image, mask = sample.image, sample.mask
        if image.shape[:2] != mask.shape[:2]:
            raise DataError(f"image and mask sizes differ for {sample.source}: image "
                            f"{image.shape[1]}x{image.shape[0]}, mask {mask.shape[1]}x{mask.shape[0]} "
                            "(width x height). Each mask must match its image pixel for pixel."
                            + _orientation_hint(sample))
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
        mask = tv_tensors.Mask(torch.from_numpy(
            np.ascontiguousarray(sample.mask).astype(self.mask_dtype, copy=False)))
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
