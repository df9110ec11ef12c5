"""SegFormer's all-MLP decode head (Xie et al., NeurIPS 2021, arXiv:2105.15203).

Each chosen level goes through a per-pixel linear layer (a 1x1 conv with bias) to ``channels``
("embed dim" in the paper), is upsampled to the finest chosen level (stride 4 on MiT), and the
levels are concatenated deepest first (as the official code and transformers do) and fused by a
1x1 ConvBNReLU; then dropout 0.1 and a 1x1 classifier. ``channels`` is 256 for MiT-B0/B1 and 768
for B2..B5 (paper Table 1; MMSegmentation configs).

The head reads any four maps (``in_index`` -4..-1), so it also runs on ResNet or ConvNeXt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segexp.errors import IncompatibleBackboneError
from segexp.heads.common import Classifier, resize, resolve_in_index, select_features
from segexp.nn import ConvBNReLU


class SegFormerHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: int | Sequence[int] = (-4, -3, -2, -1), channels: int = 256,
                 dropout: float = 0.1, proj_norm_act: bool = False,
                 align_corners: bool = False) -> None:
        super().__init__()
        self.num_inputs = len(in_channels)
        try:
            self.in_index = resolve_in_index("SegFormerHead", in_index, in_channels, in_reductions)
        except IncompatibleBackboneError as err:
            raise IncompatibleBackboneError(
                f"{err} Backbones with at least {len(list(_as_list(in_index)))} feature maps fit "
                "(mit_b0..mit_b5, mscan_t..mscan_l, resnet*, convnext_*).") from err
        self.align_corners = align_corners
        # The official code and transformers project each level with a plain 1x1 conv (bias);
        # MMSegmentation's SegformerHead uses conv + BN + ReLU (proj_norm_act=true loads its files).
        self.proj = nn.ModuleList(
            ConvBNReLU(in_channels[i], channels, 1) if proj_norm_act else
            nn.Conv2d(in_channels[i], channels, 1) for i in self.in_index)
        self.fuse = ConvBNReLU(channels * len(self.in_index), channels, 1)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        maps = select_features(features, self.in_index, self.num_inputs)
        size = max((tuple(m.shape[-2:]) for m in maps), key=lambda s: s[0] * s[1])  # finest
        levels = [resize(proj(m), size, self.align_corners) for proj, m in zip(self.proj, maps)]
        return self.classifier(self.fuse(torch.cat(levels[::-1], dim=1)))


def _as_list(in_index: int | Sequence[int]) -> list[int]:
    return [in_index] if isinstance(in_index, int) else list(in_index)
