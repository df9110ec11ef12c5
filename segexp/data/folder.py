"""A user's own data: images and class-index (or colour-coded) masks in folders, paired by file
stem."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from segexp.data.base import IGNORE_INDEX, Sample, SegmentationDataset, read_image, read_mask
from segexp.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# How many masks the 0/255 check reads at construction.
BINARY_CHECK_MASKS = 8

_HOW_TO = ("Put images in <root>/images and class-index PNG masks with the same file stems in "
           "<root>/masks (optionally in train/ and val/ sub-folders of both), then set "
           "dataset.root=<root> or the SEGEXP_DATA environment variable.")


def _shown(names: Sequence[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _found(folder: Path) -> str:
    if not folder.is_dir():
        return "nothing (the folder does not exist)"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return _shown(entries) if entries else "an empty folder"


def _rgb_text(colour: Sequence[int]) -> str:
    r, g, b = (int(c) for c in colour)
    return f"({r}, {g}, {b}) #{r:02X}{g:02X}{b:02X}"


class ColourTable:
    """Exact colour -> index lookup for colour-coded masks: entry ``i`` of ``colours`` is the
    ``[r, g, b]`` that encodes value ``i`` (or ``values[i]`` when given). Colours are packed into
    one integer (``r << 16 | g << 8 | b``) and looked up with a binary search over the sorted
    palette, so a whole mask maps in a few vectorised passes. A colour that is not in the
    palette is an error naming the file, the colour, how many pixels hold it and the nearest
    palette entry (usually an anti-aliased edge or a JPEG-compressed mask, or a palette that
    misses a class)."""

    def __init__(self, colours: Sequence[Sequence[int]], what: str = "the palette",
                 names: Sequence[str] | None = None, values: Sequence[int] | None = None) -> None:
        try:
            table = np.asarray([[int(c) for c in colour] for colour in colours], dtype=np.int64)
        except (TypeError, ValueError) as error:
            raise ConfigError(
                f"{what} must be a list of [r, g, b] colours, got {colours!r}.") from error
        if table.ndim != 2 or table.shape[1] != 3 or len(table) == 0:
            raise ConfigError(f"{what} must be a non-empty list of [r, g, b] colours, got "
                              f"{colours!r}.")
        if table.min() < 0 or table.max() > 255:
            raise ConfigError(f"{what} holds a channel value outside 0..255: {colours!r}.")
        keys = (table[:, 0] << 16) | (table[:, 1] << 8) | table[:, 2]
        seen: dict[int, int] = {}
        for index, key in enumerate(keys.tolist()):
            if key in seen:
                raise ConfigError(f"{what} gives the colour {_rgb_text(table[index])} to both "
                                  f"entries {seen[key]} and {index}; each colour must encode one "
                                  "class.")
            seen[key] = index
        if values is None:
            values = range(len(table))
        values = np.asarray([int(v) for v in values], dtype=np.int32)
        if values.shape != (len(table),):
            raise ConfigError(f"{what}: {len(values)} values for {len(table)} colours.")
        order = np.argsort(keys, kind="stable")
        self.colours = table
        self.values = values
        self.what = what
        self.names = list(names) if names is not None else None
        self._keys = keys[order]
        self._values = values[order]

    def __len__(self) -> int:
        return len(self.colours)

    def _describe(self, entry: int) -> str:
        value = int(self.values[entry])
        colour = _rgb_text(self.colours[entry])
        if self.names is not None and 0 <= value < len(self.names):
            return f"{colour} = class {value} {self.names[value]!r}"
        return f"{colour} = mask value {value}"

    def __call__(self, rgb: np.ndarray, source: str) -> np.ndarray:
        """Map an ``HxWx3`` RGB mask to an ``HxW`` int32 array of palette indices."""
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise DataError(f"colour mask {source} has shape {rgb.shape}; expected H x W x 3 "
                            "(RGB).")
        packed = ((rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8)
                  | rgb[..., 2].astype(np.int32))
        position = np.searchsorted(self._keys, packed)
        np.minimum(position, len(self._keys) - 1, out=position)
        found = self._keys[position] == packed
        if not found.all():
            unknown, counts = np.unique(packed[~found], return_counts=True)
            order = np.argsort(-counts, kind="stable")
            parts = []
            for key, count in zip(unknown[order][:5].tolist(), counts[order][:5].tolist()):
                colour = np.array([(key >> 16) & 255, (key >> 8) & 255, key & 255])
                distance = ((self.colours - colour) ** 2).sum(axis=1)
                parts.append(f"{_rgb_text(colour)} at {count} pixel(s) (nearest palette colour: "
                             f"{self._describe(int(distance.argmin()))})")
            more = f" (and {len(unknown) - 5} more unknown colours)" if len(unknown) > 5 else ""
            raise DataError(
                f"colour mask {source} holds {len(unknown)} colour(s) that are not in {self.what}: "
                f"{'; '.join(parts)}{more}. Colour masks must use exactly the palette's colours "
                "(save them as PNG, without anti-aliasing or JPEG compression), or add the "
                "missing colours to the palette.")
        return self._values[position]


def read_colour_mask(path: str | Path) -> np.ndarray:
    """Read a colour-coded mask as RGB ``uint8`` ``HxWx3`` (palette PNGs are expanded to their
    colours, an alpha channel is dropped)."""
    mask = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if mask is None:
        raise DataError(f"cannot read mask file {path}: it is missing, empty or not an image. "
                        "Remove the sample or replace the mask with a colour-coded PNG.")
    return cv2.cvtColor(mask, cv2.COLOR_BGR2RGB)


def _index(folder: Path) -> dict[str, Path]:
    """stem -> file for the image files in ``folder``; two files with one stem is an error."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if (path.name.startswith(".") or not path.is_file()
                or path.suffix.lower() not in IMAGE_EXTENSIONS):
            continue
        if path.stem in files:
            raise DataError(
                f"two files share the stem {path.stem!r} in {folder}: {files[path.stem].name} and "
                f"{path.name}. Images and masks are paired by stem; rename or remove one.")
        files[path.stem] = path
    return files


class FolderDataset(SegmentationDataset):
    """Images under ``root/images`` and class-index masks under ``root/masks`` with matching stems
    (``images/a.jpg`` <-> ``masks/a.png``). The split comes from, in this order:

    1. sub-folders: ``images/train``, ``images/val`` (and the same under ``masks/``);
    2. split list files: ``root/<split_files>/<split>.txt``, one stem per line (``split_files``
       defaults to ``splits``; set it to null to ignore such files);
    3. a seeded random fraction: ``val_fraction`` of the sorted stems, shuffled with ``seed``, are
       ``val``, the rest ``train``.

    Class names come from ``class_names`` or ``classes_file`` (one name per line, relative to
    ``root`` unless absolute); with neither, ``num_classes`` gives names ``class_0..``. ``mask_map``
    (``{old: new}``) remaps mask values when loading, e.g. ``{255: 1}`` for binary masks stored as
    0/255 (otherwise 255 is the ignore index and such a dataset would teach nothing: construction
    refuses it). ``base_size`` null keeps the images' own sizes as the rescale reference.

    Colour-coded RGB masks: ``mask_palette=[[r, g, b], ...]`` gives the colour of mask value 0, 1,
    ... (it may hold more entries than classes, e.g. a "void" colour last, sent to the ignore index
    with ``mask_map={N: 255}``), or ``colour_masks=true`` uses ``palette`` (one colour per class).
    Colours map exactly to indices before ``mask_map`` applies; a colour outside the palette is an
    error naming the file, the colour and the nearest palette entry.
    """

    def __init__(self, split: str = "train", transforms=None, ignore_index: int = IGNORE_INDEX,
                 num_classes: int | None = None, crop_size: Sequence[int] = (512, 512),
                 base_size: Sequence[int] | None = None, root: str | Path = "data/folder",
                 class_names: Sequence[str] | None = None, classes_file: str | Path | None = None,
                 split_files: str | Path | None = "splits", val_fraction: float = 0.1,
                 seed: int = 0, mask_map: Mapping[int, int] | None = None,
                 palette: Sequence[Sequence[int]] | None = None,
                 mask_palette: Sequence[Sequence[int]] | None = None,
                 colour_masks: bool = False) -> None:
        super().__init__(split=split, transforms=transforms, ignore_index=ignore_index,
                         num_classes=num_classes)
        self.root = Path(root)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.base_size = tuple(base_size) if base_size is not None else None
        self.class_names = self._class_names(class_names, classes_file, num_classes)
        if palette is not None:
            self.palette = [tuple(int(c) for c in colour) for colour in palette]
            if len(self.palette) != len(self.class_names) or any(len(c) != 3 for c in self.palette):
                raise ConfigError(f"dataset.palette needs one [r, g, b] per class "
                                  f"({len(self.class_names)}), got {palette}.")
        self._colour_table = self._make_colour_table(mask_palette, colour_masks)
        self._lut = self._mask_lut(mask_map)
        self.mask_map = None if mask_map is None else {int(k): int(v) for k, v in mask_map.items()}
        self.samples, self.layout = self._find_samples(split, split_files, float(val_fraction),
                                                       int(seed))
        self.check_num_classes()
        if self.mask_map is None and self._colour_table is None:
            self._check_binary_masks()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Sample:
        image_path, mask_path = self.samples[index]
        image = read_image(image_path)
        source = f"{mask_path} (image {image_path.name})"
        if self._colour_table is not None:
            mask = self._colour_table(read_colour_mask(mask_path), source)
        else:
            mask = self._read_index_mask(mask_path)
        if self._lut is not None:
            mask = self._remap(mask)
        return Sample(image=image, mask=mask, source=source)

    @staticmethod
    def _read_index_mask(mask_path: Path) -> np.ndarray:
        try:
            return read_mask(mask_path)
        except DataError as error:
            if "channels" not in str(error):
                raise
            raise DataError(
                f"{error} For a folder dataset with colour-coded masks set "
                "dataset.mask_palette=[[r, g, b], ...] (the colour of class 0, 1, ...) or "
                "dataset.colour_masks=true with dataset.palette.") from error

    # -- construction -----------------------------------------------------------------------
    def _class_names(self, class_names, classes_file, num_classes) -> tuple[str, ...]:
        if class_names is not None and classes_file is not None:
            raise ConfigError("give dataset.class_names or dataset.classes_file, not both.")
        if classes_file is not None:
            path = Path(classes_file)
            path = path if path.is_absolute() else self.root / path
            if not path.is_file():
                raise DataError(
                    f"classes file {path} not found (dataset.classes_file={classes_file}, relative "
                    "to dataset.root unless absolute). Write one class name per line, in "
                    "class-index order.")
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not names:
                raise DataError(f"classes file {path} is empty; write one class name per line.")
            return tuple(names)
        if class_names is not None:
            return tuple(str(name) for name in class_names)
        if num_classes is not None:
            return tuple(f"class_{i}" for i in range(int(num_classes)))
        raise ConfigError("the folder dataset needs its classes: set dataset.class_names=[...], "
                          "dataset.classes_file=<file> or at least dataset.num_classes.")

    def _find_samples(self, split: str, split_files, val_fraction: float,
                      seed: int) -> tuple[list[tuple[Path, Path]], str]:
        images_dir, masks_dir = self.root / "images", self.root / "masks"
        if not images_dir.is_dir() or not masks_dir.is_dir():
            raise DataError(
                f"folder dataset not found: expected {images_dir} and {masks_dir}, found in "
                f"{self.root}: {_found(self.root)}. {_HOW_TO}")
        if (images_dir / "train").is_dir() or (images_dir / "val").is_dir():
            image_split, mask_split = images_dir / split, masks_dir / split
            if not image_split.is_dir() or not mask_split.is_dir():
                raise DataError(
                    f"split {split!r} not found: expected {image_split} and {mask_split} (the "
                    f"dataset uses train/ and val/ sub-folders); found in {images_dir}: "
                    f"{_found(images_dir)}; in {masks_dir}: {_found(masks_dir)}.")
            pairs = self._pair(_index(image_split), _index(mask_split), image_split, mask_split)
            return self._non_empty([pairs[stem] for stem in sorted(pairs)], split), "subfolders"

        pairs = self._pair(_index(images_dir), _index(masks_dir), images_dir, masks_dir)
        if split_files is not None:
            list_dir = Path(split_files)
            list_dir = list_dir if list_dir.is_absolute() else self.root / list_dir
            list_file = list_dir / f"{split}.txt"
            if list_file.is_file():
                lines = list_file.read_text().splitlines()
                stems = [line.strip() for line in lines if line.strip()]
                missing = [stem for stem in stems if stem not in pairs]
                if missing:
                    raise DataError(
                        f"{list_file} lists {len(missing)} stem(s) with no image/mask pair in "
                        f"{images_dir} and {masks_dir}: {_shown(missing)}.")
                return self._non_empty([pairs[stem] for stem in stems], split), "split_files"
            if list_dir.is_dir() and any(list_dir.glob("*.txt")):
                raise DataError(f"split list {list_file} not found, but {list_dir} holds "
                                f"{_found(list_dir)}. Write {split}.txt (one stem per line) or set "
                                "dataset.split_files=null to split by dataset.val_fraction.")
        if split not in ("train", "val"):
            raise ConfigError(
                f"split {split!r}: a flat folder dataset without split list files has only "
                "'train' and 'val' (made with dataset.val_fraction).")
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"dataset.val_fraction={val_fraction} must be in [0, 1).")
        stems = sorted(pairs)
        order = np.random.default_rng(seed).permutation(len(stems))
        n_val = round(len(stems) * val_fraction)
        if val_fraction > 0 and len(stems) >= 2:
            n_val = min(max(n_val, 1), len(stems) - 1)
        chosen = order[:n_val] if split == "val" else order[n_val:]
        return self._non_empty([pairs[stems[i]] for i in sorted(chosen)], split), "val_fraction"

    @staticmethod
    def _pair(images: dict[str, Path], masks: dict[str, Path], images_dir: Path,
              masks_dir: Path) -> dict[str, tuple[Path, Path]]:
        no_mask = sorted(set(images) - set(masks))
        no_image = sorted(set(masks) - set(images))
        problems = []
        if no_mask:
            problems.append(f"{len(no_mask)} image(s) in {images_dir} have no mask in "
                            f"{masks_dir}: {_shown(no_mask)}")
        if no_image:
            problems.append(f"{len(no_image)} mask(s) in {masks_dir} have no image in "
                            f"{images_dir}: {_shown(no_image)}")
        if problems:
            raise DataError("; ".join(problems) + ". Images and masks are paired by file stem: add "
                            "the missing files or remove the unpaired ones.")
        return {stem: (images[stem], masks[stem]) for stem in images}

    def _non_empty(self, samples: list[tuple[Path, Path]], split: str) -> list[tuple[Path, Path]]:
        if not samples:
            raise DataError(f"the {split!r} split of the folder dataset at {self.root} is empty. "
                            f"{_HOW_TO}")
        return samples

    def _make_colour_table(self, mask_palette, colour_masks: bool) -> ColourTable | None:
        if mask_palette is not None:
            table = ColourTable(mask_palette, what="dataset.mask_palette", names=self.class_names)
            if len(table) < len(self.class_names):
                raise ConfigError(
                    f"dataset.mask_palette has {len(table)} colours but the dataset has "
                    f"{len(self.class_names)} classes ({', '.join(self.class_names)}); give at "
                    "least one [r, g, b] per class, in class-index order.")
            if self.palette is None:  # draw pictures with the masks' own colours
                self.palette = [tuple(int(c) for c in colour)
                                for colour in table.colours[: len(self.class_names)]]
            return table
        if colour_masks:
            if self.palette is None:
                raise ConfigError(
                    "dataset.colour_masks=true maps mask colours with dataset.palette, which is "
                    "not set: give dataset.palette=[[r, g, b], ...] (one colour per class) or "
                    "dataset.mask_palette.")
            return ColourTable(self.palette, what="dataset.palette", names=self.class_names)
        return None

    def _mask_lut(self, mask_map) -> np.ndarray | None:
        if mask_map is None:
            return None
        if not isinstance(mask_map, Mapping):
            raise ConfigError(f"dataset.mask_map must be a mapping old value -> new value, e.g. "
                              f"'{{255: 1}}', got {mask_map!r}.")
        try:
            mapping = {int(k): int(v) for k, v in mask_map.items()}
        except (TypeError, ValueError) as error:
            raise ConfigError(
                f"dataset.mask_map={dict(mask_map)!r} must map integers to integers.") from error
        if any(k < 0 or v < 0 for k, v in mapping.items()):
            raise ConfigError(
                f"dataset.mask_map={mapping} holds a negative value; mask values are >= 0.")
        lut = np.arange(max(256, max(mapping, default=0) + 1), dtype=np.int64)
        for old, new in mapping.items():
            lut[old] = new
        return lut

    def _remap(self, mask: np.ndarray) -> np.ndarray:
        """Apply ``mask_map`` with a lookup table (values outside the table stay as they are)."""
        if mask.size == 0 or int(mask.min()) < 0:
            return mask
        lut = self._lut
        top = int(mask.max())
        if top >= len(lut):
            lut = np.concatenate([lut, np.arange(len(lut), top + 1, dtype=lut.dtype)])
        return lut[mask]

    def _check_binary_masks(self) -> None:
        """Refuse masks that hold only 0 and 255: a binary task saved as 0/255 would be all
        background + ignore, and the model would learn nothing."""
        seen: set[int] = set()
        first_with_255 = None
        for _, mask_path in self.samples[:BINARY_CHECK_MASKS]:
            values = set(np.unique(self._read_index_mask(mask_path)).tolist())
            seen |= values
            if self.ignore_index in values and first_with_255 is None:
                first_with_255 = mask_path
            if not seen <= {0, self.ignore_index}:
                return
        if first_with_255 is not None:
            checked = min(len(self.samples), BINARY_CHECK_MASKS)
            raise DataError(
                f"mask {first_with_255} (like the first {checked} masks of the {self.split!r} "
                f"split) holds only the values 0 and {self.ignore_index}, but {self.ignore_index} "
                "is the ignore index: those pixels would count nowhere and the model would learn "
                "nothing. For a binary task stored as "
                "0/255, set dataset.mask_map='{255: 1}' (with num_classes=2); if 255 really marks "
                "pixels to ignore, set dataset.mask_map='{255: 255}' to skip this check.")
