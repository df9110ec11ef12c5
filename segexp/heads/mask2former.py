"""Mask2Former decode head (Cheng et al., CVPR 2022, "Masked-attention Mask Transformer for
Universal Image Segmentation"), following the reference implementation (facebookresearch/
Mask2Former) and transformers' ``Mask2FormerForUniversalSegmentation``.

* Pixel decoder (:class:`MSDeformAttnPixelDecoder`): the three coarsest maps the head reads
  (strides 8, 16, 32) are projected to ``feature_dim`` (1x1 conv + GroupNorm(32)), get a sine
  position embedding plus a learnt level embedding and go through ``encoder_layers`` multi-scale
  deformable attention layers (Zhu et al. 2021, written here with ``F.grid_sample``, no compiled
  extension); FPN-style lateral + output convs then add the finer maps (stride 4) and a 1x1 conv
  gives the per-pixel mask features (``mask_dim``).
* Transformer decoder (:class:`MaskedAttentionDecoder`): ``num_queries`` learnt queries (features
  + positions), ``decoder_layers`` layers cycling over the three scales coarse to fine, each
  masked cross-attention -> self-attention -> FFN (post-norm, as the reference), the cross-attention
  restricted to the foreground (sigmoid >= 0.5) of the previous layer's masks resized to that
  scale (a query whose mask is empty attends everywhere). Every layer's output and the initial
  queries go through the shared LayerNorm, class head (``K + 1``) and mask embedding MLP, so the
  default 9 layers give 10 predictions: the last one and 9 for deep supervision.

The forward returns :class:`~segexp.models.mask_classification.MaskPredictions` (mask logits at the
stride of the finest map read, 4 by default). Module and parameter names follow transformers'
where the structure allows (``segexp.convert.hf_mask2former`` maps the rest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segexp.errors import ConfigError, IncompatibleBackboneError
from segexp.heads.common import resolve_in_index, select_features
from segexp.models.mask_classification import MaskPredictions
from segexp.nn import ConvGNReLU

# --- shared building blocks (also used by MaskFormer) ----------------------------------------

def sine_position_embedding(height: int, width: int, channels: int, device: torch.device,
                            dtype: torch.dtype, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised sine embedding of a ``height x width`` grid as ``(height * width,
    channels)`` (row-major, like ``x.flatten(2).transpose(1, 2)``): ``channels / 2`` features of y
    then of x, each position scaled to ``(0, 2 pi]`` (positions 1..n divided by n)."""
    feats = channels // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * scale
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * scale
    dim_t = torch.arange(feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / feats)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        pos = pos[:, None] / dim_t
        return torch.stack((pos[:, 0::2].sin(), pos[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, feats)
    pos_x = encode(x)[None, :, :].expand(height, width, feats)
    return torch.cat((pos_y, pos_x), dim=-1).reshape(height * width, 2 * feats).to(dtype)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the mask embedding of MaskFormer and
    Mask2Former); ``layers.i.0`` as transformers' prediction blocks."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(a, b)) for a, b in zip(dims, dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Attention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), batch first, run by ``F.scaled_dot_product_attention``.
    ``mask`` is boolean, True where a query may attend, broadcastable to ``(N, heads, Lq, Lk)``."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"attention width {dim} does not divide into {num_heads} heads; "
                              "choose a hidden_dim that is a multiple of num_heads.")
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        n, lq, c = query.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(n, -1, heads, c // heads).transpose(1, 2)

        q = split(F.linear(query, w_q, b_q))
        k = split(F.linear(key, w_k, b_k))
        v = split(F.linear(value, w_v, b_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(n, lq, c))


# --- multi-scale deformable attention ----------------------------------------------------------

def multi_scale_deformable_attention(value: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]],
                                     sampling_locations: torch.Tensor,
                                     attention_weights: torch.Tensor) -> torch.Tensor:
    """Deformable DETR's core in plain PyTorch.

    ``value`` ``(N, S, M, D)`` (S = sum of h*w over levels, M heads), ``sampling_locations``
    ``(N, Lq, M, L, P, 2)`` as (x, y) in [0, 1], ``attention_weights`` ``(N, Lq, M, L, P)``.
    Returns ``(N, Lq, M * D)``. Bilinear sampling with zero padding outside the map
    (``align_corners=False``), as the CUDA kernel; one ``grid_sample`` per level over all batch
    images and heads at once.
    """
    n, _, heads, dim = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    # (N, Lq, M, L, P, 2) -> (L, N*M, Lq, P, 2): one grid per level, heads folded into the batch.
    grids = (2 * sampling_locations - 1).permute(3, 0, 2, 1, 4, 5).flatten(1, 2)
    weights = attention_weights.permute(3, 0, 2, 1, 4).flatten(1, 2)  # (L, N*M, Lq, P)
    out = value.new_zeros(n * heads, dim, lq)
    for level, (h, w) in enumerate(spatial_shapes):
        v = values[level].permute(0, 2, 3, 1).reshape(n * heads, dim, h, w)
        sampled = F.grid_sample(v, grids[level], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (N*M, D, Lq, P)
        out = out + (sampled * weights[level][:, None]).sum(-1)
    return out.view(n, heads * dim, lq).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Each query attends to ``num_points`` sampled locations per head and level around its
    reference point; offsets and weights are linear functions of the query (Zhu et al. 2021)."""

    def __init__(self, dim: int = 256, num_heads: int = 8, num_levels: int = 3,
                 num_points: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"deformable attention width {dim} does not divide into "
                              f"{num_heads} heads.")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR's init: zero offsets weights, the bias points each head in its own
        # direction at distances 1..P; uniform attention at first.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``query`` ``(N, Lq, C)``, ``reference_points`` ``(N or 1, Lq, 2)`` (x, y) in [0, 1]
        (the same on every level: no padding), ``value`` ``(N, S, C)``."""
        n, lq, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value).view(n, value.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).view(n, lq, heads, levels, points, 2)
        weights = self.attention_weights(query).view(n, lq, heads, levels * points)
        weights = weights.softmax(-1).view(n, lq, heads, levels, points)
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype,
                                  device=query.device)
        locations = reference_points[:, :, None, None, None, :] \
            + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(multi_scale_deformable_attention(v, spatial_shapes, locations,
                                                                 weights))


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels + FFN, post-norm (Deformable DETR's encoder)."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        x = self.self_attn_layer_norm(
            x + self.dropout(self.self_attn(x + pos, reference_points, x, spatial_shapes)))
        ffn = self.fc2(self.dropout(F.relu(self.fc1(x))))
        return self.final_layer_norm(x + self.dropout(ffn))


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, pos: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        # Reference point of every token: its pixel centre, normalised to [0, 1].
        refs = []
        for h, w in spatial_shapes:
            ys = (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5) / h
            xs = (torch.arange(w, dtype=x.dtype, device=x.device) + 0.5) / w
            refs.append(torch.stack((xs[None, :].expand(h, w), ys[:, None].expand(h, w)),
                                    -1).reshape(-1, 2))
        reference_points = torch.cat(refs)[None]
        for layer in self.layers:
            x = layer(x, pos, reference_points, spatial_shapes)
        return x


def conv_gn32(in_channels: int, out_channels: int, kernel_size: int, *, relu: bool,
              bias: bool = False) -> ConvGNReLU:
    """The pixel decoders' conv + GroupNorm(32) (+ ReLU), refusing widths GN(32) cannot split."""
    if out_channels % 32:
        raise ConfigError(f"GroupNorm(32) needs a width divisible by 32, got {out_channels}: set "
                          "head.feature_dim (and mask_dim) to a multiple of 32.")
    return ConvGNReLU(in_channels, out_channels, kernel_size, relu=relu, bias=bias)


def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    """detectron2's init of the FPN convs (kaiming uniform with a=1, zero bias)."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder. ``in_channels``: the maps it reads, fine to coarse; the last
    ``num_levels`` go through the deformable encoder, the finer ones are added FPN-style.
    ``forward`` returns the mask features (finest stride) and the encoder's maps, coarse to fine."""

    def __init__(self, in_channels: Sequence[int], feature_dim: int = 256, mask_dim: int = 256,
                 num_levels: int = 3, encoder_layers: int = 6, num_heads: int = 8,
                 num_points: int = 4, ffn_dim: int = 1024, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_levels = num_levels
        coarse = list(in_channels)[-num_levels:][::-1]  # coarse to fine, as the encoder's levels
        self.input_projections = nn.ModuleList(
            conv_gn32(c, feature_dim, 1, relu=False, bias=True) for c in coarse)
        for proj in self.input_projections:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.level_embed = nn.Parameter(torch.empty(num_levels, feature_dim))
        nn.init.normal_(self.level_embed)
        self.encoder = DeformableEncoder(encoder_layers, dim=feature_dim, num_heads=num_heads,
                                         num_levels=num_levels, num_points=num_points,
                                         ffn_dim=ffn_dim, dropout=dropout)
        # Finer maps, used coarse to fine after the encoder's finest level.
        fine = list(in_channels)[:-num_levels][::-1]
        self.lateral_convs = nn.ModuleList(
            conv_gn32(c, feature_dim, 1, relu=False) for c in fine)
        self.output_convs = nn.ModuleList(
            conv_gn32(feature_dim, feature_dim, 3, relu=True) for _ in fine)
        for block in [*self.lateral_convs, *self.output_convs]:
            _c2_xavier_fill(block[0])
        self.mask_projection = nn.Conv2d(feature_dim, mask_dim, 1)
        _c2_xavier_fill(self.mask_projection)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        coarse = list(features)[-self.num_levels:][::-1]
        shapes = [tuple(x.shape[-2:]) for x in coarse]
        tokens, pos = [], []
        for level, x in enumerate(coarse):
            tokens.append(self.input_projections[level](x).flatten(2).transpose(1, 2))
            pos.append(sine_position_embedding(*shapes[level], self.level_embed.shape[1],
                                               x.device, tokens[-1].dtype)
                       + self.level_embed[level])
        memory = self.encoder(torch.cat(tokens, 1), torch.cat(pos)[None], shapes)
        n = memory.shape[0]
        outs = [t.transpose(1, 2).reshape(n, -1, h, w)
                for t, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)]
        y = outs[-1]
        for feature, lateral, output in zip(list(features)[:-self.num_levels][::-1],
                                            self.lateral_convs, self.output_convs):
            lat = lateral(feature)
            y = output(lat + F.interpolate(y, size=lat.shape[-2:], mode="bilinear",
                                           align_corners=False))
        return self.mask_projection(y), outs


# --- masked-attention transformer decoder -------------------------------------------------------

class MaskedAttentionDecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN; post-norm (the reference's default) or
    pre-norm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float,
                 pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.cross_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        for p in self.parameters():  # the reference's _reset_parameters
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                query_pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            h = self.cross_attn_layer_norm(x)
            x = x + self.dropout(self.cross_attn(h + query_pos, memory + memory_pos, memory, mask))
            h = self.self_attn_layer_norm(x)
            x = x + self.dropout(self.self_attn(h + query_pos, h + query_pos, h))
            return x + self.dropout(self._ffn(self.final_layer_norm(x)))
        x = self.cross_attn_layer_norm(
            x + self.dropout(self.cross_attn(x + query_pos, memory + memory_pos, memory, mask)))
        q = x + query_pos
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(q, q, x)))
        return self.final_layer_norm(x + self.dropout(self._ffn(x)))


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's transformer decoder ("MultiScaleMaskedTransformerDecoder"). Returns the
    ``(class_logits, mask_logits)`` of the initial queries and of every layer."""

    def __init__(self, in_channels: int, num_classes: int, hidden_dim: int = 256,
                 num_queries: int = 100, num_heads: int = 8, num_layers: int = 9,
                 ffn_dim: int = 2048, mask_dim: int = 256, num_levels: int = 3,
                 dropout: float = 0.0, pre_norm: bool = False,
                 enforce_input_projection: bool = False) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.queries_embedder = nn.Embedding(num_queries, hidden_dim)   # query positions
        self.queries_features = nn.Embedding(num_queries, hidden_dim)   # initial query features
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        project = in_channels != hidden_dim or enforce_input_projection
        self.input_projections = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, 1) if project else nn.Identity()
            for _ in range(num_levels))
        for proj in self.input_projections:
            if isinstance(proj, nn.Conv2d):
                _c2_xavier_fill(proj)
        self.layers = nn.ModuleList(
            MaskedAttentionDecoderLayer(hidden_dim, num_heads, ffn_dim, dropout, pre_norm)
            for _ in range(num_layers))
        self.layernorm = nn.LayerNorm(hidden_dim)
        self.class_predictor = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embedder = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def _predict(self, x: torch.Tensor, mask_features: torch.Tensor,
                 attn_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layernorm(x)
        class_logits = self.class_predictor(x)
        mask_logits = torch.einsum("nqc,nchw->nqhw", self.mask_embedder(x), mask_features)
        # Where each query may attend at the next layer's scale: its mask's foreground.
        resized = F.interpolate(mask_logits.detach(), size=tuple(attn_size), mode="bilinear",
                                align_corners=False)
        allowed = (resized.sigmoid() >= 0.5).flatten(2)
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # an empty mask attends everywhere
        return class_logits, mask_logits, allowed[:, None]  # (N, 1, Q, hw): same for all heads

    def forward(self, features: Sequence[torch.Tensor],
                mask_features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``features``: the pixel decoder's ``num_levels`` maps, coarse to fine."""
        memories, positions, sizes = [], [], []
        for level, x in enumerate(features[:self.num_levels]):
            h, w = x.shape[-2:]
            sizes.append((h, w))
            mem = self.input_projections[level](x).flatten(2).transpose(1, 2)
            memories.append(mem + self.level_embed.weight[level])
            positions.append(sine_position_embedding(h, w, mem.shape[-1], x.device,
                                                     mem.dtype)[None])
        n = mask_features.shape[0]
        # repeat, not expand: a view of a parameter made under no_grad trips module hooks
        # (torch's FlopCounterMode) that expect a tensor requiring grad to have a grad_fn.
        x = self.queries_features.weight[None].repeat(n, 1, 1)
        query_pos = self.queries_embedder.weight[None].repeat(n, 1, 1)
        class_logits, mask_logits, mask = self._predict(x, mask_features, sizes[0])
        predictions = [(class_logits, mask_logits)]
        for i, layer in enumerate(self.layers):
            level = i % self.num_levels
            x = layer(x, memories[level], positions[level], query_pos, mask)
            class_logits, mask_logits, mask = self._predict(
                x, mask_features, sizes[(i + 1) % self.num_levels])
            predictions.append((class_logits, mask_logits))
        return predictions


def check_multiscale(head: str, in_index: Sequence[int], in_channels: Sequence[int],
                     in_reductions: Sequence[int], num_levels: int) -> list[int]:
    """Resolve ``in_index`` and check it names at least ``num_levels`` maps at distinct, growing
    strides (a single-scale ViT cannot feed a multi-scale pixel decoder)."""
    if len(set(in_reductions)) < num_levels:
        raise IncompatibleBackboneError(
            f"{head} needs a multi-scale backbone: at least {num_levels} feature maps at "
            f"different strides (e.g. 8, 16, 32), but it gives {len(in_channels)} map(s) at "
            f"strides {list(in_reductions)}. Use a hierarchical backbone (resnet50, swin_tiny, "
            "convnext_tiny, mit_b0, ...).")
    indices = resolve_in_index(head, in_index, in_channels, in_reductions)
    strides = [in_reductions[i] for i in indices]
    if len(indices) < num_levels or any(b <= a for a, b in zip(strides, strides[1:])):
        raise IncompatibleBackboneError(
            f"{head}: head.in_index={list(in_index)} selects maps at strides {strides}; it needs "
            f"at least {num_levels} maps, fine to coarse at growing strides (the backbone gives "
            f"strides {list(in_reductions)}). Set head.in_index to such maps or choose a "
            "hierarchical backbone.")
    return indices


class Mask2FormerHead(nn.Module):
    """Mask2Former: MSDeformAttn pixel decoder + masked-attention transformer decoder.

    Args:
        in_index: the maps read, fine to coarse (default: the last four, strides 4..32); the last
            three feed the deformable encoder and the masked attention, the finer ones the FPN
            path to the mask features.
        feature_dim, mask_dim: pixel decoder width and mask feature width (256, 256).
        encoder_layers, encoder_heads, encoder_points, encoder_ffn_dim: the deformable encoder
            (6 layers, 8 heads, 4 points, FFN 1024).
        hidden_dim, num_queries, num_heads, decoder_layers, decoder_ffn_dim: the transformer
            decoder (256, 100 queries, 8 heads, 9 layers, FFN 2048).
        dropout: in both transformers (0.0 in the reference's recipes).
        pre_norm: pre-norm decoder layers (False, the reference).
    """

    mask_classification = True  # returns MaskPredictions: trained by loss=mask_classification

    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: Sequence[int] = (-4, -3, -2, -1), feature_dim: int = 256,
                 mask_dim: int = 256, encoder_layers: int = 6, encoder_heads: int = 8,
                 encoder_points: int = 4, encoder_ffn_dim: int = 1024, hidden_dim: int = 256,
                 num_queries: int = 100, num_heads: int = 8, decoder_layers: int = 9,
                 decoder_ffn_dim: int = 2048, dropout: float = 0.0, pre_norm: bool = False,
                 enforce_input_projection: bool = False, num_levels: int = 3) -> None:
        super().__init__()
        self.num_inputs = len(in_channels)
        self.in_index = check_multiscale("Mask2FormerHead", in_index, in_channels, in_reductions,
                                         num_levels)
        channels = [in_channels[i] for i in self.in_index]
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            channels, feature_dim=feature_dim, mask_dim=mask_dim, num_levels=num_levels,
            encoder_layers=encoder_layers, num_heads=encoder_heads, num_points=encoder_points,
            ffn_dim=encoder_ffn_dim, dropout=dropout)
        self.transformer = MaskedAttentionDecoder(
            feature_dim, num_classes, hidden_dim=hidden_dim, num_queries=num_queries,
            num_heads=num_heads, num_layers=decoder_layers, ffn_dim=decoder_ffn_dim,
            mask_dim=mask_dim, num_levels=num_levels, dropout=dropout, pre_norm=pre_norm,
            enforce_input_projection=enforce_input_projection)
        self.reduction = in_reductions[self.in_index[0]]

    def forward(self, features: list[torch.Tensor]) -> MaskPredictions:
        maps = select_features(features, self.in_index, self.num_inputs)
        mask_features, multi_scale = self.pixel_decoder(maps)
        predictions = self.transformer(multi_scale, mask_features)
        class_logits, mask_logits = predictions[-1]
        return MaskPredictions(class_logits, mask_logits, aux=predictions[:-1])
