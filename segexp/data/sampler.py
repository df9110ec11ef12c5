"""A training sampler that a resumed run can restart mid-epoch, reproducing the same batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from segexp.runtime import seed_for


class ResumableSampler(Sampler):
    """Shuffles by (seed, epoch) and yields ``(index, augmentation_seed)`` pairs.

    The order and every augmentation seed depend only on the run seed, the epoch and the sample,
    so skipping the first ``start`` samples of an epoch (``set_epoch(epoch, start)``) gives a
    resumed run exactly the batches an uninterrupted run would have seen next.

    Distributed (``num_replicas`` > 1), as torch's DistributedSampler: every rank draws the same
    epoch order and takes every ``num_replicas``-th sample from position ``rank``. The tail that
    does not divide evenly is dropped, so ranks never repeat a sample. Batch ``k`` of all ranks
    together is then exactly batch ``k`` of one process with a ``num_replicas`` times larger
    batch: the same samples with the same augmentation.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 num_replicas: int = 1) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas}).")
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.num_replicas = rank, num_replicas
        self.epoch = 0
        self.start = 0

    @property
    def samples_per_replica(self) -> int:
        """Samples this rank sees in a whole epoch."""
        return self.length // self.num_replicas

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """``start``: samples of this rank's share already used this epoch (a resumed run)."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(seed_for(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        epoch_seed = seed_for(self.seed + 1, self.epoch)
        share = order[self.rank:self.samples_per_replica * self.num_replicas:self.num_replicas]
        for index in share[self.start:]:
            yield index, seed_for(epoch_seed, index)

    def __len__(self) -> int:
        return max(self.samples_per_replica - self.start, 0)


class ContiguousShardSampler(Sampler):
    """Evaluation split over ranks without padding: rank ``r`` takes the ``r``-th of
    ``num_replicas`` contiguous blocks, so every image is evaluated exactly once (torch's
    DistributedSampler repeats images to even the ranks out, which would count them twice) and
    rank 0 holds the first images, the ones a single process would draw."""

    def __init__(self, length: int, rank: int = 0, num_replicas: int = 1) -> None:
        self.begin = length * rank // num_replicas
        self.end = length * (rank + 1) // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin
