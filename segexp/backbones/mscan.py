"""MSCAN, the SegNeXt encoder (Guo et al., NeurIPS 2022, arXiv:2209.08575).

A convolutional network shaped like a hierarchical transformer. Stage 1 starts with a stem of
two 3x3 stride-2 convs (BN, GELU between them, BN after); stages 2-4 with an overlapping patch
embedding (3x3 stride-2 conv + BN). Each block (BatchNorm, not LayerNorm) is

    x = x + DropPath(layer_scale_1 * SpatialAttention(BN(x)))
    x = x + DropPath(layer_scale_2 * MLP(BN(x)))

where SpatialAttention is 1x1 conv -> GELU -> multi-scale convolutional attention (MSCA) -> 1x1
conv, plus its own shortcut, and MSCA is a 5x5 depthwise conv followed by three depthwise strip
branches (1x7 then 7x1, 1x11 then 11x1, 1x21 then 21x1) whose sum with the 5x5 output is mixed by
a 1x1 conv and multiplies the input (attention as a gate). The MLP is 1x1 conv -> 3x3 depthwise
conv -> GELU -> 1x1 conv; layer scales start at 0.01. Each stage ends with a LayerNorm over
channels. Outputs at strides 4, 8, 16, 32.

Variants (MMSegmentation ``configs/segnext`` = the official SegNeXt configs): MLP ratios
(8, 8, 4, 4) for all;

=====  =====================  ==============  ===============
name   embed dims             depths          drop path rate
=====  =====================  ==============  ===============
T      32, 64, 160, 256       3, 3, 5, 2      0.1
S      64, 128, 320, 512      2, 2, 4, 2      0.1
B      64, 128, 320, 512      3, 3, 12, 3     0.1
L      64, 128, 320, 512      3, 5, 27, 3     0.3
=====  =====================  ==============  ===============

Weights: ``checkpoint=PATH`` loads a local state dict of this class (or the ``backbone.*`` part of
a segexp checkpoint), or MMSegmentation's ImageNet-pretrained MSCAN files
(``mscan_t_20230227-119e8c9f.pth`` etc., keys ``patch_embed1.*``, ``block1.*``, ``norm1.*``),
converted on load. Files that do not fit are refused with the keys listed. segexp does not
download them: ``pretrained=true`` names the file to fetch, ``"auto"`` warns once and trains from
scratch (without a warning for a custom architecture, which has no published weights).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from segexp.backbones.staged import StagedEncoder
from segexp.nn import ChannelLayerNorm, drop_path_or_identity

# name -> (embed dims, depths)
MSCAN_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "t": ((32, 64, 160, 256), (3, 3, 5, 2)),
    "s": ((64, 128, 320, 512), (2, 2, 4, 2)),
    "b": ((64, 128, 320, 512), (3, 3, 12, 3)),
    "l": ((64, 128, 320, 512), (3, 5, 27, 3)),
}
MLP_RATIOS = (8, 8, 4, 4)
# ImageNet weights published with MMSegmentation (configs/segnext/*.py, `checkpoint_file`).
PRETRAINED_URLS = {
    "t": "https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segnext/mscan_t_20230227-119e8c9f.pth",
    "s": "https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segnext/mscan_s_20230227-f33ccdf2.pth",
    "b": "https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segnext/mscan_b_20230227-3ab7d230.pth",
    "l": "https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segnext/mscan_l_20230227-cef260d4.pth",
}


class StemConv(nn.Sequential):
    """Two 3x3 stride-2 convs (stride 4 in all): conv-BN-GELU-conv-BN."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__(
            nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(dim // 2),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1),
            nn.BatchNorm2d(dim),
        )


class PatchEmbed(nn.Module):
    """Overlapping patch embedding between stages: 3x3 stride-2 conv + BN."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class MultiScaleConvAttention(nn.Module):
    """MSCA: 5x5 depthwise conv, then strip-conv branches of lengths ``strip_sizes`` (each a 1xk
    then a kx1 depthwise conv) summed with it, 1x1 channel mixing, times the input."""

    def __init__(self, dim: int, strip_sizes: Sequence[int] = (7, 11, 21)) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.strips = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, (1, k), padding=(0, k // 2), groups=dim),
                          nn.Conv2d(dim, dim, (k, 1), padding=(k // 2, 0), groups=dim))
            for k in strip_sizes)
        self.conv3 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.conv0(x)
        attn = attn + sum(strip(attn) for strip in self.strips)
        return self.conv3(attn) * x


class SpatialAttention(nn.Module):
    """1x1 conv -> GELU -> MSCA -> 1x1 conv, with a shortcut."""

    def __init__(self, dim: int, strip_sizes: Sequence[int] = (7, 11, 21)) -> None:
        super().__init__()
        self.proj_1 = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()
        self.msca = MultiScaleConvAttention(dim, strip_sizes)
        self.proj_2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(self.msca(self.act(self.proj_1(x)))) + x


class ConvMlp(nn.Module):
    """1x1 conv -> 3x3 depthwise conv -> GELU -> 1x1 conv."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.dwconv(self.fc1(x))))))


class MSCANBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init: float = 1e-2, strip_sizes: Sequence[int] = (7, 11, 21)) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = SpatialAttention(dim, strip_sizes)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))


class MSCANStage(nn.Module):
    def __init__(self, embed: nn.Module, dim: int, mlp_ratio: float, drop: float,
                 drop_paths: Sequence[float], strip_sizes: Sequence[int]) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = nn.Sequential(*(MSCANBlock(dim, mlp_ratio, drop, dp, strip_sizes=strip_sizes)
                                      for dp in drop_paths))
        self.norm = ChannelLayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x))).contiguous()


class MSCAN(StagedEncoder):
    """MSCAN-T/S/B/L as a segexp backbone: 4 maps, ``channels`` = embed dims, strides 4..32.

    ``embed_dims`` / ``depths`` / ``mlp_ratios`` override the variant's values.
    """

    family = "MSCAN"
    prefix = "mscan"
    variants = MSCAN_VARIANTS

    def __init__(self, variant: str = "t", in_chans: int = 3, drop_path_rate: float = 0.1,
                 pretrained: bool | str = False, checkpoint: str | None = None, *,
                 embed_dims: Sequence[int] | None = None, depths: Sequence[int] | None = None,
                 mlp_ratios: Sequence[float] | None = None, drop_rate: float = 0.0,
                 strip_sizes: Sequence[int] = (7, 11, 21), size_divisor: int = 32) -> None:
        super().__init__(variant, embed_dims, depths)
        self.mlp_ratios = tuple(float(m) for m in (mlp_ratios or MLP_RATIOS))
        self.check_per_stage(embed_dims=self.dims, depths=self.depths, mlp_ratios=self.mlp_ratios)
        self.drop_rate = drop_rate
        self.strip_sizes = tuple(strip_sizes)
        self.build_stages(in_chans, drop_path_rate, size_divisor)
        # The published weights fit the paper's variants only: a custom MSCAN expects none.
        custom = (self.dims, self.depths, self.mlp_ratios, self.strip_sizes) != (
            self.default_dims, self.default_depths, MLP_RATIOS, (7, 11, 21))
        self.load_weights(
            pretrained, checkpoint, custom=custom, convert=convert_mmseg_mscan,
            remedy=(f"download MMSegmentation's ImageNet-pretrained MSCAN-{self.variant.upper()} "
                    f"elsewhere ({PRETRAINED_URLS[self.variant]}) and pass "
                    "backbone.checkpoint=/path/to/that/file (converted on load)"))

    def make_stage(self, index: int, in_chans: int, drop_paths: Sequence[float]) -> nn.Module:
        # Stage 1 starts with the stem; in_chans is the image's there and the previous stage's after.
        embed = StemConv(in_chans, self.dims[0]) if index == 0 else PatchEmbed(in_chans, self.dims[index])
        return MSCANStage(embed, self.dims[index], self.mlp_ratios[index], self.drop_rate, drop_paths,
                          self.strip_sizes)


# MMSegmentation MSCAN key -> ours, inside a block (after "block{i}.{j}.").
_MMSEG_BLOCK = [
    ("attn.spatial_gating_unit.conv0.", "attn.msca.conv0."),
    ("attn.spatial_gating_unit.conv0_1.", "attn.msca.strips.0.0."),
    ("attn.spatial_gating_unit.conv0_2.", "attn.msca.strips.0.1."),
    ("attn.spatial_gating_unit.conv1_1.", "attn.msca.strips.1.0."),
    ("attn.spatial_gating_unit.conv1_2.", "attn.msca.strips.1.1."),
    ("attn.spatial_gating_unit.conv2_1.", "attn.msca.strips.2.0."),
    ("attn.spatial_gating_unit.conv2_2.", "attn.msca.strips.2.1."),
    ("attn.spatial_gating_unit.conv3.", "attn.msca.conv3."),
    ("mlp.dwconv.dwconv.", "mlp.dwconv."),
]


def convert_mmseg_mscan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """MMSegmentation's MSCAN keys (``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}``, optionally
    under ``backbone.``) -> ours (``backbone.stages.{i-1}...``); None if ``state`` is not in that
    layout. Keys of other parts (an ImageNet ``head.*``, a ``decode_head.*``) are dropped."""
    strip = "backbone." if any(k.startswith("backbone.patch_embed1.") for k in state) else ""
    if not any(k.startswith(strip + "patch_embed1.") for k in state):
        return None
    out = {}
    for key, value in state.items():
        if not key.startswith(strip):
            continue
        key = key[len(strip):]
        m = re.match(r"^patch_embed1\.proj\.(\d+)\.(.*)$", key)
        if m:
            out[f"backbone.stages.0.embed.{m[1]}.{m[2]}"] = value
            continue
        m = re.match(r"^patch_embed(\d)\.(proj|norm)\.(.*)$", key)
        if m:
            out[f"backbone.stages.{int(m[1]) - 1}.embed.{m[2]}.{m[3]}"] = value
            continue
        m = re.match(r"^block(\d)\.(\d+)\.(.*)$", key)
        if m:
            rest = m[3]
            for old, new in _MMSEG_BLOCK:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[f"backbone.stages.{int(m[1]) - 1}.blocks.{m[2]}.{rest}"] = value
            continue
        m = re.match(r"^norm(\d)\.(.*)$", key)
        if m:
            out[f"backbone.stages.{int(m[1]) - 1}.norm.{m[2]}"] = value
            continue
        if not key.startswith(("head.", "decode_head.", "auxiliary_head.")):
            out[f"backbone.{key}"] = value  # unknown: kept, so the strict load names it
    return out
