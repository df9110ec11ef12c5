"""A training sampler that a resumed run can restart mid-epoch, reproducing the same batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from segexp.data.base import seed_for


class ResumableSampler(Sampler):
    """Shuffles by (seed, epoch) and yields ``(index, augmentation_seed)`` pairs.

    The order and every augmentation seed depend only on the run seed, the epoch and the sample,
    so skipping the first ``start`` samples of an epoch (``set_epoch(epoch, start)``) gives a
    resumed run exactly the batches an uninterrupted run would have seen next.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True) -> None:
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(seed_for(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        epoch_seed = seed_for(self.seed + 1, self.epoch)
        for index in order[self.start:]:
            yield index, seed_for(epoch_seed, index)

    def __len__(self) -> int:
        return max(self.length - self.start, 0)
