"""A user's own data: images and class-index (or colour-coded) masks in folders, paired by file
stem. Folder names, split folders (above or below the image and mask folders), split list files
and file-name endings are options, so common public layouts load without moving a file (README:
"Public layouts by overrides")."""

from __future__ import annotations

import logging
import os
from bisect import bisect_left
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from segexp.data.base import (
    IGNORE_INDEX,
    IMAGE_EXTENSIONS,
    JPEG_EXTENSIONS,
    Sample,
    SegmentationDataset,
    read_image,
    read_mask,
)
from segexp.errors import ConfigError, DataError, first_few

log = logging.getLogger(__name__)

# How many masks the 0/255 check reads at construction.
BINARY_CHECK_MASKS = 8
# How many unpaired names the suffix suggestion compares (enough to see the pattern).
SUGGESTION_SAMPLE = 200

_HOW_TO = ("Put images in <root>/images and class-index PNG masks with the same file stems in "
           "<root>/masks (optionally in train/ and val/ sub-folders of both, or in <root>/train/ "
           "and <root>/val/ each holding images/ and masks/), then run e.g. "
           "`python train.py dataset=folder dataset.root=/data/cells "
           "dataset.class_names='[background,cell]'` (or set the SEGEXP_DATA environment "
           "variable). Other layouts load without moving files: dataset.image_dir / "
           "dataset.mask_dir name the folders, dataset.train_split / dataset.val_split the split "
           "folders or list files, dataset.img_suffix / dataset.mask_suffix the name endings "
           "(README, 'Public layouts by overrides').")


def _found(folder: Path) -> str:
    if folder.is_file():
        return "nothing (it is a file, not a folder)"
    if not folder.is_dir():
        return "nothing (the folder does not exist)"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                     if not p.name.startswith("."))
    return first_few(entries, 10) if entries else "an empty folder"


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
    mask = None
    if Path(path).suffix.lower() != ".gif":  # OpenCV builds may lack GIF: Pillow reads those
        mask = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if mask is None:
        try:
            with Image.open(path) as im:
                return np.array(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as error:
            raise DataError(f"cannot read mask file {path}: it is missing, empty or not an image. "
                            "Remove the sample or replace the mask with a colour-coded PNG."
                            ) from error
    return cv2.cvtColor(mask, cv2.COLOR_BGR2RGB)


# -- file names -------------------------------------------------------------------------------
@dataclass(frozen=True)
class NameRule:
    """Which files of a folder belong to one side (images or masks) and the stem each pairs by.

    A suffix is the end of a file name after the stem the image and its mask share, with or
    without the extension: ``_manual1.gif`` (``21_manual1.gif`` -> stem ``21``, GIF files only),
    ``_segmentation`` (``x_segmentation.png`` -> ``x``, any image extension), ``.jpg`` (JPEG files
    only). No suffix: every image file, paired by its name without the extension. Several
    suffixes (a list) accept any of them, e.g. ``[_training.tif, _test.tif]``. An extension is
    one of :data:`IMAGE_EXTENSIONS`, matched case-insensitively; the rest of a suffix matches
    exactly."""

    option: str
    suffixes: tuple[tuple[str, str], ...] = (("", ""),)  # (end of the stem part, extension)

    @classmethod
    def parse(cls, value, option: str) -> NameRule:
        if value is None or value == "":
            return cls(option)
        values = [value] if isinstance(value, str) else value
        try:
            values = list(values)
        except TypeError:
            values = None
        if not values or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{option}={value!r} must be a file-name ending such as "
                              "_mask.png or _segmentation, or a list of them.")
        suffixes = []
        for text in values:
            if "/" in text or "\\" in text:
                raise ConfigError(f"{option}={text!r} holds a path separator; a suffix is the end "
                                  "of a file name (name folders with dataset.image_dir / "
                                  "dataset.mask_dir).")
            extension = os.path.splitext("x" + text)[1]
            if extension.lower() in IMAGE_EXTENSIONS:
                suffixes.append((text[: len(text) - len(extension)], extension.lower()))
            else:
                suffixes.append((text, ""))
        return cls(option, tuple(suffixes))

    @property
    def is_open(self) -> bool:
        """Whether the rule takes any image file (one of its suffixes is empty)."""
        return ("", "") in self.suffixes

    @property
    def text(self) -> str:
        shown = [body + extension for body, extension in self.suffixes]
        if self.is_open:
            return f"{self.option} not set" if len(shown) == 1 else f"{self.option}={shown}"
        return f"{self.option}={shown[0] if len(shown) == 1 else shown}"

    def stem(self, name: str) -> str | None:
        """The stem ``name`` pairs by, or None when the file is not one of this side's."""
        base, extension = os.path.splitext(name)
        extension = extension.lower()
        if extension not in IMAGE_EXTENSIONS:
            return None
        for body, wanted in self.suffixes:
            if wanted and extension != wanted:
                continue
            if not body:
                return base
            if base.endswith(body) and len(base) > len(body):
                return base[: -len(body)]
        return None


def _index(folder: Path, rule: NameRule, other: NameRule | None = None,
           other_first: bool = False) -> tuple[dict[str, Path], list[Path]]:
    """stem -> file for the files of ``folder`` that ``rule`` accepts, and the image files that
    it does not accept. ``other`` is the other side's rule when both sides share the folder:
    its files are left to it (``other_first``: it takes the files both rules accept)."""
    files: dict[str, Path] = {}
    rejected: list[Path] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if os.path.splitext(path.name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        stem = rule.stem(path.name)
        if other is not None:
            other_stem = other.stem(path.name)
            if other_stem is not None and (stem is None or other_first):
                continue
        if stem is None:
            rejected.append(path)
            continue
        if stem in files:
            raise DataError(
                f"two files share the stem {stem!r} in {folder}: {files[stem].name} and "
                f"{path.name}. Images and masks are paired by stem; rename or remove one (or "
                f"narrow {rule.option} to one of them).")
        files[stem] = path
    return files, rejected


def suggest_suffixes(images: Sequence[Path], masks: Sequence[Path]) -> tuple[str, str] | None:
    """The ``(img_suffix, mask_suffix)`` that would pair most of these unpaired files, when their
    names share a beginning and differ by an ending (``21_training.tif`` / ``21_manual1.gif``
    -> ``_training``, ``_manual1``); None when no ending explains most of them."""
    image_bases = sorted(os.path.splitext(p.name)[0] for p in images)[:SUGGESTION_SAMPLE]
    mask_bases = sorted(os.path.splitext(p.name)[0] for p in masks)
    if not image_bases or not mask_bases:
        return None
    votes: Counter[tuple[str, str]] = Counter()
    for base in image_bases:
        position = bisect_left(mask_bases, base)
        shared, partner = "", ""
        for j in (position - 1, position):
            if 0 <= j < len(mask_bases):
                prefix = os.path.commonprefix([base, mask_bases[j]])
                if len(prefix) > len(shared):
                    shared, partner = prefix, mask_bases[j]
        cut = len(shared)
        while cut > 1 and shared[cut - 1] in "_-. ":  # the separator belongs to the ending
            cut -= 1
        if cut:
            votes[(base[cut:], partner[cut:])] += 1
    if not votes:
        return None
    (image_end, mask_end), count = votes.most_common(1)[0]
    if 2 * count < len(image_bases) or (image_end, mask_end) == ("", ""):
        return None
    return image_end, mask_end


# -- layouts ----------------------------------------------------------------------------------
@dataclass
class FolderScan:
    """What one split of a folder layout holds: its pairs and the files that did not pair."""

    split: str  # the trainer's name: train, val
    name: str  # the split folder or list file it reads (dataset.train_split / val_split)
    layout: str  # subfolders, split_files or val_fraction
    image_dir: Path
    mask_dir: Path
    pairs: list[tuple[Path, Path]]
    unpaired_images: list[Path] = field(default_factory=list)  # no mask with their stem
    unpaired_masks: list[Path] = field(default_factory=list)  # no image with their stem
    rejected: list[Path] = field(default_factory=list)  # image files no suffix accepts
    list_file: Path | None = None
    missing_entries: list[str] = field(default_factory=list)  # list lines naming no file

    @property
    def problems(self) -> bool:
        return bool(self.unpaired_images or self.unpaired_masks or self.rejected)

    def describe(self) -> str:
        where = {"subfolders": "split folders",
                 "split_files": f"list file {self.list_file}",
                 "val_fraction": "a seeded dataset.val_fraction of the paired files"}[self.layout]
        return (f"{self.split} split reads {self.name!r}: {len(self.pairs)} pairs, images in "
                f"{self.image_dir}, masks in {self.mask_dir} ({where})")


@dataclass
class FolderLayout:
    """Where a folder dataset's files are and how they pair, from the dataset options: the
    scanning part of :class:`FolderDataset`, usable without building one (``dataset_stats.py
    --check`` reports unpaired files with it even where the dataset would refuse them)."""

    root: str | Path = "data/folder"
    image_dir: str = "images"
    mask_dir: str = "masks"
    train_split: str = "train"
    val_split: str = "val"
    split_files: str | Path | None = "splits"
    val_fraction: float = 0.1
    seed: int = 0
    img_suffix: str | Sequence[str] | None = None
    mask_suffix: str | Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        for option in ("image_dir", "mask_dir", "train_split", "val_split"):
            value = getattr(self, option)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"dataset.{option}={value!r} must be a folder name (relative "
                                  "to dataset.root).")
        self.image_rule = NameRule.parse(self.img_suffix, "dataset.img_suffix")
        self.mask_rule = NameRule.parse(self.mask_suffix, "dataset.mask_suffix")
        if Path(self.image_dir) == Path(self.mask_dir) and self.image_rule.is_open \
                and self.mask_rule.is_open:
            raise ConfigError(
                f"dataset.image_dir and dataset.mask_dir are both {self.image_dir!r}: in one "
                "folder, masks are told from images by their name ending. Set "
                "dataset.mask_suffix (e.g. _mask or _segmentation.png).")
        self.val_fraction = float(self.val_fraction)
        self.seed = int(self.seed)

    @classmethod
    def from_options(cls, options: Mapping) -> FolderLayout:
        """From a ``dataset`` config node (the keys it does not know are left out)."""
        names = cls.__dataclass_fields__
        return cls(**{key: options[key] for key in options if key in names})

    def split_name(self, split: str) -> str:
        return {"train": self.train_split, "val": self.val_split}.get(split, split)

    def _option_for(self, split: str) -> str:
        return {"train": "dataset.train_split", "val": "dataset.val_split"}.get(split, "the split")

    # -- finding the folders ----------------------------------------------------------------
    def _check_root(self) -> None:
        if self.root.is_file():
            raise DataError(
                f"dataset.root={self.root} is a file, not a folder: point dataset.root at the "
                f"folder that holds {self.image_dir}/ and {self.mask_dir}/ (or the split folders "
                f"holding them). {_HOW_TO}")
        if not self.root.is_dir():
            raise DataError(
                f"folder dataset not found: expected {self.root / self.image_dir} and "
                f"{self.root / self.mask_dir}, found in {self.root}: {_found(self.root)}. "
                f"{_HOW_TO}")

    def split_position(self) -> str | None:
        """``below`` (``images/train/``), ``above`` (``train/images/``) or None (no split
        folders) for the configured split names."""
        names = {self.train_split, self.val_split}
        if any((self.root / self.image_dir / name).is_dir() for name in names):
            return "below"
        if any((self.root / name / self.image_dir).is_dir() for name in names):
            return "above"
        return None

    def _split_folders_found(self) -> tuple[str, list[str]]:
        """Split folders that exist under another name: (position, names)."""
        below = self.root / self.image_dir
        if below.is_dir():
            names = sorted(p.name for p in below.iterdir() if p.is_dir() and not p.name.startswith("."))
            if names:
                return "below", names
        if self.root.is_dir():
            names = sorted(p.name for p in self.root.iterdir()
                           if p.is_dir() and (p / self.image_dir).is_dir())
            if names:
                return "above", names
        return "", []

    def _split_hint(self) -> str:
        position, names = self._split_folders_found()
        if not names:
            return ""
        names = sorted(names, key=lambda name: ("train" not in name.lower(), name))
        where = (f"{self.root / self.image_dir} holds the folders {', '.join(names)}"
                 if position == "below" else
                 f"{', '.join(f'{name}/' for name in names)} in {self.root} hold "
                 f"{self.image_dir}/")
        return (f" {where}: split folders under other names? Set dataset.train_split=<name> and "
                f"dataset.val_split=<name> to two of them (e.g. dataset.train_split={names[0]}"
                + (f" dataset.val_split={names[1]}" if len(names) > 1 else "") + ").")

    def _folders_hint(self) -> str:
        """Where image-like folders are when image_dir / mask_dir are wrong."""
        configured = {Path(self.image_dir).parts[0], Path(self.mask_dir).parts[0]}
        subfolders = sorted(p.name for p in self.root.iterdir() if p.is_dir()
                            and not p.name.startswith(".") and p.name not in configured)
        nested = [name for name in subfolders if (self.root / name / self.image_dir).is_dir()
                  and (self.root / name / self.mask_dir).is_dir()]
        if len(nested) == 1:
            return (f" {nested[0]}/ holds {self.image_dir}/ and {self.mask_dir}/: did you mean "
                    f"dataset.root={self.root / nested[0]} (or, if it is a split folder, "
                    f"dataset.train_split={nested[0]})?")
        hint = self._split_hint()
        if hint:
            return hint
        if subfolders:
            return (f" If the images and masks are in {first_few(subfolders)}, name them with "
                    "dataset.image_dir=<folder> and dataset.mask_dir=<folder> (relative to "
                    "dataset.root, e.g. dataset.mask_dir=annotations/trimaps).")
        return ""

    # -- scanning ---------------------------------------------------------------------------
    def scan(self, split: str) -> FolderScan:
        """The pairs of ``split`` (``train`` reads ``train_split``, ``val`` reads ``val_split``)
        and the files that did not pair; a :class:`DataError` only when the layout cannot be
        read at all (missing folders, a broken list file)."""
        self._check_root()
        name = self.split_name(split)
        position = self.split_position()
        if position is not None:
            return self._scan_split_folders(split, name, position)
        image_dir, mask_dir = self.root / self.image_dir, self.root / self.mask_dir
        if not image_dir.is_dir() or not mask_dir.is_dir():
            raise DataError(
                f"folder dataset not found: expected {image_dir} and {mask_dir}, found in "
                f"{self.root}: {_found(self.root)}.{self._folders_hint() or ' ' + _HOW_TO}")
        images, masks, rejected = self._index_pair(image_dir, mask_dir)
        if not images and not masks and not rejected:
            hint = self._split_hint() or f" {_HOW_TO}"
            raise DataError(f"no image files in {image_dir} or {mask_dir} (found in "
                            f"{image_dir}: {_found(image_dir)}).{hint}")
        scan = FolderScan(split, name, "val_fraction", image_dir, mask_dir, [], rejected=rejected)
        if self.split_files is not None:
            list_dir = Path(self.split_files)
            list_dir = list_dir if list_dir.is_absolute() else self.root / list_dir
            list_file = list_dir / f"{name}.txt"
            if list_file.is_file():
                return self._scan_list(scan, list_file, images, masks)
            lists = sorted(p.stem for p in list_dir.glob("*.txt")) if list_dir.is_dir() else []
            if lists:
                raise DataError(
                    f"split list {list_file} not found ({split!r} reads {name!r}, "
                    f"{self._option_for(split)}={name}), but {list_dir} holds the lists "
                    f"{first_few([f'{stem}.txt' for stem in lists], 10)}. Set "
                    f"{self._option_for(split)} to one of {', '.join(lists[:6])}, write "
                    f"{name}.txt (one image name or stem per line), or set "
                    "dataset.split_files=null to split by dataset.val_fraction.")
        if split not in ("train", "val"):
            raise ConfigError(
                f"split {split!r}: a flat folder dataset without split folders or list files has "
                "only 'train' and 'val' (made with dataset.val_fraction).")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"dataset.val_fraction={self.val_fraction} must be in [0, 1).")
        paired = sorted(set(images) & set(masks))
        order = np.random.default_rng(self.seed).permutation(len(paired))
        n_val = round(len(paired) * self.val_fraction)
        if self.val_fraction > 0 and len(paired) >= 2:
            n_val = min(max(n_val, 1), len(paired) - 1)
        chosen = order[:n_val] if split == "val" else order[n_val:]
        scan.pairs = [(images[paired[i]], masks[paired[i]]) for i in sorted(chosen)]
        scan.unpaired_images = [images[s] for s in sorted(set(images) - set(masks))]
        scan.unpaired_masks = [masks[s] for s in sorted(set(masks) - set(images))]
        return scan

    def _index_pair(self, image_dir: Path, mask_dir: Path):
        if image_dir.resolve() == mask_dir.resolve():
            masks_first = not self.mask_rule.is_open
            images, rejected = _index(image_dir, self.image_rule, self.mask_rule,
                                      other_first=masks_first)
            masks, _ = _index(mask_dir, self.mask_rule, self.image_rule,
                              other_first=not masks_first)
            return images, masks, rejected
        images, rejected_images = _index(image_dir, self.image_rule)
        masks, rejected_masks = _index(mask_dir, self.mask_rule)
        return images, masks, rejected_images + rejected_masks

    def _scan_split_folders(self, split: str, name: str, position: str) -> FolderScan:
        if position == "below":
            image_dir, mask_dir = self.root / self.image_dir / name, self.root / self.mask_dir / name
        else:
            image_dir, mask_dir = self.root / name / self.image_dir, self.root / name / self.mask_dir
        if not image_dir.is_dir() or not mask_dir.is_dir():
            _, names = self._split_folders_found()
            others = [n for n in names if n != name]
            choose = (f" Set {self._option_for(split)} to one of: {', '.join(others)}." if others
                      and split in ("train", "val") else "")
            missing = " and ".join(str(p) for p in (image_dir, mask_dir) if not p.is_dir())
            raise DataError(
                f"split {split!r} not found: it reads the split folder {name!r} "
                f"({self._option_for(split)}={name}), but {missing} is not there; the dataset "
                f"uses split folders {'inside' if position == 'below' else 'around'} "
                f"{self.image_dir}/ and {self.mask_dir}/ and has: {', '.join(names) or 'none'}."
                f"{choose}")
        images, masks, rejected = self._index_pair(image_dir, mask_dir)
        paired = sorted(set(images) & set(masks))
        return FolderScan(
            split, name, "subfolders", image_dir, mask_dir,
            [(images[s], masks[s]) for s in paired],
            unpaired_images=[images[s] for s in sorted(set(images) - set(masks))],
            unpaired_masks=[masks[s] for s in sorted(set(masks) - set(images))],
            rejected=rejected)

    def _scan_list(self, scan: FolderScan, list_file: Path, images: dict[str, Path],
                   masks: dict[str, Path]) -> FolderScan:
        """A list names image files (``a.jpg``, ``images/a.jpg``) or stems, one per line; only
        the first word counts when the whole line is not a name (``Abyssinian_1 1 1 1``), and
        lines starting with ``#`` are comments. Files the list does not name are not used."""
        scan.layout, scan.list_file = "split_files", list_file
        known = set(images) | set(masks)
        for line in list_file.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            stem = None
            for entry in (line, line.split()[0]):
                name = Path(entry).name
                for candidate in (name, self.image_rule.stem(name), self.mask_rule.stem(name)):
                    if candidate is not None and candidate in known:
                        stem = candidate
                        break
                if stem is not None:
                    break
            if stem is None:
                scan.missing_entries.append(line.split()[0])
            elif stem in images and stem in masks:
                scan.pairs.append((images[stem], masks[stem]))
            elif stem in images:
                scan.unpaired_images.append(images[stem])
            else:
                scan.unpaired_masks.append(masks[stem])
        return scan

    # -- messages ---------------------------------------------------------------------------
    def describe_unpaired(self, scan: FolderScan) -> str:
        """The unpaired and rejected files of ``scan``, named (the first few) and counted, with
        the options that pair them."""
        parts = []
        if scan.unpaired_images:
            parts.append(f"{len(scan.unpaired_images)} image(s) in {scan.image_dir} have no mask "
                         f"in {scan.mask_dir}: {first_few([p.name for p in scan.unpaired_images], 10)}")
        if scan.unpaired_masks:
            parts.append(f"{len(scan.unpaired_masks)} mask(s) in {scan.mask_dir} have no image in "
                         f"{scan.image_dir}: {first_few([p.name for p in scan.unpaired_masks], 10)}")
        for folder, rule in ((scan.image_dir, self.image_rule), (scan.mask_dir, self.mask_rule)):
            rejected = [p for p in scan.rejected if p.parent == folder and rule.stem(p.name) is None]
            if folder == scan.mask_dir == scan.image_dir and rule is self.mask_rule:
                continue
            if rejected:
                current = ",".join(body + extension for body, extension in rule.suffixes)
                parts.append(f"{len(rejected)} image file(s) in {folder} do not end in "
                             f"{rule.text}: {first_few([p.name for p in rejected], 10)} (several "
                             f"endings go in a list: {rule.option}='[{current},<another>]')")
        if not parts:
            return ""
        text = "; ".join(parts) + (
            f". Images and masks are paired by the file name left after removing the suffix "
            f"({self.image_rule.text}, {self.mask_rule.text}).")
        suggestion = suggest_suffixes(scan.unpaired_images, scan.unpaired_masks)
        if suggestion is not None:
            settings = " ".join(f"{option}={value}" for option, value in
                                zip(("dataset.img_suffix", "dataset.mask_suffix"), suggestion)
                                if value)
            text += f" Their names differ by an ending: set {settings} to pair them."
        return text


class FolderDataset(SegmentationDataset):
    """Images and class-index masks in two folders, paired by file stem (``images/a.jpg`` <->
    ``masks/a.png``). ``image_dir`` / ``mask_dir`` name the folders (relative to ``root``, e.g.
    ``annotations/trimaps``; they may be the same folder when ``mask_suffix`` tells masks
    apart). ``img_suffix`` / ``mask_suffix`` are the name endings after the shared stem, with
    or without the extension (:class:`NameRule`): ``21_training.tif`` <-> ``21_manual1.gif``
    with ``img_suffix=_training.tif`` and ``mask_suffix=_manual1.gif``. The split that
    ``split="train"`` / ``"val"`` reads is named by ``train_split`` / ``val_split`` (a folder or
    list file name, e.g. ``training`` / ``test``), found in this order:

    1. split folders below or above the image and mask folders: ``images/<name>/`` +
       ``masks/<name>/``, or ``<name>/images/`` + ``<name>/masks/``;
    2. split list files: ``root/<split_files>/<name>.txt``, one image file name or stem per line
       (the first word of a line counts, so ``<stem> <class> ...`` lines work; ``split_files``
       defaults to ``splits``; null ignores such files);
    3. a seeded random fraction: ``val_fraction`` of the sorted paired stems, shuffled with
       ``seed``, are ``val``, the rest ``train``.

    Files that do not pair (an image without a mask, a mask without an image, an image file no
    suffix accepts) are an error naming them and the options that would pair them, unless
    ``allow_unpaired`` (then a warning, and the pairs found are used).

    Class names come from ``class_names`` or ``classes_file`` (one name per line, relative to
    ``root`` unless absolute); with neither, ``num_classes`` gives names ``class_0..``; with
    none of the three, the count is inferred from the split's masks (largest value + 1,
    ignore index left out; logged as a warning). ``mask_map`` (``{old: new}``) remaps mask
    values when loading, e.g. ``{255: 1}`` for binary masks stored as 0/255 (otherwise 255 is
    the ignore index and such a dataset would teach nothing: construction refuses it).
    ``base_size`` null keeps the images' own sizes as the rescale reference. Mask and image
    formats: :func:`segexp.data.base.read_mask` and :func:`~segexp.data.base.read_image`.

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
                 colour_masks: bool = False, image_dir: str = "images", mask_dir: str = "masks",
                 train_split: str = "train", val_split: str = "val",
                 img_suffix: str | Sequence[str] | None = None,
                 mask_suffix: str | Sequence[str] | None = None,
                 allow_unpaired: bool = False) -> None:
        super().__init__(split=split, transforms=transforms, ignore_index=ignore_index,
                         num_classes=num_classes)
        self.root = Path(root)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.base_size = tuple(base_size) if base_size is not None else None
        self.folder_layout = FolderLayout(
            root=root, image_dir=image_dir, mask_dir=mask_dir, train_split=train_split,
            val_split=val_split, split_files=split_files, val_fraction=val_fraction, seed=seed,
            img_suffix=img_suffix, mask_suffix=mask_suffix)
        names = self._class_names(class_names, classes_file, num_classes)
        self._palette_option = palette
        if palette is not None:
            self.palette = [tuple(int(c) for c in colour) for colour in palette]
        self._colour_table = self._make_colour_table(mask_palette, colour_masks, names)
        self._lut = self._mask_lut(mask_map)
        self.mask_map = None if mask_map is None else {int(k): int(v) for k, v in mask_map.items()}
        self.scan = self.folder_layout.scan(split)
        self.layout = self.scan.layout
        self.samples = self._accept(self.scan, bool(allow_unpaired))
        binary_checked = False
        if names is None:
            if self.mask_map is None and self._colour_table is None:
                self._check_binary_masks()
                binary_checked = True
            names = self._infer_class_names()
        self.class_names = names
        self._check_palettes(mask_palette)
        self.check_num_classes()
        if not binary_checked and self.mask_map is None and self._colour_table is None:
            self._check_binary_masks()
        if self._colour_table is None:
            # Read one JPEG mask now: the lossy-mask warning is then given here, once, before
            # loader workers fork (they inherit that it was given), and a JPEG mask that cannot
            # be repaired stops construction instead of a worker.
            jpeg = next((mask for _, mask in self.samples
                         if mask.suffix.lower() in JPEG_EXTENSIONS), None)
            if jpeg is not None:
                self._read_index_mask(jpeg)

    def load(self, index: int) -> Sample:
        image_path, mask_path = self.samples[index]
        image = read_image(image_path)
        return Sample(image=image, mask=self._read_mapped_mask(image_path, mask_path),
                      source=f"{mask_path} (image {image_path.name})", image_path=image_path)

    def _read_mapped_mask(self, image_path: Path, mask_path: Path) -> np.ndarray:
        """The mask as class values: colours through the palette, then ``mask_map``."""
        if self._colour_table is not None:
            mask = self._colour_table(read_colour_mask(mask_path),
                                      f"{mask_path} (image {image_path.name})")
        else:
            mask = self._read_index_mask(mask_path)
        if self._lut is not None:
            mask = self._remap(mask)
        return mask

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
    def _class_names(self, class_names, classes_file, num_classes) -> tuple[str, ...] | None:
        """The class names the options give, or None when the masks must tell."""
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
            if isinstance(class_names, str):
                raise ConfigError(f"dataset.class_names={class_names!r} must be a list, e.g. "
                                  "dataset.class_names='[background,cell]'.")
            return tuple(str(name) for name in class_names)
        if num_classes is not None:
            if int(num_classes) < 1:
                raise ConfigError(f"dataset.num_classes={num_classes} must be at least 1.")
            return tuple(f"class_{i}" for i in range(int(num_classes)))
        return None

    def _accept(self, scan: FolderScan, allow_unpaired: bool) -> list[tuple[Path, Path]]:
        if scan.missing_entries:
            raise DataError(
                f"{scan.list_file} lists {len(scan.missing_entries)} entr(ies) with no image or "
                f"mask in {scan.image_dir} and {scan.mask_dir}: {first_few(scan.missing_entries, 10)}. "
                "Fix the list, or the folders / suffixes it is read against (dataset.image_dir, "
                "dataset.mask_dir, dataset.img_suffix, dataset.mask_suffix).")
        if scan.problems:
            message = self.folder_layout.describe_unpaired(scan)
            if not allow_unpaired:
                allow = (f", or set dataset.allow_unpaired=true to use the {len(scan.pairs)} pairs "
                         "found" if scan.pairs else "")
                raise DataError(f"{message} Add the missing files or remove the unpaired ones"
                                f"{allow}.")
            log.warning(f"{message} dataset.allow_unpaired=true: the {split_text(scan)} uses "
                        f"the {len(scan.pairs)} pairs found.")
        if not scan.pairs:
            raise DataError(f"the {split_text(scan)} of the folder dataset at {self.root} is "
                            f"empty: no image in {scan.image_dir} has a mask in "
                            f"{scan.mask_dir}. {_HOW_TO}")
        log.info(f"folder dataset: {scan.describe()}")
        return scan.pairs

    def _infer_class_names(self) -> tuple[str, ...]:
        """``class_0 .. class_<max>`` from the largest value of the split's masks (after the
        palette and ``mask_map``; the ignore index left out)."""
        top = -1
        for image_path, mask_path in self.samples:
            mask = self._read_mapped_mask(image_path, mask_path)
            valid = mask[mask != self.ignore_index]
            if valid.size:
                top = max(top, int(valid.max()))
        scanned = f"the {len(self.samples)} masks of the {split_text(self.scan)}"
        if top < 1:
            held = "only the value 0" if top == 0 else "only the ignore index"
            raise DataError(
                f"dataset.num_classes is not set and {scanned} hold {held}, so the number of "
                "classes cannot be inferred. Set dataset.class_names=[...] (or "
                "dataset.num_classes), and check dataset.mask_map.")
        count = top + 1
        log.warning(
            f"dataset.num_classes is not set: inferred {count} classes (class_0 .. "
            f"class_{top}) from the largest mask value, {top}, in {scanned} ({self.root}; "
            f"{self.ignore_index} = ignore). Set dataset.class_names=[...] or "
            f"dataset.num_classes={count} to name them and skip this scan.")
        return tuple(f"class_{i}" for i in range(count))

    def _check_palettes(self, mask_palette) -> None:
        if self._palette_option is not None and (
                len(self.palette) != len(self.class_names)
                or any(len(c) != 3 for c in self.palette)):
            raise ConfigError(f"dataset.palette needs one [r, g, b] per class "
                              f"({len(self.class_names)}), got {self._palette_option}.")
        if mask_palette is not None and self._colour_table is not None:
            table = self._colour_table
            table.names = list(self.class_names)
            if len(table) < len(self.class_names):
                raise ConfigError(
                    f"dataset.mask_palette has {len(table)} colours but the dataset has "
                    f"{len(self.class_names)} classes ({', '.join(self.class_names)}); give at "
                    "least one [r, g, b] per class, in class-index order.")
            if self.palette is None:  # draw pictures with the masks' own colours
                self.palette = [tuple(int(c) for c in colour)
                                for colour in table.colours[: len(self.class_names)]]

    def _make_colour_table(self, mask_palette, colour_masks: bool,
                           names: tuple[str, ...] | None) -> ColourTable | None:
        if mask_palette is not None:
            return ColourTable(mask_palette, what="dataset.mask_palette", names=names)
        if colour_masks:
            if self.palette is None:
                raise ConfigError(
                    "dataset.colour_masks=true maps mask colours with dataset.palette, which is "
                    "not set: give dataset.palette=[[r, g, b], ...] (one colour per class) or "
                    "dataset.mask_palette.")
            return ColourTable(self.palette, what="dataset.palette", names=names)
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


def split_text(scan: FolderScan) -> str:
    """``'train' split`` or ``'train' split (folder/list 'training')`` for messages."""
    return (f"{scan.split!r} split" if scan.name == scan.split
            else f"{scan.split!r} split ({scan.name!r})")
