"""Segmenter decode heads (Strudel et al., ICCV 2021, "Segmenter: Transformer for Semantic
Segmentation"), as the official code (``segm/model/decoder.py``) and MMSegmentation's
``SegmenterMaskTransformerHead``.

Both read one map (the last ViT block, ``in_index: -1``, already normalised by the encoder's final
LayerNorm when the backbone has ``final_norm: last``) and return logits at the patch resolution.

* :class:`SegmenterLinearHead` ("linear decoder"): a per-patch linear classifier (1x1 conv).
* :class:`SegmenterMaskHead` ("mask transformer"): patch tokens projected to ``embed_dims``, one
  learnt embedding per class appended as extra tokens, ``num_layers`` transformer blocks over all
  tokens, then the class masks are the scalar products of L2-normalised patch and class
  embeddings (each through a bias-free linear projection), followed by a LayerNorm over classes
  (``mask_norm``). Defaults (2 layers, ``embed_dims`` = encoder width, ``num_heads`` = width // 64,
  MLP ratio 4) are the paper's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from segexp.errors import ConfigError, IncompatibleBackboneError
from segexp.heads.common import Classifier, resolve_single_index, select_features
from segexp.nn import ChannelLayerNorm, drop_path_rates


class SegmenterLinearHead(nn.Module):
    """Segmenter's linear decoder: optional LayerNorm on the tokens, then a linear classifier per
    patch (a 1x1 conv). ``input_norm`` is for maps that did not go through the encoder's final
    LayerNorm (an intermediate block, or ``backbone.final_norm=none``)."""

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: int = -1, input_norm: bool = False, dropout: float = 0.0,
                 align_corners: bool = False) -> None:
        super().__init__()
        self.num_inputs = len(in_channels)
        self.in_index = resolve_single_index("SegmenterLinearHead", in_index, in_channels,
                                             in_reductions)
        c_in = in_channels[self.in_index]
        self.norm = ChannelLayerNorm(c_in) if input_norm else nn.Identity()
        self.classifier = Classifier(c_in, num_classes, dropout)
        self.reduction = in_reductions[self.in_index]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        (x,) = select_features(features, [self.in_index], self.num_inputs)
        return self.classifier(self.norm(x))


class SegmenterMaskHead(nn.Module):
    """Segmenter's mask transformer decoder.

    Args:
        num_layers: transformer blocks over patch + class tokens (2 in the paper).
        num_heads: attention heads; ``None`` = ``embed_dims // 64`` (3 / 6 / 12 / 16 for
            ViT-T / S / B / L, as the official code).
        embed_dims: decoder width; ``None`` = the encoder's width (the paper's choice).
        mlp_ratio: hidden width of the blocks' MLP relative to ``embed_dims``.
        drop_path_rate, dropout, attn_dropout: regularisation of the blocks (MMSegmentation:
            drop path 0.1, no dropout).
        input_norm: LayerNorm on the input tokens (for maps the encoder did not normalise).
    """

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: int = -1, num_layers: int = 2, num_heads: int | None = None,
                 embed_dims: int | None = None, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.1, dropout: float = 0.0, attn_dropout: float = 0.0,
                 input_norm: bool = False, align_corners: bool = False) -> None:
        super().__init__()
        head = "SegmenterMaskHead"
        self.num_inputs = len(in_channels)
        self.in_index = resolve_single_index(head, in_index, in_channels, in_reductions)
        c_in = in_channels[self.in_index]
        dims = int(embed_dims) if embed_dims else c_in
        if num_heads is None:
            if dims % 64:
                raise IncompatibleBackboneError(
                    f"{head}: num_heads defaults to embed_dims // 64, but embed_dims={dims} (the "
                    "map's channels unless set) is not a multiple of 64. Set head.num_heads "
                    "(and/or head.embed_dims) explicitly.")
            num_heads = dims // 64
        if num_heads < 1 or dims % num_heads:
            raise ConfigError(f"{head}: embed_dims={dims} must be a multiple of "
                              f"num_heads={num_heads}.")
        if num_layers < 1:
            raise ConfigError(f"{head}: num_layers must be >= 1, got {num_layers}.")
        self.num_classes = num_classes
        self.num_heads = int(num_heads)
        self.norm = nn.LayerNorm(c_in) if input_norm else nn.Identity()
        self.proj_dec = nn.Linear(c_in, dims)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dims))
        rates = drop_path_rates(drop_path_rate, num_layers)
        self.blocks = nn.Sequential(*(
            Block(dims, self.num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout,
                  attn_drop=attn_dropout, drop_path=rate) for rate in rates))
        self.decoder_norm = nn.LayerNorm(dims)
        self.patch_proj = nn.Linear(dims, dims, bias=False)
        self.classes_proj = nn.Linear(dims, dims, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.reduction = in_reductions[self.in_index]
        self._init_weights()

    def _init_weights(self) -> None:
        # As the official code and MMSegmentation: truncated normal (std 0.02) for linear layers
        # and the class embeddings, unit LayerNorms.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        (x,) = select_features(features, [self.in_index], self.num_inputs)
        n, _, h, w = x.shape
        tokens = self.proj_dec(self.norm(x.flatten(2).transpose(1, 2)))
        tokens = torch.cat([tokens, self.cls_emb.expand(n, -1, -1)], dim=1)
        tokens = self.decoder_norm(self.blocks(tokens))
        k = self.num_classes
        patches = F.normalize(self.patch_proj(tokens[:, :-k]), dim=-1)
        classes = F.normalize(self.classes_proj(tokens[:, -k:]), dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (N, HW, classes)
        return masks.transpose(1, 2).reshape(n, k, h, w)
