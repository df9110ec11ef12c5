"""Image mixing for training (the OpenVINO segmentation recipes' "mixing images"): CutMix and
ClassMix between two already augmented training samples, as a dataset wrapper.

Mixing needs a second sample, which a per-sample transform cannot fetch, so it lives here rather
than in ``segexp.data.transforms``; torchvision's ``v2.CutMix``/``v2.MixUp`` mix whole batches
of classification labels (one-hot vectors), not masks.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from torch.utils.data import Dataset

from segexp.errors import ConfigError, DataError

MODES = ("cutmix", "classmix")


def derive_seed(seed: int, tag: str) -> int:
    """A stable 31-bit seed for one use (``tag``) of a sample's augmentation seed."""
    return zlib.crc32(f"{tag}:{seed}".encode()) & 0x7FFFFFFF


class MixedDataset(Dataset):
    """Wraps a training dataset; with probability ``prob`` a sample is mixed with a second one.

    ``dataset[(index, seed)]`` returns the wrapped dataset's own ``(index, seed)`` sample (already
    augmented by its transforms); a generator seeded from ``seed`` then decides whether to mix,
    picks the second sample (another index, uniformly; fetched with a seed derived from ``seed``)
    and the mixing region, so the result depends only on ``(index, seed)``, as the wrapped
    dataset's augmentation does. An int index mixes with torch's global RNG instead.

    - ``cutmix`` (Yun et al., ICCV 2019): ``lam ~ Beta(alpha, alpha)`` (``alpha=1``: uniform), a
      box of ``sqrt(1 - lam)`` times each side centred at a uniform random pixel and clipped to
      the image (CutMix's ``rand_bbox``); the second image *and* mask are pasted inside it.
    - ``classmix`` (Olsson et al., WACV 2021): ``ceil(C / 2)`` of the ``C`` classes present in
      the second mask (``ignore_index`` is not a class) are chosen at random, and the second
      sample's pixels of those classes, image and mask, are pasted.

    Every output pixel takes colour and label from the same sample, so masks stay true to the
    pixels. Both samples must have the same size (training crops do). Everything else
    (``__len__``, ``class_names``, ``palette``, ``colours``, ``ignore_index``, ``num_classes``,
    ``crop_size``, ``base_size``, ...) is the wrapped dataset's.
    """

    def __init__(self, dataset: Dataset, mode: str = "cutmix", prob: float = 0.5,
                 alpha: float = 1.0, ignore_index: int | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"mixing mode '{mode}' is not one of {', '.join(MODES)}; set "
                              "transforms.mix.mode to one of them (or transforms.mix=null).")
        if not 0.0 <= float(prob) <= 1.0:
            raise ConfigError(f"transforms.mix.prob={prob} is not a probability (0..1).")
        if float(alpha) <= 0:
            raise ConfigError(f"transforms.mix.alpha={alpha} must be > 0 (Beta distribution).")
        self.dataset = dataset
        self.mode = mode
        self.prob = float(prob)
        self.alpha = float(alpha)
        self._ignore_index = ignore_index

    # -- pass-through -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found on the wrapper: class_names, palette, colours,
        # num_classes, crop_size, base_size, transforms, ... come from the wrapped dataset.
        if name.startswith("__") or name == "dataset":  # unpickling: no self.dataset yet
            raise AttributeError(name)
        return getattr(self.dataset, name)

    @property
    def ignore_index(self) -> int:
        if self._ignore_index is not None:
            return self._ignore_index
        return getattr(self.dataset, "ignore_index", 255)

    def __repr__(self) -> str:
        return f"MixedDataset({self.dataset!r}, mode={self.mode!r}, prob={self.prob})"

    # -- mixing -----------------------------------------------------------------------------------
    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, mask = self.dataset[item]
        if self.prob <= 0.0:
            return image, mask
        if seed is None:
            return self._mix(index, image, mask, None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "mix"))
            return self._mix(index, image, mask, derive_seed(seed, "mix-second"))

    def _mix(self, index: int, image: torch.Tensor, mask: torch.Tensor,
             second_seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws from torch's global RNG (seeded by the caller when the sample has a seed)."""
        if float(torch.rand(())) >= self.prob:
            return image, mask
        length = len(self.dataset)
        other = int(torch.randint(0, max(length - 1, 1), ()))
        if length > 1 and other >= index:  # any index but this one
            other += 1
        image2, mask2 = self.dataset[other if second_seed is None else (other, second_seed)]
        if image2.shape != image.shape or mask2.shape != mask.shape:
            raise DataError(
                f"{self.mode} mixes samples of one size, but sample {index} is "
                f"{tuple(image.shape[-2:])} and sample {other} is {tuple(image2.shape[-2:])}. Use "
                "a training pipeline that crops every sample to dataset.crop_size (e.g. "
                "transforms=mmseg), or transforms.mix=null.")
        region = self.cutmix_region(mask) if self.mode == "cutmix" else self.classmix_region(mask2)
        return (torch.where(region, image2, image), torch.where(region, mask2, mask))

    def cutmix_region(self, mask: torch.Tensor) -> torch.Tensor:
        """CutMix's ``rand_bbox``: a boolean ``HxW`` box of area ratio about ``1 - lam``."""
        height, width = mask.shape[-2:]
        if self.alpha == 1.0:
            lam = float(torch.rand(()))  # Beta(1, 1)
        else:
            lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = int(torch.randint(0, height, ())), int(torch.randint(0, width, ()))
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        region = torch.zeros(mask.shape[-2:], dtype=torch.bool, device=mask.device)
        region[y1:y2, x1:x2] = True
        return region

    def classmix_region(self, mask2: torch.Tensor) -> torch.Tensor:
        """ClassMix: the pixels of ``ceil(C / 2)`` random classes of the second mask."""
        classes = torch.unique(mask2)
        classes = classes[classes != self.ignore_index]
        chosen = classes[torch.randperm(classes.numel())[: (classes.numel() + 1) // 2]
                         .to(classes.device)]
        return torch.isin(mask2, chosen)
