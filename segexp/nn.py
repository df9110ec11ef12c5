"""Small building blocks shared by backbones, necks, heads and models.

Each block is a plain ``nn.Sequential`` or a thin ``nn.Module`` whose parameter names are part of
the checkpoint format (``0`` = conv, ``1`` = norm inside the Sequentials; converters in
``segexp.convert`` map foreign files onto them), so their layout must not change.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.layers import DropPath
from torch import nn


class ConvBNReLU(nn.Sequential):
    """Conv (no bias: BN follows) + BatchNorm + ReLU, "same" padding for any kernel/dilation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *,
                 dilation: int = 1, groups: int = 1) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        # MMCV's ConvModule init (every MMSegmentation head): He normal over fan-out for ReLU,
        # not PyTorch's default (2.4x smaller for equal widths).
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")


class DepthwiseSeparableConvBNReLU(nn.Sequential):
    """Depthwise kxk ConvBNReLU then pointwise 1x1 ConvBNReLU (DeepLabV3+'s separable conv, with
    BN + ReLU after both parts as in MMSegmentation's DepthwiseSeparableConvModule)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *,
                 dilation: int = 1) -> None:
        super().__init__(
            ConvBNReLU(in_channels, in_channels, kernel_size, dilation=dilation,
                       groups=in_channels),
            ConvBNReLU(in_channels, out_channels, 1),
        )


class DoubleConv(nn.Sequential):
    """Two 3x3 ConvBNReLU: the unit of both U-Net paths (encoder backbone and decoder head)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvBNReLU(in_channels, out_channels, 3),
                         ConvBNReLU(out_channels, out_channels, 3))


class ConvGNReLU(nn.Sequential):
    """kxk conv ("same" padding, no bias unless asked) + GroupNorm + optional ReLU: MMCV's
    ConvModule with a GN config, and the GN convs of the MaskFormer / Mask2Former pixel decoders.
    The caller checks that ``groups`` divides ``out_channels`` (its message names its option)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *,
                 groups: int = 32, relu: bool = True, bias: bool = False) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias),
            nn.GroupNorm(groups, out_channels),
            *([nn.ReLU(inplace=True)] if relu else []))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map: the per-token LayerNorm of a transformer
    (ConvNeXt's, SETR's, EoMT's and MSCAN's ``LayerNorm2d``). Parameters ``weight``/``bias`` as
    ``nn.LayerNorm``, so a token LayerNorm's weights load into it unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def stage_outputs(stages: Iterable[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Run an encoder's ``stages`` one after another and keep every stage's output: the
    multi-scale feature list a backbone returns (shallow to deep)."""
    features = []
    for stage in stages:
        x = stage(x)
        features.append(x)
    return features


def drop_path_or_identity(rate: float) -> nn.Module:
    """Stochastic depth on a residual branch; an ``nn.Identity`` (no module state) at rate 0."""
    return DropPath(rate) if rate > 0 else nn.Identity()


def drop_path_rates(rate: float, num_blocks: int) -> list[float]:
    """Per-block stochastic depth rising linearly from 0 to ``rate`` over ``num_blocks`` blocks
    (``torch.linspace(0, rate, n)``, as plain floats so models can be built on the meta device)."""
    rate = float(rate)
    return [rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
