"""The common frame of the four-stage hierarchical encoders implemented here (MiT, MSCAN).

Both are built the same way: a variant table (name -> embed dims, depths) that config overrides
may change, stochastic depth rising linearly over all blocks, four stages (each a patch embedding
+ blocks + a norm) giving maps at strides 4, 8, 16, 32, the official SegFormer / SegNeXt weight
initialisation, and one policy for weights: ``checkpoint=PATH`` loads a local file, segexp never
downloads them (``pretrained=true`` says what to fetch, ``"auto"`` warns once and trains from
scratch, silently for a custom architecture, which has no published weights).
A subclass declares the table and builds one stage in :meth:`StagedEncoder.make_stage`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from segexp.backbones.pretrained import checkpoint_source, pretrained_mode, scratch_source, warn_from_scratch
from segexp.errors import ConfigError
from segexp.nn import drop_path_rates, stage_outputs
from segexp.weights_io import load_weights_into, read_state_dict

NUM_STAGES = 4


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


class StagedEncoder(nn.Module):
    """Base class: ``channels`` = the stages' embed dims, ``reductions`` = [4, 8, 16, 32],
    ``forward`` returns the four stage outputs (NCHW).

    Class attributes a subclass sets: ``family`` (the name in messages, e.g. "MiT"), ``prefix``
    (the config names' prefix, ``backbone=<prefix>_<variant>``) and ``variants``
    (name -> (embed dims, depths)).
    """

    family: ClassVar[str]
    prefix: ClassVar[str]
    variants: ClassVar[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]

    def __init__(self, variant: str, embed_dims: Sequence[int] | None,
                 depths: Sequence[int] | None) -> None:
        super().__init__()
        variant = str(variant).lower().removeprefix(f"{self.prefix}_").removeprefix(f"{self.prefix}-")
        if variant not in self.variants:
            names = list(self.variants)
            raise ConfigError(f"{type(self).__name__}: unknown variant '{variant}'; choose one of "
                              f"{', '.join(names)} (backbone={self.prefix}_{names[0]} ... "
                              f"{self.prefix}_{names[-1]}).")
        self.variant = variant
        self.name = f"{self.prefix}_{variant}"
        default_dims, self.default_depths = self.variants[variant]
        self.default_dims = default_dims
        self.dims = tuple(int(d) for d in (embed_dims or default_dims))
        self.depths = tuple(int(d) for d in (depths or self.default_depths))

    def check_per_stage(self, **lists: Sequence) -> None:
        """Refuse per-stage options (``embed_dims=...``, ``depths=...``) not one entry per stage."""
        if any(len(v) != NUM_STAGES for v in lists.values()):
            names = list(lists)
            listed = ", ".join(names[:-1]) + f" and {names[-1]}"
            raise ConfigError(f"{type(self).__name__}: {listed} need one entry per stage "
                              f"({NUM_STAGES}).")

    def build_stages(self, in_chans: int, drop_path_rate: float, size_divisor: int) -> None:
        """Build the four stages with :meth:`make_stage`, stochastic depth rising linearly from 0 to
        ``drop_path_rate`` over all blocks, then initialise every weight."""
        rates = drop_path_rates(drop_path_rate, sum(self.depths))
        stages, c, start = [], in_chans, 0
        for i in range(NUM_STAGES):
            stages.append(self.make_stage(i, c, rates[start:start + self.depths[i]]))
            c, start = self.dims[i], start + self.depths[i]
        self.stages = nn.ModuleList(stages)
        self.channels: list[int] = list(self.dims)
        self.reductions: list[int] = [4, 8, 16, 32]
        self.size_divisor = size_divisor
        self.apply(init_weights)

    def make_stage(self, index: int, in_chans: int, drop_paths: Sequence[float]) -> nn.Module:
        """Stage ``index``: from ``in_chans`` channels to ``self.dims[index]``, one block per rate
        in ``drop_paths``."""
        raise NotImplementedError

    def load_weights(self, pretrained: bool | str, checkpoint: str | None, *, custom: bool,
                     remedy: str,
                     convert: Callable[[dict[str, torch.Tensor]], dict | None] | None) -> None:
        """Apply the weights policy and set ``pretrained_source``.

        ``custom``: the architecture differs from the published variant (no weights expected);
        ``remedy``: where to get the published file and how to pass it; ``convert``: the foreign
        layouts ``checkpoint`` may be in (see ``load_backbone_checkpoint``).
        """
        mode = pretrained_mode(pretrained)
        cannot = f"segexp cannot download {self.family} weights"
        if checkpoint:
            load_backbone_checkpoint(self, checkpoint, convert=convert)
            self.pretrained_source = checkpoint_source(checkpoint)
        elif mode == "true":
            raise ConfigError(f"backbone.pretrained=true: {cannot}. To use them, {remedy}, or "
                              "train from scratch with backbone.pretrained=false.")
        else:
            if mode == "auto" and not custom:
                warn_from_scratch(self.name, cannot, remedy)
            self.pretrained_source = scratch_source(
                mode, f"a custom {self.family} has no published weights" if custom else cannot)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return stage_outputs(self.stages, x)


# -- checkpoint files (MiT and MSCAN) ---------------------------------------------------------------
def load_backbone_checkpoint(module: nn.Module, checkpoint: str | Path, convert=None) -> None:
    """Load a local file into ``module`` strictly.

    Accepted layouts: the module's own state dict; a segexp model / training checkpoint (keys
    ``backbone.*``, other keys ignored); whatever ``convert(state)`` recognises (it returns the
    converted dict, with ``backbone.*`` keys, or None). Refuses a file with missing, unexpected or
    mis-shaped keys, naming them.
    """
    name = getattr(module, "name", type(module).__name__)
    state = read_state_dict(checkpoint, "backbone.checkpoint", expected=(
        f"a saved state dict (.pth, .bin or .safetensors) of backbone '{name}'"))
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    converted = convert(state) if convert is not None else None
    if converted is not None:
        state = converted
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items()
                 if k.startswith("backbone.")}
    load_weights_into(module, state, option="backbone.checkpoint", path=checkpoint,
                      target=f"backbone '{name}'",
                      remedy="Use weights of the same variant (or choose the backbone that "
                             "matches the file).")
