"""DINOv2 linear segmentation head (Oquab et al., 2023, "DINOv2: Learning Robust Visual Features
without Supervision"), as the DINOv2 repository's ``BNHead``
(``dinov2/eval/segmentation/models/decode_heads/linear_head.py``).

The chosen maps are resized to the finest one's size, concatenated along channels, batch-normalised
and classified by a 1x1 conv: a linear probe of the (frozen) backbone's patch tokens. The paper's
two settings differ by the maps read: "linear" reads the last block only (``in_index: [-1]``);
"+ms" concatenates the last four blocks (``in_index: [-4, -3, -2, -1]``, the default here, with
``dinov2_*`` backbones returning their last four blocks, each through the final LayerNorm) and adds
multi-scale test-time augmentation, which segexp's evaluation does not do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segexp.heads.common import Classifier, resize, resolve_in_index, select_features


class DINOv2LinearHead(nn.Module):
    """BatchNorm on the concatenated maps ``in_index`` (resized to the finest), then a 1x1 conv."""

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: int | Sequence[int] = (-4, -3, -2, -1), dropout: float = 0.0,
                 align_corners: bool = False) -> None:
        super().__init__()
        self.num_inputs = len(in_channels)
        self.in_index = resolve_in_index("DINOv2LinearHead", in_index, in_channels, in_reductions)
        self.align_corners = align_corners
        reductions = [in_reductions[i] for i in self.in_index]
        self.target = reductions.index(min(reductions))  # the finest chosen map sets the size
        self.reduction = reductions[self.target]
        width = sum(in_channels[i] for i in self.in_index)
        self.bn = nn.BatchNorm2d(width)
        self.classifier = Classifier(width, num_classes, dropout)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        chosen = select_features(features, self.in_index, self.num_inputs)
        size = chosen[self.target].shape[-2:]
        x = torch.cat([resize(f, size, self.align_corners) for f in chosen], dim=1)
        return self.classifier(self.bn(x))
