"""Validation images that are also training images: the same file read by both splits
(overlapping split lists or folders, ``train_split=trainval`` beside ``val_split=val``) or a copy
of a training image under another name (a split made by copying files). Validation scores on
them measure how well the model fits images it trained on, which looks like a good model and is
not; the engine warns before training and records the count (``experiment.check_held_out``).

A sample's first path is its image: the convention of every segexp dataset's ``samples``. Copies
are looked for among images only (masks repeat legitimately, e.g. empty ones): by file size,
then by a hash of the first 64 KiB, then of the whole file, so that only images of a size some
validation image has are read, and only their start unless that matches."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

from segexp.data.scan import base_dataset


def _paths(entry) -> list[Path]:
    items = entry if isinstance(entry, (tuple, list)) else (entry,)
    return [item for item in items if isinstance(item, Path)]


def _sample_files(dataset) -> tuple[list[list[Path]], bool]:
    """Each sample's files, image first, and True; for a dataset without per-sample entries
    (``samples``), each of its files alone and False: which of them are images is unknown."""
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and len(samples) == len(dataset):
        return [_paths(entry) for entry in samples], True
    return [[path] for path in dataset.files() or ()], False


def _size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


PREFIX = 1 << 16  # bytes hashed first: files of one size (uncompressed TIFF, BMP) differ early


def _digest(path: Path, limit: int | None = None) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        if limit is not None:
            digest.update(file.read(limit))
        else:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return digest.digest()


class _TrainingImages:
    """The training images by file size, then by the hash of their first bytes (each computed
    once, for the sizes a validation image has), then by their whole content."""

    def __init__(self, images: list[Path]) -> None:
        self.by_size: dict[int, list[Path]] = defaultdict(list)
        for path in images:
            if size := _size(path):
                self.by_size[size].append(path)
        self.by_prefix: dict[int, dict[bytes, list[Path]]] = {}
        self.full: dict[Path, bytes] = {}

    def holds_a_copy_of(self, image: Path) -> bool:
        size = _size(image)
        if size not in self.by_size:
            return False
        if size not in self.by_prefix:
            groups: dict[bytes, list[Path]] = defaultdict(list)
            for path in self.by_size[size]:
                groups[_digest(path, PREFIX)].append(path)
            self.by_prefix[size] = groups
        same_start = self.by_prefix[size].get(_digest(image, PREFIX), [])
        if not same_start:
            return False
        whole = _digest(image)
        for path in same_start:
            if path not in self.full:
                self.full[path] = _digest(path)
            if self.full[path] == whole:
                return True
        return False


def validation_images_in_training(train_set, val_set) -> list[Path]:
    """Per validation sample that is also training data, its first such file (in validation
    order). Generated data (no files): none."""
    train_samples, train_images_known = _sample_files(base_dataset(train_set))
    train_files = {os.path.abspath(path) for files in train_samples for path in files}
    if not train_files:
        return []
    val_samples, val_images_known = _sample_files(base_dataset(val_set))
    # Copies only among images: masks (and files of unknown role) repeat legitimately.
    training_images = _TrainingImages([files[0] for files in train_samples if files]
                                      if train_images_known and val_images_known else [])
    shared = []
    for files in val_samples:
        same = next((path for path in files if os.path.abspath(path) in train_files), None)
        if same is None and files and training_images.holds_a_copy_of(files[0]):
            same = files[0]
        if same is not None:
            shared.append(same)
    return shared
