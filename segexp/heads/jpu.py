"""Joint Pyramid Upsampling neck of FastFCN (Wu et al. 2019, "FastFCN: Rethinking Dilated
Convolution in the Backbone for Semantic Segmentation"), as MMSegmentation's ``JPU``.

FastFCN keeps the backbone at output stride 32 (no dilation, ~3x cheaper than a dilated
ResNet) and recovers a stride-8 map for the decode head with the JPU: the three deepest maps go
through a 3x3 ConvBNReLU each (``mid_channels``), are upsampled to the shallowest one's size and
concatenated, then four depthwise-separable 3x3 convs with dilations 1, 2, 4, 8 run in parallel and
are concatenated again (``len(dilations) * mid_channels`` = 2048 channels at stride 8).

Built by the Segmentor as ``neck(in_channels=backbone.channels, in_reductions=backbone.reductions)``.
Like MMSegmentation's JPU it returns the backbone's maps up to the deepest one it read, that one
replaced by the JPU feature: the JPU output is always last, so the decode head reads it with
``in_index: -1`` and the auxiliary FCN head still reads the backbone's stride-16 map with
``in_index: -2`` (ResNet-50: channels [64, 256, 512, 1024, 2048] at strides [2, 4, 8, 16, 8]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segexp.errors import IncompatibleBackboneError
from segexp.heads.common import resize, resolve_in_index
from segexp.nn import ConvBNReLU


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise kxk conv + BN (no activation), then pointwise 1x1 conv + BN + ReLU: MMCV's
    ``DepthwiseSeparableConvModule`` as the JPU configures it (``dw_act_cfg=None``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *,
                 dilation: int = 1) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, in_channels, kernel_size, padding=padding, dilation=dilation,
                      groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            ConvBNReLU(in_channels, out_channels, 1),
        )


class JPU(nn.Module):
    """``in_index`` picks the maps it fuses (default the three deepest: ResNet-50's 512, 1024 and
    2048 channels at strides 8, 16, 32). ``channels``/``reductions`` describe the returned list."""

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], *,
                 in_index: Sequence[int] = (-3, -2, -1), mid_channels: int = 512,
                 dilations: Sequence[int] = (1, 2, 4, 8), align_corners: bool = False) -> None:
        super().__init__()
        self.num_inputs = len(in_channels)
        fits = ("FastFCN's JPU fuses the 3 deepest maps of a multi-scale backbone: use e.g. "
                "backbone=resnet50 (the paper's), resnet101, convnext_*, swin_* or litehrnet_18.")
        try:
            self.in_index = resolve_in_index("JPU", in_index, in_channels, in_reductions)
        except IncompatibleBackboneError as err:
            raise IncompatibleBackboneError(f"{err} {fits}") from err
        reductions = [in_reductions[i] for i in self.in_index]
        if len(self.in_index) < 2 or len(set(reductions)) != len(reductions) \
                or self.in_index != sorted(self.in_index) or reductions != sorted(reductions):
            raise IncompatibleBackboneError(
                f"JPU: needs at least 2 maps at distinct strides, shallow to deep; in_index="
                f"{list(in_index)} selects strides {reductions} of a backbone with channels "
                f"{list(in_channels)} at strides {list(in_reductions)}. A dilated backbone "
                f"(resnet*_d8/_d16) leaves nothing to upsample. {fits}")
        self.align_corners = align_corners
        self.dilations = tuple(int(d) for d in dilations)
        self.mid_channels = mid_channels
        self.convs = nn.ModuleList(ConvBNReLU(in_channels[i], mid_channels, 3)
                                   for i in self.in_index)
        fused = len(self.in_index) * mid_channels
        self.dilation_convs = nn.ModuleList(SeparableConvBNReLU(fused, mid_channels, 3, dilation=d)
                                            for d in self.dilations)
        self.out_channels = len(self.dilations) * mid_channels
        self.out_reduction = reductions[0]
        # What the heads see: the backbone's maps up to the deepest one read, that one replaced by
        # the JPU output (maps after it, if in_index leaves any out, are dropped as in MMSeg).
        last = self.in_index[-1]
        self.channels = [*in_channels[:last], self.out_channels]
        self.reductions = [*in_reductions[:last], self.out_reduction]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != self.num_inputs:
            raise ValueError(f"JPU was built for {self.num_inputs} feature maps but got "
                             f"{len(features)}.")
        feats = [conv(features[i]) for conv, i in zip(self.convs, self.in_index, strict=True)]
        size = feats[0].shape[-2:]
        fused = torch.cat([resize(f, size, self.align_corners) for f in feats], dim=1)
        jpu = torch.cat([conv(fused) for conv in self.dilation_convs], dim=1)
        return [*features[:self.in_index[-1]], jpu]
