"""FCN decode head (Long et al. 2015, "Fully Convolutional Networks"), as MMSegmentation's FCNHead.

Also serves as the auxiliary head (in_index -2, channels 256, num_convs 1, concat_input false).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segexp.errors import ConfigError, IncompatibleBackboneError
from segexp.heads.common import Classifier, resolve_single_index, select_features
from segexp.nn import ConvBNReLU


class FCNHead(nn.Module):
    """``num_convs`` kxk ConvBNReLU, optionally concat with the input + kxk conv, then classify."""

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: int = -1, channels: int = 512, num_convs: int = 2,
                 kernel_size: int = 3, dilation: int = 1, concat_input: bool = True,
                 dropout: float = 0.1, align_corners: bool = False) -> None:
        super().__init__()
        self.num_inputs = len(in_channels)
        self.in_index = resolve_single_index("FCNHead", in_index, in_channels, in_reductions)
        self.reduction = in_reductions[self.in_index]
        self.align_corners = align_corners  # unused (no resizing); kept for a uniform signature
        c_in = in_channels[self.in_index]
        if num_convs < 0:
            raise ConfigError(f"FCNHead: num_convs must be >= 0, got {num_convs}.")
        if num_convs == 0 and c_in != channels:
            raise IncompatibleBackboneError(
                f"FCNHead: num_convs=0 passes the input through, so channels ({channels}) must "
                f"equal the chosen map's channels ({c_in}, in_index {in_index}).")
        self.convs = nn.Sequential(*(
            ConvBNReLU(c_in if i == 0 else channels, channels, kernel_size, dilation=dilation)
            for i in range(num_convs)))
        self.concat_input = concat_input
        # Skip-like fusion of the raw input with the conv output (MMSegmentation's conv_cat).
        self.conv_cat = (ConvBNReLU(c_in + channels, channels, kernel_size)
                         if concat_input else None)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        (x,) = select_features(features, [self.in_index], self.num_inputs)
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.classifier(out)
