"""A feature pyramid for plain ViTs: four maps of one stride -> strides /4, /2, x1, x2 of it.

A plain ViT (ViT, DINOv2, DINOv3) returns every block at the patch stride (16), but pyramid heads
such as UPerNet expect maps at strides 4, 8, 16, 32. The standard fix for ViT + UPerNet (BEiT, MAE
and MMSegmentation's BEiT/MAE UPerNet configs, the ``fpn1``..``fpn4`` modules) takes four blocks
(e.g. the 4th, 6th, 8th and 12th of ViT-B, or the last four) and resamples the i-th one:

* map 0: 2x2 transposed conv, BatchNorm, GELU, 2x2 transposed conv (x4: stride 16 -> 4);
* map 1: 2x2 transposed conv (x2: stride 16 -> 8);
* map 2: unchanged (stride 16);
* map 3: 2x2 max pooling (/2: stride 16 -> 32).

Channels stay the ViT's width. (MMSegmentation's ``MultiLevelNeck`` for its own ViT-UPerNet
configs does the same resampling with bilinear resizing + 1x1/3x3 convs instead; the transposed
convs here are the BEiT/MAE form.) Built by the Segmentor as
``neck(in_channels=backbone.channels, in_reductions=backbone.reductions)``; select it with
``+neck@model.neck=multilevel`` (conf/neck/multilevel.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segexp.errors import IncompatibleBackboneError
from segexp.heads.common import resolve_in_index


def _scaled(reduction: int | float, factor: float) -> int | float:
    value = reduction * factor
    return int(value) if float(value).is_integer() else value


class MultiLevelNeck(nn.Module):
    """``in_index``: the four backbone maps it resamples, shallow to deep (default the last four).
    ``channels``/``reductions`` describe the returned list: 4 maps of the backbone's width at
    strides patch/4, patch/2, patch, 2 x patch (4, 8, 16, 32 for a /16 ViT; a /14 DINOv2 gives
    3.5, 7, 14, 28)."""

    SCALES = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], *,
                 in_index: Sequence[int] = (-4, -3, -2, -1)) -> None:
        super().__init__()
        fits = ("MultiLevelNeck turns 4 blocks of a plain ViT into a 4-level pyramid: use a ViT "
                "backbone returning 4 blocks (dinov2_*, dinov3_*, or vit_* with "
                "backbone.out_indices=[3,5,7,11]).")
        try:
            self.in_index = resolve_in_index("MultiLevelNeck", in_index, in_channels, in_reductions)
        except IncompatibleBackboneError as err:
            raise IncompatibleBackboneError(f"{err} {fits}") from err
        chosen_channels = {in_channels[i] for i in self.in_index}
        chosen_reductions = {in_reductions[i] for i in self.in_index}
        if len(self.in_index) != 4 or len(chosen_channels) != 1 or len(chosen_reductions) != 1:
            raise IncompatibleBackboneError(
                f"MultiLevelNeck: needs 4 maps of one width and one stride; in_index="
                f"{list(in_index)} selects channels {[in_channels[i] for i in self.in_index]} at "
                f"strides {[in_reductions[i] for i in self.in_index]}. {fits}")
        self.num_inputs = len(in_channels)
        width = chosen_channels.pop()
        stride = chosen_reductions.pop()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
            nn.BatchNorm2d(width),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(width, width, kernel_size=2, stride=2)
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.channels = [width] * 4
        self.reductions = [_scaled(stride, 1.0 / s) for s in self.SCALES]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != self.num_inputs:
            raise ValueError(f"MultiLevelNeck was built for {self.num_inputs} feature maps but "
                             f"got {len(features)}.")
        x0, x1, x2, x3 = (features[i] for i in self.in_index)
        return [self.up4(x0), self.up2(x1), x2, self.down2(x3)]
