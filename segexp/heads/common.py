"""Building blocks shared by the decode heads.

A head receives the backbone's FULL ``in_channels``/``in_reductions`` lists and picks the maps it
uses with ``in_index`` (negative indices count from the deepest map, so one config fits ResNet's 5
maps and ConvNeXt's 4). ``resolve_in_index`` checks the choice once, in ``__init__``, and raises
``IncompatibleBackboneError`` with a message a user can act on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segexp.errors import IncompatibleBackboneError
from segexp.nn import ConvBNReLU


def resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize to ``size`` (a no-op when already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class PyramidPoolingModule(nn.Module):
    """PSPNet's pyramid pooling (also UPerNet's top level).

    For each scale s: adaptive average pool to s x s, 1x1 ConvBNReLU to ``channels``, bilinear
    upsample back. Returns the input concatenated with all branches
    (``out_channels = in_channels + len(pool_scales) * channels``).
    Note: BatchNorm on the 1x1-pooled branch needs a batch of >= 2 in training mode.
    """

    def __init__(self, in_channels: int, channels: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), align_corners: bool = False) -> None:
        super().__init__()
        self.pool_scales = tuple(int(s) for s in pool_scales)
        self.align_corners = align_corners
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels, 1))
            for s in self.pool_scales
        )
        self.out_channels = in_channels + len(self.pool_scales) * channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [resize(branch(x), size, self.align_corners) for branch in self.branches]
        return torch.cat([x, *pooled], dim=1)


class Classifier(nn.Sequential):
    """Dropout2d then a 1x1 conv to class logits, as every MMSegmentation decode head ends."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__(nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
                         nn.Conv2d(channels, num_classes, 1))
        # Small init so the first logits are near uniform (MMSegmentation: normal, std 0.01).
        nn.init.normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def _describe(in_channels: Sequence[int], in_reductions: Sequence[int]) -> str:
    return (f"{len(in_channels)} feature map(s) with channels {list(in_channels)} "
            f"at reductions {list(in_reductions)}")


def resolve_in_index(head: str, in_index: int | Sequence[int], in_channels: Sequence[int],
                     in_reductions: Sequence[int]) -> list[int]:
    """Turn ``in_index`` (int or list, negatives from the deepest) into non-negative indices.

    Raises ``IncompatibleBackboneError`` naming the head, what it asked for and what the backbone
    gives when an index is out of range.
    """
    if len(in_channels) != len(in_reductions):
        raise IncompatibleBackboneError(
            f"{head}: in_channels {list(in_channels)} and in_reductions {list(in_reductions)} "
            "must have one entry per feature map.")
    indices = [int(in_index)] if isinstance(in_index, int) else [int(i) for i in in_index]
    n = len(in_channels)
    if not indices:
        raise IncompatibleBackboneError(f"{head}: in_index is empty; it must name a feature map.")
    for i in indices:
        if not -n <= i < n:
            needed = -i if i < 0 else i + 1
            raise IncompatibleBackboneError(
                f"{head}: in_index {i} is out of range: it needs at least {needed} feature maps, "
                f"but the backbone gives {_describe(in_channels, in_reductions)}. "
                f"Choose in_index within [-{n}, {n - 1}] or another backbone.")
    return [i % n for i in indices]


def resolve_single_index(head: str, in_index: int | Sequence[int], in_channels: Sequence[int],
                         in_reductions: Sequence[int]) -> int:
    """Like ``resolve_in_index`` for heads that read exactly one map."""
    indices = resolve_in_index(head, in_index, in_channels, in_reductions)
    if len(indices) != 1:
        raise IncompatibleBackboneError(
            f"{head}: reads one feature map, but in_index={list(indices)} names {len(indices)}.")
    return indices[0]


def select_features(features: Sequence[torch.Tensor], indices: Sequence[int],
                    expected: int) -> list[torch.Tensor]:
    """Pick ``features[i]`` for ``indices``, checking the backbone returned the declared maps."""
    if len(features) != expected:
        raise ValueError(f"head was built for {expected} feature maps but got {len(features)}; "
                         "build it with the backbone's full channels/reductions lists.")
    return [features[i] for i in indices]
