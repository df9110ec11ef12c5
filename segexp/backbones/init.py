"""Weight initialisation shared by the encoders implemented here (MiT, MSCAN)."""

from __future__ import annotations

from torch import nn


def init_weights(m: nn.Module) -> None:
    """The official SegFormer / SegNeXt initialisation: truncated normal (std 0.02) linears, unit
    LayerNorms, He-style normal convs (fan-out over groups), zero biases. BatchNorms keep
    PyTorch's unit/zero defaults. Use as ``module.apply(init_weights)``."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, std=(2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
