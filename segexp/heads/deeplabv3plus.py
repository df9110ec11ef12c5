"""DeepLabV3+ decode head (Chen et al. 2018, "Encoder-Decoder with Atrous Separable Convolution"),
as MMSegmentation's DepthwiseSeparableASPPHead.

Separable ASPP on the deepest map; a low-level branch from the map at reduction 4 (1x1 conv to 48
channels, few so they do not outweigh the semantic features); upsample, concat, two separable 3x3
convs, classify. Output is at the low-level map's reduction (4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segexp.errors import IncompatibleBackboneError
from segexp.heads.aspp import ASPP, default_dilations
from segexp.heads.common import Classifier, resize, resolve_single_index, select_features
from segexp.nn import ConvBNReLU, DepthwiseSeparableConvBNReLU


class DeepLabV3PlusHead(nn.Module):
    """``c1_index=None`` picks the first map at reduction ``c1_reduction`` (4) as low-level input;
    ``dilations=None`` derives the ASPP rates from the deepest map's reduction."""

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: int = -1, channels: int = 512,
                 dilations: Sequence[int] | None = None, c1_index: int | None = None,
                 c1_reduction: int = 4, c1_channels: int = 48, dropout: float = 0.1,
                 align_corners: bool = False) -> None:
        super().__init__()
        name = "DeepLabV3PlusHead"
        self.num_inputs = len(in_channels)
        self.align_corners = align_corners
        self.in_index = resolve_single_index(name, in_index, in_channels, in_reductions)
        if c1_index is None:
            matches = [i for i, r in enumerate(in_reductions) if r == c1_reduction]
            if not matches:
                raise IncompatibleBackboneError(
                    f"{name}: its low-level branch needs a feature map at reduction "
                    f"{c1_reduction}, but the backbone gives reductions {list(in_reductions)} "
                    f"(channels {list(in_channels)}). Pass c1_index to pick another map, or use "
                    "a backbone with a stride-4 stage.")
            c1_index = matches[0]
        self.c1_index = resolve_single_index(name, c1_index, in_channels, in_reductions)
        if in_reductions[self.c1_index] > in_reductions[self.in_index]:
            raise IncompatibleBackboneError(
                f"{name}: the low-level map (index {self.c1_index}, reduction "
                f"{in_reductions[self.c1_index]}) must not be coarser than the ASPP map "
                f"(index {self.in_index}, reduction {in_reductions[self.in_index]}).")
        self.reduction = in_reductions[self.c1_index]
        if dilations is None:
            dilations = default_dilations(name, in_reductions[self.in_index])
        self.aspp = ASPP(in_channels[self.in_index], channels, dilations, separable=True,
                         align_corners=align_corners)
        self.c1_bottleneck = ConvBNReLU(in_channels[self.c1_index], c1_channels, 1)
        self.sep_bottleneck = nn.Sequential(
            DepthwiseSeparableConvBNReLU(channels + c1_channels, channels, 3),
            DepthwiseSeparableConvBNReLU(channels, channels, 3),
        )
        self.classifier = Classifier(channels, num_classes, dropout)

    @property
    def dilations(self) -> tuple[int, ...]:
        return self.aspp.dilations

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        c1, x = select_features(features, [self.c1_index, self.in_index], self.num_inputs)
        low = self.c1_bottleneck(c1)
        high = resize(self.aspp(x), low.shape[-2:], self.align_corners)
        return self.classifier(self.sep_bottleneck(torch.cat([high, low], dim=1)))
