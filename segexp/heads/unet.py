"""U-Net decoder (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation") over any backbone.

Walks from the deepest map up through every shallower selected map as a skip. Each block:
upsample to the skip's size ("transpose": the paper's 2x2 up-conv halving the channels, or
"bilinear"), concatenate the skip, two 3x3 ConvBNReLU. A final 1x1 conv gives the logits at the
finest map's reduction.

The paper used unpadded 3x3 convs (output smaller than input, skips cropped) and no BN; we use
padding 1 + BN, the common modern form, so skips line up without cropping.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segexp.errors import ConfigError, IncompatibleBackboneError
from segexp.heads.common import resize, resolve_in_index, select_features
from segexp.nn import DoubleConv


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, factor: int,
                 upsample: str, align_corners: bool) -> None:
        super().__init__()
        self.align_corners, self.factor = align_corners, factor
        if upsample == "transpose":
            # kernel = stride = factor (2 in the paper; 1 when a dilated backbone keeps the size).
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, factor, stride=factor)
            # kernel = stride: each output pixel takes one tap per input channel, so He normal
            # over the input channels keeps the deep path's scale. PyTorch's default (its fan
            # counted on the output side) shrinks it about 2.5x per stage: at init the logits
            # then hang on the shallowest skip alone and the deep features are learnt late.
            nn.init.normal_(self.up.weight, std=(2.0 / in_channels) ** 0.5)
            nn.init.zeros_(self.up.bias)
            up_channels = in_channels // 2
        else:
            self.up = None
            up_channels = in_channels
        self.convs = DoubleConv(up_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """``skip=None``: a stage without a skip (``full_resolution``), ``factor`` x the size."""
        size = skip.shape[-2:] if skip is not None else (x.shape[-2] * self.factor,
                                                           x.shape[-1] * self.factor)
        if self.up is not None:
            x = self.up(x)
        x = resize(x, size, self.align_corners)  # bilinear mode; no-op after up-conv
        return self.convs(x if skip is None else torch.cat([skip, x], dim=1))


class UNetHead(nn.Module):
    """``in_index=None`` uses every backbone map. ``decoder_channels``: an integer is the deepest
    decoder stage's width, halved at each shallower stage (256 -> 256, 128, 64, 32 over ResNet's
    four skips, as segmentation-models-pytorch's U-Net); ``None`` mirrors the skips' channels
    (the paper: 512, 256, 128, 64 for an encoder of 64..1024); or one width per skip map, deepest
    first. ``full_resolution``: one more stage, without a skip, up to the input's resolution
    (logits at full size instead of the finest map's, as segmentation-models-pytorch's U-Net)."""

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: Sequence[int] | None = None,
                 decoder_channels: int | Sequence[int] | None = None, upsample: str = "transpose",
                 dropout: float = 0.0, align_corners: bool = False,
                 full_resolution: bool = False) -> None:
        super().__init__()
        name = "UNetHead"
        self.num_inputs = len(in_channels)
        if in_index is None:
            in_index = list(range(self.num_inputs))
        self.in_index = resolve_in_index(name, in_index, in_channels, in_reductions)
        chans = [in_channels[i] for i in self.in_index]
        reds = [in_reductions[i] for i in self.in_index]
        if len(chans) < 2:
            raise IncompatibleBackboneError(
                f"{name}: needs at least 2 feature maps (one deep map and a skip), the selection "
                f"in_index={list(self.in_index)} has {len(chans)}.")
        if reds != sorted(reds):
            raise IncompatibleBackboneError(
                f"{name}: in_index must go shallow to deep, but selects reductions {reds}.")
        if upsample not in ("transpose", "bilinear"):
            raise ConfigError(f"{name}: upsample must be 'transpose' or 'bilinear', got "
                              f"{upsample!r}.")
        skips = list(range(len(chans) - 2, -1, -1))  # deep to shallow
        if decoder_channels is None:
            decoder_channels = [chans[s] for s in skips]
        elif isinstance(decoder_channels, int):
            if decoder_channels < 1:
                raise ConfigError(f"{name}: decoder_channels={decoder_channels} must be >= 1.")
            decoder_channels = [max(decoder_channels >> k, 1) for k in range(len(skips))]
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) != len(skips):
            raise IncompatibleBackboneError(
                f"{name}: decoder_channels has {len(decoder_channels)} entries, but the backbone "
                f"gives {len(skips)} skip maps (channels {chans[:-1]} at reductions {reds[:-1]}); "
                "give one entry per skip, deepest first, or null to mirror the skips.")
        self.reduction = reds[0]
        # The paper places dropout at the end of the contracting path, i.e. on the deepest map
        # (experiment=unet_paper). Off by default: channel dropout there feeds BatchNorm layers
        # whose running statistics then differ from what the model sees in eval (Li et al.,
        # CVPR 2019); 20-minute runs averaged 1.2 points of mIoU less with it (docs/performance.md).
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        blocks, c = [], chans[-1]
        for s, out_c in zip(skips, decoder_channels, strict=True):
            if reds[s + 1] % reds[s]:
                raise IncompatibleBackboneError(
                    f"{name}: reductions {reds} must each divide the next for the up-convs.")
            factor = reds[s + 1] // reds[s]
            blocks.append(UpBlock(c, chans[s], out_c, factor, upsample, align_corners))
            c = out_c
        if full_resolution and self.reduction > 1:
            # One more stage, without a skip, up to the input's resolution at half the last width
            # (segmentation-models-pytorch's U-Net: 16 channels after 32 on ResNet).
            blocks.append(UpBlock(c, 0, max(c // 2, 1), self.reduction, upsample, align_corners))
            c, self.reduction = max(c // 2, 1), 1
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Conv2d(c, num_classes, 1)
        # The paper's init, std sqrt(2 / incoming nodes). Not MMSegmentation's std 0.01 for its
        # 512-wide heads: over 32 channels AdamW's steps of about lr per weight would take a
        # hundred iterations to grow logits that small (the loss stays near ln(classes)).
        nn.init.normal_(self.classifier.weight, std=(2.0 / c) ** 0.5)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        xs = select_features(features, self.in_index, self.num_inputs)
        x = self.dropout(xs[-1])
        skips = list(reversed(xs[:-1]))
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return self.classifier(x)
