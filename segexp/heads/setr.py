"""SETR decode heads (Zheng et al., CVPR 2021, "Rethinking Semantic Segmentation from a
Sequence-to-Sequence Perspective with Transformers"), as MMSegmentation's ``SETRUPHead``,
``MLANeck`` and ``SETRMLAHead``.

SETR reads several blocks of a plain ViT (ViT-L/16, blocks 10, 15, 20 and 24 for Naive/PUP; 6, 12,
18 and 24 for MLA in MMSegmentation's configs): all maps share one stride (the patch size) and one
width. The heads refuse any other backbone in ``__init__``.

* **Naive** (``SETRNaiveHead``): LayerNorm on the deepest map's tokens, 1x1 conv + BN + ReLU
  (256), 4x bilinear upsampling, 1x1 classifier.
* **PUP** (``SETRPUPHead``, progressive upsampling): LayerNorm, then 4 x (3x3 conv + BN + ReLU,
  2x upsampling), i.e. back to the input resolution for a 16-pixel patch, then the classifier.
* **MLA** (``SETRMLAHead``, multi-level aggregation): the MLA neck (per level LayerNorm + 1x1
  conv, top-down cumulative sums, 3x3 convs; 256 channels) followed by a 2 x 3x3 conv (128) + 4x
  upsampling branch per level, concatenated and classified. The neck lives inside the head, so the
  head is self-contained (``head=setr_mla`` works with any ``model=``).

Auxiliary heads. The paper's recipes (MMSegmentation ``setr_vit-l_{naive,pup,mla}`` configs)
train several auxiliary heads, each with its own cross-entropy of weight 0.4: Naive and PUP put a
``SETRUPHead`` on each of the three intermediate maps (blocks 10, 15, 20; ADE20K: 2 convs, kernel 1
for Naive and 3 for PUP), MLA puts a 1x1 classifier (``FCNHead`` with no conv) on each of the four
MLA-neck outputs. segexp's Segmentor trains one auxiliary head with one loss, and averaging or
summing logits of several heads would not be the same objective (one loss on combined logits is not
the sum of per-head losses). ``conf/model/setr.yaml`` therefore keeps one of the recipe's auxiliary
heads with the recipe's weight: a ``SETRUPHead`` (2 x 3x3 conv, 256 channels, 4x upsampling each) on
the deepest intermediate map (``in_index: -2``, block 20 of ViT-L/16). For ``head=setr_mla`` that
same head is used: the MLA recipe's auxiliary classifiers read the neck's outputs, which live inside
``SETRMLAHead`` and are not visible to a separate head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segexp.errors import ConfigError, IncompatibleBackboneError
from segexp.heads.common import Classifier, resolve_in_index, resolve_single_index, select_features
from segexp.nn import ChannelLayerNorm, ConvBNReLU

PLAIN_VIT_BACKBONES = ("backbone=vit_tiny/vit_small/vit_base/vit_large, or "
                       "dinov2_vits14/dinov2_vitb14/dinov2_vitl14")


def check_plain_vit(head: str, in_channels: Sequence[int], in_reductions: Sequence[int]) -> None:
    """Refuse backbones whose maps do not all share one stride and one width (SETR's input)."""
    if len(set(in_reductions)) != 1 or len(set(in_channels)) != 1:
        raise IncompatibleBackboneError(
            f"{head}: SETR heads need a plain ViT backbone ({PLAIN_VIT_BACKBONES}): all feature "
            "maps at one stride (the patch size) with one channel count, as the paper's "
            f"ViT-L/16; this backbone gives channels {list(in_channels)} at strides "
            f"{list(in_reductions)}.")


def _upsample(scale: int, align_corners: bool) -> nn.Module:
    if scale == 1:
        return nn.Identity()
    return nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=align_corners)


class SETRUPHead(nn.Module):
    """SETR's Naive / progressive upsampling head (MMSegmentation ``SETRUPHead``).

    LayerNorm on the tokens of one map, then ``num_convs`` x (kxk ConvBNReLU to ``channels``,
    bilinear upsampling by ``up_scale``), then a 1x1 classifier. Logits come out at the map's
    stride divided by ``up_scale ** num_convs``.
    """

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: int = -1, channels: int = 256, num_convs: int = 1,
                 up_scale: int = 4, kernel_size: int = 1, norm_eps: float = 1e-6,
                 dropout: float = 0.0, align_corners: bool = False) -> None:
        super().__init__()
        head = type(self).__name__
        check_plain_vit(head, in_channels, in_reductions)
        self.num_inputs = len(in_channels)
        self.in_index = resolve_single_index(head, in_index, in_channels, in_reductions)
        if num_convs < 1:
            raise ConfigError(f"{head}: num_convs must be >= 1, got {num_convs}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"{head}: kernel_size must be odd (1 or 3 in the paper), got "
                              f"{kernel_size}.")
        if up_scale < 1:
            raise ConfigError(f"{head}: up_scale must be >= 1, got {up_scale}.")
        c_in = in_channels[self.in_index]
        self.norm = ChannelLayerNorm(c_in, eps=norm_eps)
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [ConvBNReLU(c_in if i == 0 else channels, channels, kernel_size),
                       _upsample(up_scale, align_corners)]
        self.up_convs = nn.Sequential(*layers)
        self.classifier = Classifier(channels, num_classes, dropout)
        self.reduction = in_reductions[self.in_index] / up_scale ** num_convs

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        (x,) = select_features(features, [self.in_index], self.num_inputs)
        return self.classifier(self.up_convs(self.norm(x)))


class SETRAuxHeads(nn.Module):
    """The auxiliary heads of SETR's Naive / PUP recipes: one :class:`SETRUPHead` per intermediate
    map (``in_index``, blocks 10, 15, 20 of ViT-L), each with its own loss.

    Their logits come back stacked along the batch axis; the training step compares every slice
    with the ground truth, so with mean-reduced losses ``aux_weight = 0.4 * len(in_index)`` trains
    each head exactly as the recipe's separate 0.4-weighted losses do.
    """

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: Sequence[int] = (0, 1, 2), **head_options) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            SETRUPHead(in_channels, in_reductions, num_classes, in_index=i, **head_options)
            for i in in_index)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([head(features) for head in self.heads], dim=0)


class SETRNaiveHead(SETRUPHead):
    """SETR-Naive: 1 x (1x1 conv 256 + BN + ReLU, 4x upsampling) on the deepest map."""

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: int = -1, channels: int = 256, num_convs: int = 1,
                 up_scale: int = 4, kernel_size: int = 1, norm_eps: float = 1e-6,
                 dropout: float = 0.0, align_corners: bool = False) -> None:
        super().__init__(in_channels, in_reductions, num_classes, in_index=in_index,
                         channels=channels, num_convs=num_convs, up_scale=up_scale,
                         kernel_size=kernel_size, norm_eps=norm_eps, dropout=dropout,
                         align_corners=align_corners)


class SETRPUPHead(SETRUPHead):
    """SETR-PUP: 4 x (3x3 conv 256 + BN + ReLU, 2x upsampling) on the deepest map (16x in all)."""

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: int = -1, channels: int = 256, num_convs: int = 4,
                 up_scale: int = 2, kernel_size: int = 3, norm_eps: float = 1e-6,
                 dropout: float = 0.0, align_corners: bool = False) -> None:
        super().__init__(in_channels, in_reductions, num_classes, in_index=in_index,
                         channels=channels, num_convs=num_convs, up_scale=up_scale,
                         kernel_size=kernel_size, norm_eps=norm_eps, dropout=dropout,
                         align_corners=align_corners)


class MLANeck(nn.Module):
    """SETR's multi-level feature aggregation (MMSegmentation ``MLANeck``).

    Per level: LayerNorm on the tokens, 1x1 ConvBNReLU to ``out_channels``; then top-down
    cumulative sums (deepest level alone, deepest + next, ...), each through a 3x3 ConvBNReLU.
    All levels share one resolution (a plain ViT), so no resizing is involved.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norms = nn.ModuleList(ChannelLayerNorm(c, eps=norm_eps) for c in in_channels)
        self.lateral = nn.ModuleList(ConvBNReLU(c, out_channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(ConvBNReLU(out_channels, out_channels, 3) for _ in in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        lateral = [conv(norm(x)) for x, norm, conv in zip(features, self.norms, self.lateral)]
        aggregated: list[torch.Tensor] = [lateral[-1]] * len(lateral)
        running = lateral[-1]
        for i in range(len(lateral) - 2, -1, -1):
            running = running + lateral[i]
            aggregated[i] = running
        return [conv(x) for x, conv in zip(aggregated, self.smooth)]


class SETRMLAHead(nn.Module):
    """SETR-MLA: :class:`MLANeck` (``neck_channels``) then, per level, 2 x 3x3 ConvBNReLU to
    ``mla_channels`` and ``up_scale`` upsampling; the levels are concatenated and classified by a
    1x1 conv. Logits come out at the maps' stride / ``up_scale`` (4 for ViT-*/16)."""

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: Sequence[int] = (-4, -3, -2, -1), neck_channels: int = 256,
                 mla_channels: int = 128, up_scale: int = 4, norm_eps: float = 1e-6,
                 dropout: float = 0.0, align_corners: bool = False) -> None:
        super().__init__()
        head = type(self).__name__
        check_plain_vit(head, in_channels, in_reductions)
        self.num_inputs = len(in_channels)
        self.in_index = resolve_in_index(head, in_index, in_channels, in_reductions)
        if up_scale < 1:
            raise ConfigError(f"{head}: up_scale must be >= 1, got {up_scale}.")
        chosen = [in_channels[i] for i in self.in_index]
        self.neck = MLANeck(chosen, neck_channels, norm_eps)
        self.branches = nn.ModuleList(
            nn.Sequential(ConvBNReLU(neck_channels, mla_channels, 3),
                          ConvBNReLU(mla_channels, mla_channels, 3),
                          _upsample(up_scale, align_corners))
            for _ in self.in_index)
        self.classifier = Classifier(len(self.in_index) * mla_channels, num_classes, dropout)
        self.reduction = in_reductions[self.in_index[0]] / up_scale

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        levels = self.neck(select_features(features, self.in_index, self.num_inputs))
        return self.classifier(torch.cat([b(x) for b, x in zip(self.branches, levels)], dim=1))
