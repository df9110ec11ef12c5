"""PSPNet decode head (Zhao et al. 2017, "Pyramid Scene Parsing Network"), as MMSegmentation's
PSPHead: pyramid pooling on the deepest map, 3x3 bottleneck, classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segexp.heads.common import Classifier, PyramidPoolingModule, resolve_single_index, select_features
from segexp.nn import ConvBNReLU


class PSPHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: int = -1, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 align_corners: bool = False) -> None:
        super().__init__()
        self.num_inputs = len(in_channels)
        self.in_index = resolve_single_index("PSPHead", in_index, in_channels, in_reductions)
        self.reduction = in_reductions[self.in_index]
        self.ppm = PyramidPoolingModule(in_channels[self.in_index], channels, pool_scales,
                                        align_corners)
        self.bottleneck = ConvBNReLU(self.ppm.out_channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        (x,) = select_features(features, [self.in_index], self.num_inputs)
        return self.classifier(self.bottleneck(self.ppm(x)))
