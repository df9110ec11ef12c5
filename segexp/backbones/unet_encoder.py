"""The U-Net contracting path (Ronneberger et al. 2015) as a segexp backbone.

``depth`` stages of two 3x3 ConvBNReLU, a 2x2 max-pool before each stage but the first; channels
double per stage: [64, 128, 256, 512, 1024] at reductions [1, 2, 4, 8, 16] by default. Pair with
``UNetHead(upsample="transpose")`` for the paper's network (padded convs + BN, see the head).
The paper trains it from scratch and no pretrained weights exist: ``pretrained="auto"`` means
random weights without a warning, ``pretrained=True`` is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from segexp.backbones.pretrained import pretrained_mode, scratch_source
from segexp.errors import ConfigError
from segexp.nn import DoubleConv, stage_outputs


class UNetEncoder(nn.Module):
    def __init__(self, in_chans: int = 3, base_channels: int = 64, depth: int = 5,
                 pretrained: bool | str = False) -> None:
        super().__init__()
        self.name = "unet"  # shown in error messages, like TimmBackbone.name
        mode = pretrained_mode(pretrained)
        if mode == "true":
            raise ConfigError("backbone.pretrained=true: the U-Net encoder has no pretrained weights "
                              "(the paper trains it from scratch). Use backbone.pretrained=auto or "
                              "false, or an ImageNet encoder such as backbone=resnet18 (model=unet's "
                              "default).")
        self.pretrained_source = scratch_source(mode, "the U-Net encoder has no published weights")
        if depth < 2:
            raise ConfigError(f"UNetEncoder: depth must be >= 2, got {depth}.")
        self.channels: list[int] = [base_channels * 2**i for i in range(depth)]
        self.reductions: list[int] = [2**i for i in range(depth)]
        # Each max-pool halves H and W, so the input must divide by 2 ** (depth - 1).
        self.size_divisor = 2 ** (depth - 1)
        stages, c = [], in_chans
        for i, out_c in enumerate(self.channels):
            pool = [nn.MaxPool2d(2)] if i > 0 else []
            stages.append(nn.Sequential(*pool, DoubleConv(c, out_c)))
            c = out_c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return stage_outputs(self.stages, x)
