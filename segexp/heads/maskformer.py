"""MaskFormer decode head (Cheng et al., NeurIPS 2021, "Per-Pixel Classification is Not All You
Need for Semantic Segmentation"), following the reference implementation and transformers'
``MaskFormerForInstanceSegmentation``.

* Pixel decoder (:class:`FPNPixelDecoder`): a 3x3 conv + GroupNorm(32) + ReLU on the deepest map,
  then top-down FPN steps (1x1 lateral conv + GroupNorm, nearest upsampling, 3x3 conv + GN + ReLU)
  down to the finest map read (stride 4), and a 3x3 conv to the per-pixel mask features.
* Transformer decoder: DETR's decoder (``decoder_layers`` post-norm layers: self-attention,
  cross-attention to the deepest *backbone* map projected to ``hidden_dim`` with a sine position
  embedding, FFN), ``num_queries`` learnt query positions starting from zero features. Each
  layer's output, through the shared LayerNorm, gives class logits (``K + 1``) and mask logits
  (mask embedding MLP x mask features): the last is the prediction, the earlier ones are deep
  supervision (``aux``, 5 with the default 6 layers).

Parameter names follow transformers' where the structure allows (``segexp.convert.hf_maskformer``
maps the rest); converted weights give transformers' logits (tests/convert/test_maskformer_convert.py).
The deep-supervision outputs follow the reference (normalised copies of each layer's output), not
transformers' ``use_auxiliary_loss`` ones (un-normalised, the zero initial queries included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segexp.heads.common import select_features
from segexp.heads.mask2former import (
    MLP,
    Attention,
    _c2_xavier_fill,
    check_multiscale,
    conv_gn32,
    sine_position_embedding,
)
from segexp.models.mask_classification import MaskPredictions


def _conv_gn(c_in: int, c_out: int, kernel_size: int, relu: bool) -> nn.Sequential:
    block = conv_gn32(c_in, c_out, kernel_size, relu=relu)
    _c2_xavier_fill(block[0])
    return block


class FPNPixelDecoder(nn.Module):
    """MaskFormer's pixel decoder; ``in_channels`` fine to coarse. Returns the mask features at
    the finest map's stride."""

    def __init__(self, in_channels: Sequence[int], feature_dim: int = 256,
                 mask_dim: int = 256) -> None:
        super().__init__()
        self.stem = _conv_gn(in_channels[-1], feature_dim, 3, relu=True)
        finer = list(in_channels)[:-1][::-1]  # used coarse to fine
        self.lateral_convs = nn.ModuleList(_conv_gn(c, feature_dim, 1, relu=False) for c in finer)
        self.output_convs = nn.ModuleList(_conv_gn(feature_dim, feature_dim, 3, relu=True)
                                          for _ in finer)
        self.mask_projection = nn.Conv2d(feature_dim, mask_dim, 3, padding=1)
        _c2_xavier_fill(self.mask_projection)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        y = self.stem(features[-1])
        for feature, lateral, output in zip(list(features)[:-1][::-1], self.lateral_convs,
                                            self.output_convs):
            lat = lateral(feature)
            y = output(lat + F.interpolate(y, size=lat.shape[-2:], mode="nearest"))
        return self.mask_projection(y)


class DetrDecoderLayer(nn.Module):
    """Self-attention -> cross-attention -> FFN, post-norm (DETR)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.cross_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        q = x + query_pos
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(q, q, x)))
        x = self.cross_attn_layer_norm(
            x + self.dropout(self.cross_attn(x + query_pos, memory + memory_pos, memory)))
        ffn = self.fc2(self.dropout(F.relu(self.fc1(x))))
        return self.final_layer_norm(x + self.dropout(ffn))


class DetrTransformerDecoder(nn.Module):
    """MaskFormer's transformer predictor: returns ``(class_logits, mask_logits)`` per layer."""

    def __init__(self, in_channels: int, num_classes: int, hidden_dim: int = 256,
                 num_queries: int = 100, num_heads: int = 8, num_layers: int = 6,
                 ffn_dim: int = 2048, mask_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.queries_embedder = nn.Embedding(num_queries, hidden_dim)
        self.input_projection = nn.Conv2d(in_channels, hidden_dim, 1) \
            if in_channels != hidden_dim else nn.Identity()
        if isinstance(self.input_projection, nn.Conv2d):
            _c2_xavier_fill(self.input_projection)
        self.layers = nn.ModuleList(DetrDecoderLayer(hidden_dim, num_heads, ffn_dim, dropout)
                                    for _ in range(num_layers))
        self.layernorm = nn.LayerNorm(hidden_dim)
        self.class_predictor = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embedder = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, deepest: torch.Tensor,
                mask_features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        memory = self.input_projection(deepest)
        n, c, h, w = memory.shape
        memory = memory.flatten(2).transpose(1, 2)
        memory_pos = sine_position_embedding(h, w, c, memory.device, memory.dtype)[None]
        query_pos = self.queries_embedder.weight[None].repeat(n, 1, 1)  # see Mask2Former's
        x = torch.zeros_like(query_pos)
        predictions = []
        for layer in self.layers:
            x = layer(x, memory, memory_pos, query_pos)
            decoded = self.layernorm(x)  # the next layer reads x itself, not the normalised copy
            masks = torch.einsum("nqc,nchw->nqhw", self.mask_embedder(decoded), mask_features)
            predictions.append((self.class_predictor(decoded), masks))
        return predictions


class MaskFormerHead(nn.Module):
    """MaskFormer: FPN pixel decoder + DETR transformer decoder on the deepest map.

    Args:
        in_index: the maps read, fine to coarse (default: strides 4..32); the deepest feeds the
            transformer decoder, all of them the FPN.
        feature_dim, mask_dim: FPN width and mask feature width (256, 256).
        hidden_dim, num_queries, num_heads, decoder_layers, decoder_ffn_dim, dropout: the DETR
            decoder (256, 100, 8, 6 layers, FFN 2048, dropout 0.1 as the reference).
    """

    mask_classification = True  # returns MaskPredictions: trained by loss=mask_classification

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: Sequence[int] = (-4, -3, -2, -1), feature_dim: int = 256,
                 mask_dim: int = 256, hidden_dim: int = 256, num_queries: int = 100,
                 num_heads: int = 8, decoder_layers: int = 6, decoder_ffn_dim: int = 2048,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.num_inputs = len(in_channels)
        self.in_index = check_multiscale("MaskFormerHead", in_index, in_channels, in_reductions, 2)
        channels = [in_channels[i] for i in self.in_index]
        self.pixel_decoder = FPNPixelDecoder(channels, feature_dim, mask_dim)
        self.transformer = DetrTransformerDecoder(
            channels[-1], num_classes, hidden_dim=hidden_dim, num_queries=num_queries,
            num_heads=num_heads, num_layers=decoder_layers, ffn_dim=decoder_ffn_dim,
            mask_dim=mask_dim, dropout=dropout)
        self.reduction = in_reductions[self.in_index[0]]

    def forward(self, features: list[torch.Tensor]) -> MaskPredictions:
        maps = select_features(features, self.in_index, self.num_inputs)
        predictions = self.transformer(maps[-1], self.pixel_decoder(maps))
        class_logits, mask_logits = predictions[-1]
        return MaskPredictions(class_logits, mask_logits, aux=predictions[:-1])
