"""UPerNet decode head (Xiao et al. 2018, "Unified Perceptual Parsing"), as MMSegmentation's
UPerHead: PPM on the deepest map + FPN over the others, all levels fused at the finest one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segexp.errors import IncompatibleBackboneError
from segexp.heads.common import Classifier, PyramidPoolingModule, resize, resolve_in_index, select_features
from segexp.nn import ConvBNReLU


class UPerHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: Sequence[int] = (-4, -3, -2, -1), channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 align_corners: bool = False) -> None:
        super().__init__()
        self.num_inputs = len(in_channels)
        self.align_corners = align_corners
        self.in_index = resolve_in_index("UPerHead", in_index, in_channels, in_reductions)
        if len(self.in_index) < 2:
            raise IncompatibleBackboneError(
                f"UPerHead: needs at least 2 feature maps (4 by default), in_index={in_index} "
                "names fewer.")
        chans = [in_channels[i] for i in self.in_index]
        reds = [in_reductions[i] for i in self.in_index]
        if reds != sorted(reds):
            raise IncompatibleBackboneError(
                f"UPerHead: in_index must go shallow to deep, but selects reductions {reds}.")
        self.reduction = reds[0]
        # Top level: pyramid pooling on the deepest map, then a 3x3 bottleneck.
        self.ppm = PyramidPoolingModule(chans[-1], channels, pool_scales, align_corners)
        self.ppm_bottleneck = ConvBNReLU(self.ppm.out_channels, channels, 3)
        # Other levels: 1x1 lateral convs, top-down sum, 3x3 smoothing convs (FPN).
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in chans[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in chans[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(chans) * channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    @property
    def pool_scales(self) -> tuple[int, ...]:
        return self.ppm.pool_scales

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        xs = select_features(features, self.in_index, self.num_inputs)
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, xs[:-1], strict=True)]
        laterals.append(self.ppm_bottleneck(self.ppm(xs[-1])))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse semantics into finer levels
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:],
                                                       self.align_corners)
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1], strict=True)]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        fused = torch.cat([resize(o, size, self.align_corners) for o in outs], dim=1)
        return self.classifier(self.fpn_bottleneck(fused))
