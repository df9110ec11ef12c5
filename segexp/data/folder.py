"""A user's own data: images and class-index masks in folders, paired by file stem."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

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
    """

    def __init__(self, split: str = "train", transforms=None, ignore_index: int = IGNORE_INDEX,
                 num_classes: int | None = None, crop_size: Sequence[int] = (512, 512),
                 base_size: Sequence[int] | None = None, root: str | Path = "data/folder",
                 class_names: Sequence[str] | None = None, classes_file: str | Path | None = None,
                 split_files: str | Path | None = "splits", val_fraction: float = 0.1,
                 seed: int = 0, mask_map: Mapping[int, int] | None = None,
                 palette: Sequence[Sequence[int]] | None = None) -> None:
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
        self._lut = self._mask_lut(mask_map)
        self.mask_map = None if mask_map is None else {int(k): int(v) for k, v in mask_map.items()}
        self.samples, self.layout = self._find_samples(split, split_files, float(val_fraction),
                                                       int(seed))
        self.check_num_classes()
        if self.mask_map is None:
            self._check_binary_masks()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Sample:
        image_path, mask_path = self.samples[index]
        image = read_image(image_path)
        mask = read_mask(mask_path)
        if self._lut is not None:
            mask = self._remap(mask)
        return Sample(image=image, mask=mask, source=f"{mask_path} (image {image_path.name})")

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
            values = set(np.unique(read_mask(mask_path)).tolist())
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
