"""DeepLabV3 decode head (Chen et al. 2017, "Rethinking Atrous Convolution"), as MMSegmentation's
ASPPHead: atrous spatial pyramid pooling on the deepest map, then a classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segexp.errors import IncompatibleBackboneError
from segexp.heads.common import Classifier, resize, resolve_single_index, select_features
from segexp.nn import ConvBNReLU, DepthwiseSeparableConvBNReLU

# Atrous rates per output stride of the map ASPP reads. The paper uses (6, 12, 18) at stride 16
# and doubles them when the stride halves; the leading 1 is the 1x1 branch.
DEFAULT_DILATIONS = {8: (1, 12, 24, 36), 16: (1, 6, 12, 18), 32: (1, 3, 6, 9)}


def default_dilations(head: str, reduction: int) -> tuple[int, ...]:
    """ASPP rates for a map at ``reduction``, or an error asking for explicit ``dilations``."""
    if reduction not in DEFAULT_DILATIONS:
        raise IncompatibleBackboneError(
            f"{head}: no default ASPP rates for a feature map at reduction {reduction} (known: "
            f"{sorted(DEFAULT_DILATIONS)}); pass dilations=[1, r1, r2, r3] explicitly.")
    return DEFAULT_DILATIONS[reduction]


class ASPP(nn.Module):
    """Image pooling + one branch per dilation (1 -> 1x1 conv, d > 1 -> 3x3 atrous conv, made
    depthwise-separable for DeepLabV3+), concatenated, then a 3x3 ConvBNReLU bottleneck."""

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int], *,
                 separable: bool = False, align_corners: bool = False,
                 project_channels: int | None = None, project_dropout: float = 0.0) -> None:
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.align_corners = align_corners
        # Note: BatchNorm on the 1x1 pooled map needs a batch of >= 2 in training mode.
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                        ConvBNReLU(in_channels, channels, 1))
        branches = []
        for d in self.dilations:
            if d == 1:
                branches.append(ConvBNReLU(in_channels, channels, 1))
            elif separable:
                branches.append(DepthwiseSeparableConvBNReLU(in_channels, channels, 3, dilation=d))
            else:
                branches.append(ConvBNReLU(in_channels, channels, 3, dilation=d))
        self.branches = nn.ModuleList(branches)
        concat = (len(self.dilations) + 1) * channels
        # torchvision's DeepLabV3 first projects the concatenation (1x1 conv + dropout 0.5);
        # MMSegmentation goes straight to the 3x3 bottleneck. None = MMSegmentation.
        self.project = None if project_channels is None else nn.Sequential(
            ConvBNReLU(concat, project_channels, 1), nn.Dropout(project_dropout))
        self.bottleneck = ConvBNReLU(project_channels or concat, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = resize(self.image_pool(x), x.shape[-2:], self.align_corners)
        out = torch.cat([pooled, *(b(x) for b in self.branches)], dim=1)
        return self.bottleneck(self.project(out) if self.project is not None else out)


class ASPPHead(nn.Module):
    """``dilations=None`` derives the rates from the chosen map's reduction (DEFAULT_DILATIONS)."""

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: int = -1, channels: int = 512,
                 dilations: Sequence[int] | None = None, dropout: float = 0.1,
                 project_channels: int | None = None, project_dropout: float = 0.0,
                 align_corners: bool = False) -> None:
        super().__init__()
        self.num_inputs = len(in_channels)
        self.in_index = resolve_single_index("ASPPHead", in_index, in_channels, in_reductions)
        self.reduction = in_reductions[self.in_index]
        if dilations is None:
            dilations = default_dilations("ASPPHead", self.reduction)
        self.aspp = ASPP(in_channels[self.in_index], channels, dilations,
                         align_corners=align_corners, project_channels=project_channels,
                         project_dropout=project_dropout)
        self.classifier = Classifier(channels, num_classes, dropout)

    @property
    def dilations(self) -> tuple[int, ...]:
        return self.aspp.dilations

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        (x,) = select_features(features, [self.in_index], self.num_inputs)
        return self.classifier(self.aspp(x))
