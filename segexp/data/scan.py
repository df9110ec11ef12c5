"""One pass over a dataset split's masks as stored (``dataset.load``, no transforms): class pixel
counts, the images holding each class, every mask value found, ignored pixels and image sizes;
and class weights from those counts.

:func:`scan_masks` caches its result as JSON in a folder the caller gives, keyed by a fingerprint
of the dataset: its class, split and parameters, and the path, size and modification time of
every file its samples are read from (:meth:`SegmentationDataset.files`). A file rewritten,
added or removed changes the fingerprint, so a stale scan is never reused. A dataset that cannot
list its files is scanned every time.

``scripts/dataset_stats.py`` reports a scan; ``loss.class_weights=auto`` trains with weights from
one (:func:`segexp.losses.resolve_auto_class_weights`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from segexp.data.base import SegmentationDataset
from segexp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when MaskScan's fields or their meaning change
WEIGHT_METHODS = ("median", "inverse", "enet")
# What ``class_weights: auto`` means: median frequency balancing, see class_weights().
AUTO_METHOD = "median"
ENET_C = 1.02  # ENet's constant: weights 1 / ln(1.02 + p) lie in [1.0, 50.5]
MAX_WORKERS = 8  # threads reading masks (decoding releases the GIL)


@dataclass
class MaskScan:
    """What one pass over a split's masks found. Per-class lists are in class-index order."""

    class_names: list[str]
    ignore_index: int
    num_images: int
    pixels: list[int]  # pixels of each class
    images_with_class: list[int]  # images holding at least one pixel of the class
    # Labelled pixels (classes 0..C-1) of the images holding the class: median frequency's
    # denominator.
    pixels_of_images_with_class: list[int]
    ignored_pixels: int
    values: dict[int, int] = field(default_factory=dict)  # every mask value found -> pixels
    # Values that are neither a class (0..C-1) nor the ignore index -> the first mask holding it.
    unexpected: dict[int, str] = field(default_factory=dict)
    sizes: dict[tuple[int, int], int] = field(default_factory=dict)  # (height, width) -> images
    first_with_ignore: str = ""  # the first mask holding the ignore index, for messages
    # Samples that could not be read (scanned with skip_unreadable): [index, the error], in order.
    unreadable: list[tuple[int, str]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def frequency(self) -> np.ndarray:
        """Each class's share of the labelled pixels."""
        pixels = np.asarray(self.pixels, dtype=np.float64)
        return pixels / max(pixels.sum(), 1.0)

    def absent_classes(self) -> list[str]:
        return [name for name, count in zip(self.class_names, self.pixels, strict=True) if count == 0]

    def check_values(self, split: str = "") -> None:
        """A clear :class:`DataError` if any mask holds a value that is neither a class nor the
        ignore index (training would stop at the first such mask)."""
        if not self.unexpected:
            return
        listed = [f"{value} ({self.values.get(value, 0)} pixels, first in {source})"
                  for value, source in sorted(self.unexpected.items())[:10]]
        more = f" and {len(self.unexpected) - 10} more" if len(self.unexpected) > 10 else ""
        where = f"the {split} split's masks" if split else "the masks"
        raise DataError(
            f"{where} hold values outside the {self.num_classes} classes (valid: "
            f"0..{self.num_classes - 1}, and {self.ignore_index} = ignore): {'; '.join(listed)}"
            f"{more}. Fix dataset.num_classes / the class names, or remap the mask values "
            "(dataset.mask_map for folder datasets).")

    def check_binary_255(self, split: str = "") -> None:
        """A clear :class:`DataError` for masks that hold only 0 and the ignore index (255): a
        binary task stored as 0/255 would train with every foreground pixel ignored, and report
        a perfect score on the one class left. Checked over every mask of the split."""
        found = {v for v, n in self.values.items() if n}
        if self.num_classes < 2 or self.ignore_index not in found or not found <= {0, self.ignore_index}:
            return
        where = f"the {split} split's {self.num_images} masks" if split else f"all {self.num_images} masks"
        raise DataError(
            f"{where} hold only the values 0 and {self.ignore_index} (first with "
            f"{self.ignore_index}: {self.first_with_ignore}), but {self.ignore_index} is the ignore "
            f"index: those pixels would count nowhere, classes 1..{self.num_classes - 1} would never "
            "be seen, and the score would look perfect on class 0 alone. For a binary task stored "
            "as 0/255 set dataset.mask_map='{255: 1}' (with 2 classes); if 255 really marks pixels "
            "to ignore, the masks hold no foreground at all.")

    def report_unreadable(self, split: str, limit: int = 5) -> str:
        """"N of M samples ... cannot be read: first ..." for the log and for errors."""
        shown = "; ".join(message for _, message in self.unreadable[:limit])
        more = f" (and {len(self.unreadable) - limit} more)" if len(self.unreadable) > limit else ""
        total = self.num_images + len(self.unreadable)
        return (f"{len(self.unreadable)} of the {total} {split} samples cannot be read{more}: "
                f"{shown}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["unreadable"] = [[i, m] for i, m in self.unreadable]
        data["values"] = [[v, n] for v, n in self.values.items()]
        data["unexpected"] = [[v, s] for v, s in self.unexpected.items()]
        data["sizes"] = [[h, w, n] for (h, w), n in self.sizes.items()]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MaskScan:
        data = dict(data)
        data["values"] = {int(v): int(n) for v, n in data["values"]}
        data["unexpected"] = {int(v): str(s) for v, s in data["unexpected"]}
        data["sizes"] = {(int(h), int(w)): int(n) for h, w, n in data["sizes"]}
        data["unreadable"] = [(int(i), str(m)) for i, m in data.get("unreadable", [])]
        return cls(**data)


# -- scanning -----------------------------------------------------------------------------------
def base_dataset(dataset) -> SegmentationDataset:
    """The dataset under wrappers such as :class:`segexp.data.mixing.MixedDataset`."""
    while not isinstance(dataset, SegmentationDataset) and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if not isinstance(dataset, SegmentationDataset):
        raise ConfigError(f"{type(dataset).__name__} is not a segexp dataset (SegmentationDataset), "
                          "so its masks cannot be scanned.")
    return dataset


def _values_of(dataset: SegmentationDataset, index: int):
    """(mask values, their pixel counts, (height, width), source) of one stored sample."""
    sample = dataset.load(index)
    mask = np.asarray(sample.mask)
    if sample.image.shape[:2] != mask.shape[:2]:
        dataset.check_sample(sample)  # raises the size error, naming the file
    flat = mask.ravel().astype(np.int64, copy=False)
    if flat.size and 0 <= flat.min() and flat.max() < 1 << 16:
        counts = np.bincount(flat)
        values = np.flatnonzero(counts)
        counts = counts[values]
    else:  # negative or very large values: rare, and np.unique copes with any
        values, counts = np.unique(flat, return_counts=True)
    size = (int(sample.image.shape[0]), int(sample.image.shape[1]))
    return values, counts, size, sample.source


def _values_or_error(dataset: SegmentationDataset, index: int, skip_unreadable: bool):
    try:
        return _values_of(dataset, index)
    except DataError as err:
        if not skip_unreadable:
            raise
        return err


def _scan(dataset: SegmentationDataset, max_images: int | None, progress: bool,
          workers: int, skip_unreadable: bool = False) -> MaskScan:
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    num_classes, ignore = dataset.num_classes, int(dataset.ignore_index)
    pixels = np.zeros(num_classes, np.int64)
    images_with = np.zeros(num_classes, np.int64)
    pixels_of_images_with = np.zeros(num_classes, np.int64)
    found: dict[int, int] = {}
    unexpected: dict[int, str] = {}
    sizes: dict[tuple[int, int], int] = {}
    ignored = 0
    first_with_ignore = ""
    unreadable: list[tuple[int, str]] = []
    bar = tqdm(total=n, desc=f"scanning the {dataset.split} masks", unit="img",
               disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # map keeps the index order, so "the first mask holding a value" is deterministic.
        read = pool.map(lambda i: _values_or_error(dataset, i, skip_unreadable), range(n))
        for index, result in enumerate(read):
            bar.update()
            if isinstance(result, DataError):
                unreadable.append((index, str(result)))
                continue
            values, counts, size, source = result
            per_class = np.zeros(num_classes, np.int64)
            for value, count in zip(values.tolist(), counts.tolist(), strict=True):
                found[value] = found.get(value, 0) + count
                if 0 <= value < num_classes:
                    per_class[value] = count
                elif value == ignore:
                    ignored += count
                    first_with_ignore = first_with_ignore or source
                else:
                    unexpected.setdefault(value, source)
            pixels += per_class
            images_with += per_class > 0
            pixels_of_images_with += (per_class > 0) * per_class.sum()
            sizes[size] = sizes.get(size, 0) + 1
    bar.close()
    return MaskScan(class_names=[str(c) for c in dataset.class_names], ignore_index=ignore,
                    num_images=n - len(unreadable), unreadable=unreadable,
                    pixels=pixels.tolist(), images_with_class=images_with.tolist(),
                    pixels_of_images_with_class=pixels_of_images_with.tolist(),
                    ignored_pixels=ignored, values=dict(sorted(found.items())),
                    unexpected=unexpected, sizes=sizes, first_with_ignore=first_with_ignore)


def scan_masks(dataset, cache_dir: str | Path | None = None, max_images: int | None = None,
               progress: bool = True, workers: int | None = None,
               skip_unreadable: bool = False) -> MaskScan:
    """Scan the masks of ``dataset`` (the first ``max_images`` samples, or all), reusing the scan
    cached in ``cache_dir`` when the dataset's fingerprint still matches (None: no cache).
    ``workers`` threads read the samples (default: up to 8). Values outside the classes are
    reported in the result, not raised: call :meth:`MaskScan.check_values`. A sample that cannot
    be read (a truncated or damaged file, sizes that differ) raises its :class:`DataError`, or
    with ``skip_unreadable`` is listed in ``MaskScan.unreadable`` and left out of the counts."""
    dataset = base_dataset(dataset)
    if max_images is not None and max_images < 1:
        raise ConfigError(f"max_images={max_images} must be at least 1 (or None for all).")
    workers = min(MAX_WORKERS, os.cpu_count() or 1) if workers is None else int(workers)
    fingerprint = dataset_fingerprint(dataset, max_images) if cache_dir is not None else None
    if fingerprint is not None and fingerprint["files"] is None:
        log.info(f"{type(dataset).__name__} does not list its files, so its mask scan is not "
                 "cached (a changed file could not be noticed).")
        fingerprint = None
    path = None
    if fingerprint is not None:
        path = Path(cache_dir) / (f"mask_scan_{fingerprint['dataset']}_{dataset.split}_"
                                  f"{fingerprint['identity'][:12]}.json")
        cached = _read_cache(path, fingerprint)
        if cached is not None:
            if cached.unreadable and not skip_unreadable:  # scanned by a run that skipped them
                raise DataError(cached.unreadable[0][1])
            log.info(f"Mask scan of the {dataset.split} split read from {path}.")
            return cached
    scan = _scan(dataset, max_images, progress, workers, skip_unreadable)
    if path is not None:
        _write_cache(path, {"version": CACHE_VERSION, "fingerprint": fingerprint,
                            "scan": scan.to_json()})
        log.info(f"Mask scan of the {dataset.split} split cached in {path}.")
    return scan


# -- cache ----------------------------------------------------------------------------------
def _describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able, deterministic description of a dataset attribute, for the fingerprint."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        digest = hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest()
        return {"array": digest, "shape": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, Mapping):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_describe(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_describe(v, depth + 1) for v in value), key=repr)
    if depth < 4 and hasattr(value, "__dict__") and not callable(value):
        return {"type": type(value).__qualname__,
                **{k: _describe(v, depth + 1) for k, v in sorted(vars(value).items())}}
    return type(value).__qualname__


def dataset_fingerprint(dataset: SegmentationDataset,
                        max_images: int | None = None) -> dict[str, Any]:
    """``identity``: a hash of the dataset's class, split and parameters (its attributes, the
    transforms left out: they play no part in a scan); ``files``: a hash of (path, size,
    modification time) of every file :meth:`~SegmentationDataset.files` lists, or None when
    the dataset cannot list them."""
    params = {k: v for k, v in vars(dataset).items() if k != "transforms"}
    identity = json.dumps({"class": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
                           "split": dataset.split, "max_images": max_images,
                           "params": _describe(params)}, sort_keys=True)
    files = dataset.files()
    files_digest = None
    if files is not None:
        digest = hashlib.sha1()
        for path in files:
            try:
                stat = os.stat(path)
                entry = f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n"
            except OSError:  # missing: the scan itself reports it, naming the file
                entry = f"{path}\tmissing\n"
            digest.update(entry.encode())
        files_digest = digest.hexdigest()
    return {"dataset": type(dataset).__name__,
            "identity": hashlib.sha1(identity.encode()).hexdigest(), "files": files_digest}


def _read_cache(path: Path, fingerprint: dict[str, Any]) -> MaskScan | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning(f"ignoring the unreadable mask scan cache {path} ({err}); scanning again.")
        return None
    if data.get("version") != CACHE_VERSION or data.get("fingerprint") != fingerprint:
        log.info(f"The dataset changed since {path} was written; scanning its masks again.")
        return None
    try:
        return MaskScan.from_json(data["scan"])
    except (KeyError, TypeError, ValueError) as err:
        log.warning(f"ignoring the malformed mask scan cache {path} ({err}); scanning again.")
        return None


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    """Written to a temporary file then renamed, so processes scanning together (one per
    distributed rank) never read a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(data, indent=1))
    os.replace(partial, path)


# -- class weights ------------------------------------------------------------------------------
def class_weights(scan: MaskScan, method: str = AUTO_METHOD) -> np.ndarray:
    """Per-class loss weights from a scan; classes absent from the split weigh 0.

    - ``median``: median frequency balancing (Eigen & Fergus, ICCV 2015; SegNet, Badrinarayanan
      et al., TPAMI 2017): ``median(f) / f_c`` with ``f_c`` the class's pixels over the
      labelled pixels of the images holding it, the median over the present classes. The
      typical class weighs 1; the usual choice in the segmentation literature, and what
      ``class_weights: auto`` means.
    - ``inverse``: ``1 / freq_c`` (``freq_c`` the class's share of all labelled pixels), scaled
      so the present classes average 1. Unbounded: a class of one pixel in a million weighs
      about a million times the commonest.
    - ``enet``: ENet's ``1 / ln(1.02 + freq_c)`` (Paszke et al. 2016), bounded to [1, 50.5]:
      for splits where a few classes are extremely rare.
    """
    if method not in WEIGHT_METHODS:
        raise ConfigError(f"class weight method {method!r} is not one of "
                          f"{', '.join(WEIGHT_METHODS)} (auto = {AUTO_METHOD}).")
    pixels = np.asarray(scan.pixels, dtype=np.float64)
    present = pixels > 0
    weights = np.zeros_like(pixels)
    if not present.any():
        return weights
    if method == "inverse":
        freq = scan.frequency()
        weights[present] = 1.0 / freq[present]
        weights[present] /= weights[present].mean()
    elif method == "median":
        denominators = np.asarray(scan.pixels_of_images_with_class, dtype=np.float64)
        median_freq = pixels[present] / denominators[present]
        weights[present] = np.median(median_freq) / median_freq
    else:
        weights[present] = 1.0 / np.log(ENET_C + scan.frequency()[present])
    return weights
