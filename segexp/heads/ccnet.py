"""CCNet decode head (Huang et al., ICCV 2019, "CCNet: Criss-Cross Attention for Semantic
Segmentation"), as MMSegmentation's CCHead: an FCN head whose two 3x3 convs have recurrent
criss-cross attention (RCCA, ``recurrence=2``) between them.

The attention is pure PyTorch, the same computation as MMCV's ``CrissCrossAttention`` (its
PyTorch version since mmcv 1.3.13): every pixel attends to the pixels of its row and of its column,
itself counted once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segexp.errors import ConfigError
from segexp.heads.common import select_features
from segexp.heads.fcn import FCNHead


class CrissCrossAttention(nn.Module):
    """One criss-cross attention step (the CCA module of the paper).

    Query and key are 1x1 convs to ``in_channels // reduction`` channels, the value a 1x1 conv to
    ``in_channels``. For pixel ``(h, w)`` the energies against ``(i, w)`` for every row ``i`` and
    ``(h, j)`` for every column ``j`` go through one softmax; the column branch masks ``i == h``
    with -inf so the pixel itself is counted once (by the row branch), as MMCV does. The output
    is ``gamma * aggregated values + x``, ``gamma`` a learnable scalar starting at 0, so the
    module starts as the identity.
    """

    def __init__(self, in_channels: int, reduction: int = 8) -> None:
        super().__init__()
        if in_channels // reduction < 1:
            raise ConfigError(f"CrissCrossAttention: in_channels={in_channels} is too small for "
                              f"query/key channels in_channels // {reduction}; use more channels.")
        inner = in_channels // reduction
        self.in_channels = in_channels
        self.query_conv = nn.Conv2d(in_channels, inner, 1)
        self.key_conv = nn.Conv2d(in_channels, inner, 1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        query, key, value = self.query_conv(x), self.key_conv(x), self.value_conv(x)
        # Column energies (b, h, w, i): query (h, w) against key (i, w); the self position masked.
        energy_col = torch.einsum("bchw,bciw->bhwi", query, key)
        self_position = torch.eye(height, dtype=torch.bool, device=x.device).view(
            1, height, 1, height)
        energy_col = energy_col.masked_fill(self_position, float("-inf"))
        # Row energies (b, h, w, j): query (h, w) against key (h, j), the self position included.
        energy_row = torch.einsum("bchw,bchj->bhwj", query, key)
        attention = F.softmax(torch.cat([energy_col, energy_row], dim=-1), dim=-1)
        out = torch.einsum("bciw,bhwi->bchw", value, attention[..., :height])
        out = out + torch.einsum("bchj,bhwj->bchw", value, attention[..., height:])
        return self.gamma * out + x


class CCHead(FCNHead):
    """FCN head with ``num_convs=2`` and recurrent criss-cross attention after the first conv.

    MMSegmentation's settings (``ccnet_r50-d8``): in_index -1 (the dilated ResNet's stride-8 map),
    channels 512, recurrence 2, concat_input true, dropout 0.1. Two recurrences give every pixel
    a path from every other pixel (row then column), the paper's full-image context.
    """

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: int = -1, channels: int = 512, recurrence: int = 2,
                 kernel_size: int = 3, dilation: int = 1, concat_input: bool = True,
                 dropout: float = 0.1, align_corners: bool = False) -> None:
        if recurrence < 0:
            raise ConfigError(f"CCHead: recurrence must be >= 0, got {recurrence}.")
        super().__init__(in_channels, in_reductions, num_classes, in_index=in_index,
                         channels=channels, num_convs=2, kernel_size=kernel_size,
                         dilation=dilation, concat_input=concat_input, dropout=dropout,
                         align_corners=align_corners)
        self.recurrence = recurrence
        self.cca = CrissCrossAttention(channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        (x,) = select_features(features, [self.in_index], self.num_inputs)
        out = self.convs[0](x)
        for _ in range(self.recurrence):  # the same module each time (shared weights)
            out = self.cca(out)
        out = self.convs[1](out)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.classifier(out)
