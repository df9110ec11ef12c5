"""Lite-HRNet (Yu et al., CVPR 2021, "Lite-HRNet: A Lightweight High-Resolution Network").

A high-resolution network whose blocks replace HRNet's costly 1x1 convs with *conditional channel
weighting* (CCW): half of every branch's channels pass through, the other half is re-weighted by

* cross-resolution weighting: all branches pooled to the smallest size, two 1x1 convs (ratio
  ``reduce_ratio``, BN, ReLU / sigmoid) give per-channel, per-position weights for every branch;
* a depthwise 3x3 conv (BN, no activation);
* spatial weighting: an SE block per branch (ratio 4, no BN);

then the halves are concatenated and channel-shuffled. A stage repeats modules of ``num_blocks``
CCW blocks followed by HRNet's multi-resolution fusion; the stem is a 3x3 stride-2 conv + a
ShuffleNet-like block.

Settings (checked against the official repository HRNet/Lite-HRNet and OpenVINO Training
Extensions' ``LiteHRNetBackbone``):

=========  ================  =============  ================  ==========================
variant    stem              num_modules    num_branches      channels
=========  ================  =============  ================  ==========================
``18``     32, s2 + s2       (2, 4, 2)      (2, 3, 4)         40, 80, 160, 320
``30``     32, s2 + s2       (3, 8, 3)      (2, 3, 4)         40, 80, 160, 320
``s``      32, s2 + s2 + s2  (4, 4)         (2, 3)            60, 120, 240  (OTX lite_hrnet_s)
``x``      60, s2 + s1       (2, 4, 4, 2)   (2, 3, 4, 5)      18, 60, 80, 160, 320 (OTX)
=========  ================  =============  ================  ==========================

num_blocks 2 everywhere; reduce ratios 8 (``x``: 2, 4, 8, 8). The backbone returns every branch of
the last stage, shallow to deep: strides 4, 8, 16, 32 for ``18``/``30``, 8, 16, 32 for ``s``,
2 ... 32 for ``x``. Parameter and module names follow the official code, so a converted
checkpoint's ``backbone.*`` keys load as they are.

The official fusion (and OTX's copy) starts its sum with branch 0 and then adds every branch
*including* branch 0 again, in place: branch 0 is counted twice and the tensor holding it is
overwritten with fused output 0 before the other outputs read it. ``fuse_mode="reference"``
(default) reproduces that exactly, so published weights behave as trained; ``fuse_mode="hrnet"``
sums each branch once, as HRNet does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segexp.backbones.pretrained import pretrained_mode, scratch_source
from segexp.errors import ConfigError

ARCHS: dict[str, dict] = {
    "18": dict(stem=dict(stem_channels=32, out_channels=32, expand_ratio=1, strides=(2, 2),
                         extra_stride=False),
               num_modules=(2, 4, 2), num_branches=(2, 3, 4), num_blocks=(2, 2, 2),
               reduce_ratios=(8, 8, 8),
               num_channels=((40, 80), (40, 80, 160), (40, 80, 160, 320))),
    "30": dict(stem=dict(stem_channels=32, out_channels=32, expand_ratio=1, strides=(2, 2),
                         extra_stride=False),
               num_modules=(3, 8, 3), num_branches=(2, 3, 4), num_blocks=(2, 2, 2),
               reduce_ratios=(8, 8, 8),
               num_channels=((40, 80), (40, 80, 160), (40, 80, 160, 320))),
    "s": dict(stem=dict(stem_channels=32, out_channels=32, expand_ratio=1, strides=(2, 2),
                        extra_stride=True),
              num_modules=(4, 4), num_branches=(2, 3), num_blocks=(2, 2), reduce_ratios=(8, 8),
              num_channels=((60, 120), (60, 120, 240))),
    "x": dict(stem=dict(stem_channels=60, out_channels=60, expand_ratio=1, strides=(2, 1),
                        extra_stride=False),
              num_modules=(2, 4, 4, 2), num_branches=(2, 3, 4, 5), num_blocks=(2, 2, 2, 2),
              reduce_ratios=(2, 4, 8, 8),
              num_channels=((18, 60), (18, 60, 80), (18, 60, 80, 160), (18, 60, 80, 160, 320))),
}


class ConvModule(nn.Module):
    """Conv + optional BN + optional activation, named like MMCV's ConvModule (``conv``, ``bn``)
    so official checkpoints load; the conv has a bias only when no BN follows."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *,
                 stride: int = 1, groups: int = 1, norm: bool = True,
                 act: type[nn.Module] | None = nn.ReLU) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, groups=groups, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = act() if act is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.activate(x) if self.activate is not None else x


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class SpatialWeighting(nn.Module):
    """Squeeze-and-excitation on one branch (no BN, biases on)."""

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = ConvModule(channels, int(channels / ratio), norm=False, act=nn.ReLU)
        self.conv2 = ConvModule(int(channels / ratio), channels, norm=False, act=nn.Sigmoid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv2(self.conv1(self.global_avgpool(x)))


class CrossResolutionWeighting(nn.Module):
    """Weights for every branch computed from all branches pooled to the smallest one's size."""

    def __init__(self, channels: Sequence[int], ratio: int = 16) -> None:
        super().__init__()
        self.channels = list(channels)
        total = sum(self.channels)
        self.conv1 = ConvModule(total, int(total / ratio), act=nn.ReLU)
        self.conv2 = ConvModule(int(total / ratio), total, act=nn.Sigmoid)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        size = x[-1].shape[-2:]
        pooled = torch.cat([F.adaptive_avg_pool2d(s, size) for s in x[:-1]] + [x[-1]], dim=1)
        weights = torch.split(self.conv2(self.conv1(pooled)), self.channels, dim=1)
        return [s * F.interpolate(a, size=s.shape[-2:], mode="nearest")
                for s, a in zip(x, weights, strict=True)]


class ConditionalChannelWeighting(nn.Module):
    """The Lite-HRNet block: split, weight half the channels, concatenate, shuffle."""

    def __init__(self, in_channels: Sequence[int], reduce_ratio: int) -> None:
        super().__init__()
        branch_channels = [c // 2 for c in in_channels]
        self.cross_resolution_weighting = CrossResolutionWeighting(branch_channels,
                                                                   ratio=reduce_ratio)
        self.depthwise_convs = nn.ModuleList(ConvModule(c, c, 3, groups=c, act=None)
                                             for c in branch_channels)
        self.spatial_weighting = nn.ModuleList(SpatialWeighting(c, ratio=4)
                                               for c in branch_channels)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        halves = [s.chunk(2, dim=1) for s in x]
        kept, weighted = [h[0] for h in halves], [h[1] for h in halves]
        weighted = self.cross_resolution_weighting(weighted)
        weighted = [sw(dw(s)) for s, dw, sw in zip(weighted, self.depthwise_convs,
                                                   self.spatial_weighting, strict=True)]
        return [channel_shuffle(torch.cat([a, b], dim=1), 2)
                for a, b in zip(kept, weighted, strict=True)]


class Stem(nn.Module):
    """3x3 stride-2 ConvBNReLU (+ an extra one for ``extra_stride``), then a ShuffleNet-v2 style
    block: one half of the channels through a strided depthwise + 1x1 conv, the other through
    1x1 expand, strided depthwise and 1x1 linear convs; concatenated and shuffled."""

    def __init__(self, in_channels: int, stem_channels: int, out_channels: int,
                 expand_ratio: float, strides: Sequence[int] = (2, 2),
                 extra_stride: bool = False) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.reduction = strides[0] * (2 if extra_stride else 1) * strides[1]
        self.conv1 = ConvModule(in_channels, stem_channels, 3, stride=strides[0])
        self.conv2 = ConvModule(stem_channels, stem_channels, 3, stride=2) if extra_stride \
            else None
        mid_channels = int(round(stem_channels * expand_ratio))
        branch_channels = stem_channels // 2
        same = stem_channels == out_channels
        inc_channels = out_channels - (branch_channels if same else stem_channels)
        self.branch1 = nn.Sequential(
            ConvModule(branch_channels, branch_channels, 3, stride=strides[1],
                       groups=branch_channels, act=None),
            ConvModule(branch_channels, inc_channels),
        )
        self.expand_conv = ConvModule(branch_channels, mid_channels)
        self.depthwise_conv = ConvModule(mid_channels, mid_channels, 3, stride=strides[1],
                                         groups=mid_channels, act=None)
        self.linear_conv = ConvModule(mid_channels, branch_channels if same else stem_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.conv2 is not None:
            x = self.conv2(x)
        x1, x2 = x.chunk(2, dim=1)
        x2 = self.linear_conv(self.depthwise_conv(self.expand_conv(x2)))
        return channel_shuffle(torch.cat([self.branch1(x1), x2], dim=1), 2)


def _dw_down(in_channels: int, out_channels: int, relu: bool) -> nn.Sequential:
    """Depthwise 3x3 stride-2 conv + BN + 1x1 conv + BN (+ ReLU): a 2x downsampling step."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels,
                  bias=False),
        nn.BatchNorm2d(in_channels),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class LiteHRModule(nn.Module):
    """``num_blocks`` CCW blocks over all branches, then multi-resolution fusion (every output
    branch sums all branches brought to its resolution: 1x1 conv + BN + nearest upsampling from
    deeper branches, strided depthwise-separable convs from shallower ones), then ReLU."""

    def __init__(self, in_channels: Sequence[int], num_blocks: int, reduce_ratio: int,
                 fuse_mode: str = "reference") -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.num_branches = len(self.in_channels)
        self.fuse_mode = fuse_mode
        self.layers = nn.Sequential(*(ConditionalChannelWeighting(self.in_channels, reduce_ratio)
                                      for _ in range(num_blocks)))
        self.fuse_layers = self._make_fuse_layers()
        self.relu = nn.ReLU()

    def _make_fuse_layers(self) -> nn.ModuleList:
        c = self.in_channels
        rows = []
        for i in range(self.num_branches):
            row: list[nn.Module | None] = []
            for j in range(self.num_branches):
                if j > i:  # deeper -> shallower: 1x1 conv + BN, upsampled in forward
                    row.append(nn.Sequential(nn.Conv2d(c[j], c[i], 1, bias=False),
                                             nn.BatchNorm2d(c[i])))
                elif j == i:
                    row.append(None)
                else:  # shallower -> deeper: (i - j) strided steps, the last one to c[i]
                    row.append(nn.Sequential(*(
                        _dw_down(c[j], c[i] if k == i - j - 1 else c[j], relu=k < i - j - 1)
                        for k in range(i - j))))
            rows.append(nn.ModuleList(row))
        return nn.ModuleList(rows)

    def _from(self, i: int, j: int, x: torch.Tensor, size) -> torch.Tensor:
        y = self.fuse_layers[i][j](x)
        if j > i or y.shape[-2:] != size:
            y = F.interpolate(y, size=size, mode="nearest")
        return y

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        out = self.layers(x)
        sizes = [o.shape[-2:] for o in out]
        n = self.num_branches
        if self.fuse_mode == "hrnet":
            return [self.relu(sum(out[j] if j == i else self._from(i, j, out[j], sizes[i])
                                  for j in range(n))) for i in range(n)]
        # The official loop, without its in-place writes: output 0 is 2 * branch 0 + the rest;
        # that pre-ReLU sum replaces branch 0 for every later output, which adds it twice too.
        rest0 = [self._from(0, j, out[j], sizes[0]) for j in range(1, n)]
        fused0 = 2 * out[0] + sum(rest0) if rest0 else 2 * out[0]
        outs = [self.relu(fused0)]
        for i in range(1, n):
            y = 2 * self._from(i, 0, fused0, sizes[i])
            for j in range(1, n):
                y = y + (out[j] if j == i else self._from(i, j, out[j], sizes[i]))
            outs.append(self.relu(y))
        return outs


class LiteHRNet(nn.Module):
    """Lite-HRNet backbone: ``forward(x)`` returns the last stage's branches, shallow to deep.

    ``variant``: ``"18"``, ``"30"`` (the paper's), ``"s"``, ``"x"`` (OpenVINO Training
    Extensions'). Weights are initialised as the official code does without a checkpoint
    (convs normal(0, 0.001), BN weight 1, bias 0); there are no pretrained weights to load
    (``pretrained="auto"``: from scratch, no warning; ``True``: refused).
    """

    def __init__(self, variant: str = "18", in_channels: int = 3,
                 fuse_mode: str = "reference", size_divisor: int | None = None,
                 pretrained: bool | str = False) -> None:
        super().__init__()
        variant = str(variant)
        if variant not in ARCHS:
            raise ConfigError(f"LiteHRNet: unknown variant '{variant}'; choose one of "
                              f"{', '.join(ARCHS)}.")
        mode = pretrained_mode(pretrained)
        if mode == "true":
            raise ConfigError("backbone.pretrained=true: segexp has no Lite-HRNet weights to load "
                              "(none are published in its layout). Use backbone.pretrained=auto or "
                              "false, or model.checkpoint=<a segexp run's checkpoint>.")
        # No weights segexp could load, so nothing to warn about under auto.
        self.pretrained_source = scratch_source(mode, "segexp has no Lite-HRNet weights to load")
        if fuse_mode not in ("reference", "hrnet"):
            raise ConfigError(f"LiteHRNet: fuse_mode={fuse_mode}; choose reference or hrnet.")
        arch = ARCHS[variant]
        self.variant = variant
        self.name = f"litehrnet_{variant}"
        self.stem = Stem(in_channels, **arch["stem"])
        self.num_stages = len(arch["num_modules"])
        self.num_branches = arch["num_branches"]
        channels_last = [self.stem.out_channels]
        for i in range(self.num_stages):
            channels = list(arch["num_channels"][i])
            setattr(self, f"transition{i}", self._make_transition(channels_last, channels))
            modules = [LiteHRModule(channels, arch["num_blocks"][i], arch["reduce_ratios"][i],
                                    fuse_mode) for _ in range(arch["num_modules"][i])]
            setattr(self, f"stage{i}", nn.Sequential(*modules))
            channels_last = channels
        self.channels: list[int] = channels_last
        self.reductions: list[int] = [self.stem.reduction * 2 ** i
                                      for i in range(len(channels_last))]
        # Every branch halves the previous one exactly, and the fusion adds them elementwise.
        self.size_divisor = size_divisor or self.reductions[-1]
        self._init_weights()

    @staticmethod
    def _make_transition(previous: list[int], current: list[int]) -> nn.ModuleList:
        layers: list[nn.Module | None] = []
        for i, c in enumerate(current):
            if i < len(previous):
                if c != previous[i]:  # depthwise 3x3 + BN + 1x1 + BN + ReLU, same resolution
                    p = previous[i]
                    layers.append(nn.Sequential(
                        nn.Conv2d(p, p, 3, padding=1, groups=p, bias=False), nn.BatchNorm2d(p),
                        nn.Conv2d(p, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()))
                else:
                    layers.append(None)
            else:  # a new, deeper branch from the deepest previous one
                p = previous[-1]
                steps = i + 1 - len(previous)
                layers.append(nn.Sequential(*(_dw_down(p, c if k == steps - 1 else p, relu=True)
                                              for k in range(steps))))
        return nn.ModuleList(layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y_list = [self.stem(x)]
        for i in range(self.num_stages):
            transition = getattr(self, f"transition{i}")
            x_list = []
            for j in range(self.num_branches[i]):
                source = y_list[j] if j < len(y_list) else y_list[-1]
                x_list.append(transition[j](source) if transition[j] is not None else source)
            y_list = getattr(self, f"stage{i}")(x_list)
        return list(y_list)
