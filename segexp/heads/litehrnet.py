"""The Lite-HRNet segmentation head of OpenVINO Training Extensions' (OTX) lite_hrnet_s / 18 / x
recipes: an FCN head (``input_transform='multiple_select'``, ``enable_aggregator=True``) whose
input is the finest map of an *iterative aggregator* over all branches.

The aggregator is Lite-HRNet's ``IterativeHead`` (the official repository's head for pose): from
the deepest branch to the finest, the running map is upsampled (bilinear, align_corners=True),
added to the next branch and passed through a depthwise-separable 3x3 conv (depthwise + BN, then
pointwise + BN + ReLU) that projects it to the next branch's channels (the finest keeps its own).
The FCN part is OTX's ``FCNHead`` configuration: one 1x1 conv + BN to ``channels`` (OTX removes
the ReLU of the last conv), no concatenated input, no dropout, then the 1x1 classifier.
``channels`` defaults to the finest map's channels (OTX: 40 for Lite-HRNet-18, 60 for -s and -x).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segexp.errors import ConfigError, IncompatibleBackboneError
from segexp.heads.common import Classifier, resolve_in_index, select_features


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 conv + BN (no activation), pointwise 1x1 conv + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class IterativeAggregator(nn.Module):
    """Deep-to-fine aggregation of multi-resolution maps (Lite-HRNet's IterativeHead).

    ``min_channels`` (OTX's ``aggregator_min_channels``, used by lite_hrnet_x) widens thin
    branches with a 1x1 ConvBNReLU first; ``merge_norm`` (``None``, ``"channel"``,
    ``"spatial"``) L2-normalises both summands before each merge. ``forward`` returns the
    aggregated maps fine to deep.
    """

    def __init__(self, in_channels: Sequence[int], min_channels: int = 0,
                 merge_norm: str | None = None, align_corners: bool = True) -> None:
        super().__init__()
        if merge_norm not in (None, "none", "channel", "spatial"):
            raise ConfigError(f"IterativeAggregator: merge_norm={merge_norm}; choose null, "
                              "channel or spatial.")
        self.merge_norm = None if merge_norm == "none" else merge_norm
        self.align_corners = align_corners
        deep_first = list(in_channels)[::-1]
        widths = [max(c, min_channels) for c in deep_first]
        self.expanders = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, min_channels, 1, bias=False), nn.BatchNorm2d(min_channels),
                          nn.ReLU(inplace=True)) if c < min_channels else None
            for c in deep_first)
        self.projects = nn.ModuleList(
            SeparableConv(widths[i], widths[i + 1] if i + 1 < len(widths) else widths[i])
            for i in range(len(widths)))
        self.out_channels = widths[-1]

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge_norm == "channel":
            return F.normalize(x, dim=1)
        if self.merge_norm == "spatial":
            return F.normalize(x.flatten(2), dim=2).view_as(x)
        return x

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outs, last = [], None
        for i, x in enumerate(reversed(features)):
            if self.expanders[i] is not None:
                x = self.expanders[i](x)
            if last is not None:
                last = F.interpolate(last, size=x.shape[-2:], mode="bilinear",
                                     align_corners=self.align_corners)
                x = self._norm(x) + self._norm(last)
            last = self.projects[i](x)
            outs.append(last)
        return outs[::-1]


class LiteHRNetHead(nn.Module):
    """Aggregator over the chosen maps (all by default), then 1x1 conv + BN, then classifier.

    Logits come out at the finest chosen map's resolution (stride 4 on Lite-HRNet-18/30). Works on
    any backbone whose chosen maps go fine to deep (ResNet, ConvNeXt too).
    """

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: Sequence[int] | None = None, channels: int | None = None,
                 min_channels: int = 0, merge_norm: str | None = None, dropout: float = 0.0,
                 aggregator_align_corners: bool = True, align_corners: bool = False) -> None:
        super().__init__()
        self.num_inputs = len(in_channels)
        if in_index is None:
            in_index = list(range(self.num_inputs))
        self.in_index = resolve_in_index("LiteHRNetHead", in_index, in_channels, in_reductions)
        reds = [in_reductions[i] for i in self.in_index]
        if reds != sorted(reds) or len(set(self.in_index)) != len(self.in_index):
            raise IncompatibleBackboneError(
                f"LiteHRNetHead: in_index must name distinct maps going fine to deep, but selects "
                f"reductions {reds}. It is made for backbone=litehrnet_18/litehrnet_30/"
                "litehrnet_s (also fits resnet*, convnext_*, swin_*).")
        self.reduction = reds[0]
        self.align_corners = align_corners  # the logits are not resized here
        self.aggregator = IterativeAggregator([in_channels[i] for i in self.in_index],
                                              min_channels=min_channels, merge_norm=merge_norm,
                                              align_corners=aggregator_align_corners)
        c_in = self.aggregator.out_channels
        channels = c_in if channels is None else int(channels)
        self.channels = channels
        # OTX's FCNHead(num_convs=1, kernel_size=1) with the last activation removed.
        self.conv = nn.Sequential(nn.Conv2d(c_in, channels, 1, bias=False),
                                  nn.BatchNorm2d(channels))
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        xs = select_features(features, self.in_index, self.num_inputs)
        return self.classifier(self.conv(self.aggregator(xs)[0]))
