"""Mix Transformer (MiT), the SegFormer encoder (Xie et al., NeurIPS 2021, arXiv:2105.15203).

Four stages, each: an overlapping patch embedding (a strided conv: 7x7 stride 4, then 3x3 stride
2, + LayerNorm), transformer blocks with *efficient self-attention* (keys and values come from a
copy of the tokens shrunk by a ``sr_ratio`` x ``sr_ratio`` strided conv: 8, 4, 2, 1) and a
*Mix-FFN* (Linear -> 3x3 depthwise conv -> GELU -> Linear; the depthwise conv replaces position
embeddings), then a LayerNorm. Feature maps come out at strides 4, 8, 16, 32.

Variants B0..B5 follow the paper's Table 6 / the official code (NVlabs/SegFormer
``mix_transformer.py``; MMSegmentation's ``mit.py`` and configs): heads (1, 2, 5, 8), MLP ratio 4,
stochastic depth 0.1, LayerNorm eps 1e-6 in blocks and stage norms (the patch embedding and
key/value reduction norms use PyTorch's default 1e-5, as the official code).

Weights: ``checkpoint=PATH`` loads a local file: a state dict of this class (also the
``backbone.*`` part of a segexp model or training checkpoint), or a Hugging Face SegFormer/MiT
file (``nvidia/mit-b0`` ... ``nvidia/mit-b5``, ``pytorch_model.bin`` or ``model.safetensors``),
converted by :func:`segexp.convert.hf_segformer.convert_hf_segformer`. Files that do not fit are
refused with the keys listed, never loaded partially. segexp does not download MiT weights:
``pretrained=true`` says where to get them, ``"auto"`` warns once and trains from scratch (without
a warning for a custom architecture, which has no published weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segexp.backbones.staged import StagedEncoder
from segexp.errors import ConfigError
from segexp.nn import drop_path_or_identity

# name -> (embed dims, depths); heads, sr ratios and MLP ratios are shared by all variants.
MIT_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIOS = (4, 4, 4, 4)
PATCH_SIZES = (7, 3, 3, 3)
STRIDES = (4, 2, 2, 2)
BLOCK_NORM_EPS = 1e-6


class OverlapPatchEmbed(nn.Module):
    """Strided conv with "same"-style padding (overlapping patches) + LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw  # (B, H*W, C)


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys/values are computed from tokens shrunk by a
    ``sr_ratio`` x ``sr_ratio`` stride-``sr_ratio`` conv (+ LayerNorm): cost N * N / sr^2."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"MiT: embedding dim {dim} does not divide into {num_heads} heads.")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        kv = x
        if self.sr_ratio > 1:
            kv = x.transpose(1, 2).reshape(b, c, *hw)
            kv = self.sr_norm(self.sr(kv).flatten(2).transpose(1, 2))
        out = F.scaled_dot_product_attention(
            self._heads(self.q(x)), self._heads(self.k(kv)), self._heads(self.v(kv)),
            dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv (on the token grid) -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, *hw)).flatten(2).transpose(1, 2)
        return self.drop(self.fc2(self.drop(self.act(x))))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: x + DropPath(attn(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x), hw))


class MiTStage(nn.Module):
    def __init__(self, in_chans: int, dim: int, depth: int, *, patch_size: int, stride: int,
                 num_heads: int, sr_ratio: int, mlp_ratio: float, qkv_bias: bool, drop: float,
                 attn_drop: float, drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_chans, dim, patch_size, stride)
        self.blocks = nn.ModuleList(
            MiTBlock(dim, num_heads, sr_ratio, mlp_ratio, qkv_bias, drop, attn_drop, dp)
            for dp in drop_paths)
        self.norm = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, hw = self.patch_embed(x)
        for block in self.blocks:
            x = block(x, hw)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *hw)  # back to NCHW


class MixVisionTransformer(StagedEncoder):
    """MiT-B0..B5 as a segexp backbone: 4 maps, ``channels`` = embed dims, strides 4..32.

    ``depths`` / ``embed_dims`` / ``num_heads`` / ``sr_ratios`` / ``mlp_ratios`` override the
    variant's values (e.g. a shallow B2 for quick experiments).
    """

    family = "MiT"
    prefix = "mit"
    variants = MIT_VARIANTS

    def __init__(self, variant: str = "b0", in_chans: int = 3, drop_path_rate: float = 0.1,
                 pretrained: bool | str = False, checkpoint: str | None = None, *,
                 embed_dims: Sequence[int] | None = None, depths: Sequence[int] | None = None,
                 num_heads: Sequence[int] | None = None, sr_ratios: Sequence[int] | None = None,
                 mlp_ratios: Sequence[float] | None = None, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 size_divisor: int = 32) -> None:
        super().__init__(variant, embed_dims, depths)
        self.num_heads = tuple(int(h) for h in (num_heads or NUM_HEADS))
        self.sr_ratios = tuple(int(s) for s in (sr_ratios or SR_RATIOS))
        self.mlp_ratios = tuple(float(m) for m in (mlp_ratios or MLP_RATIOS))
        self.check_per_stage(embed_dims=self.dims, depths=self.depths, num_heads=self.num_heads,
                             sr_ratios=self.sr_ratios, mlp_ratios=self.mlp_ratios)
        self.block_options = dict(qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate)
        self.build_stages(in_chans, drop_path_rate, size_divisor)
        # The published weights fit the paper's variants only: a custom MiT expects none.
        custom = (self.dims, self.depths, self.num_heads, self.sr_ratios, self.mlp_ratios) != (
            self.default_dims, self.default_depths, NUM_HEADS, SR_RATIOS, MLP_RATIOS)
        self.load_weights(
            pretrained, checkpoint, custom=custom, convert=_convert_foreign,
            remedy=(f"download the ImageNet-pretrained encoder 'nvidia/mit-{self.variant}' from "
                    "the Hugging Face Hub elsewhere (its pytorch_model.bin or model.safetensors) "
                    "and pass backbone.checkpoint=/path/to/that/file (converted on load)"))

    def make_stage(self, index: int, in_chans: int, drop_paths: Sequence[float]) -> nn.Module:
        i = index
        return MiTStage(in_chans, self.dims[i], self.depths[i], patch_size=PATCH_SIZES[i],
                        stride=STRIDES[i], num_heads=self.num_heads[i], sr_ratio=self.sr_ratios[i],
                        mlp_ratio=self.mlp_ratios[i], drop_paths=drop_paths, **self.block_options)


def _convert_foreign(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A Hugging Face SegFormer / MiT state dict -> ours (``backbone.*`` keys); None otherwise."""
    from segexp.convert.hf_segformer import convert_hf_segformer, is_hf_segformer

    return convert_hf_segformer(state) if is_hf_segformer(state) else None


