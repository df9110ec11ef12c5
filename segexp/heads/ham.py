"""SegNeXt's decode head, LightHamHead (Guo et al., NeurIPS 2022; the "Hamburger" of Geng et al.,
ICLR 2021, "Is Attention Better Than Matrix Decomposition?").

The last three maps (strides 8, 16, 32 on MSCAN; MMSegmentation's ``in_index=[1, 2, 3]``) are
resized to the finest of them and concatenated; a 1x1 conv + GroupNorm(32) + ReLU squeezes them
to ``ham_channels``; the Hamburger refines the result globally:

    y = relu(conv1x1(x))                      # "lower bread", with bias, no norm
    y = NMF(y)                                # "ham": non-negative matrix factorisation
    out = relu(x + GN(conv1x1(y)))            # "upper bread" + residual

then a 1x1 conv + GN + ReLU aligns to ``channels``, and dropout 0.1 + a 1x1 classifier give logits
at stride 8. As in MMSegmentation's ``ham_head.py``, the NMF reconstructs the (C, H*W) feature
matrix from ``md_r`` non-negative bases: bases are drawn at random for every forward pass
(``rand_init``), coefficients start as a softmax of bases^T x, and ``train_steps`` (6) /
``eval_steps`` (7) multiplicative updates run with gradients, then one more coefficient update.
MMSegmentation's configs pass ``inv_t=100`` but its NMF2D overrides it to 1; ``inv_t`` here is the
value actually used (1).

Settings per size (MMSegmentation ``configs/segnext``): T and S: channels = ham_channels = 256;
B: 512; L: 1024; ``md_r`` 16 (the official SegNeXt configs leave B and L at the default 64).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segexp.errors import ConfigError, IncompatibleBackboneError
from segexp.heads.common import Classifier, resize, resolve_in_index, select_features
from segexp.nn import ConvGNReLU


class NMF2D(nn.Module):
    """Non-negative matrix factorisation of each sample's (C / S, H*W) matrix, S = ``md_s``,
    with ``md_r`` bases, solved by multiplicative updates. No learned parameters."""

    def __init__(self, channels: int, md_s: int = 1, md_r: int = 16, train_steps: int = 6,
                 eval_steps: int = 7, inv_t: float = 1.0, rand_init: bool = True,
                 eps: float = 1e-6) -> None:
        super().__init__()
        if channels % md_s:
            raise ConfigError(f"LightHamHead: ham_channels={channels} must divide by md_s={md_s}.")
        self.S, self.D, self.R = md_s, channels // md_s, md_r
        self.train_steps, self.eval_steps = train_steps, eval_steps
        self.inv_t, self.rand_init, self.eps = inv_t, rand_init, eps
        if not rand_init:  # fixed bases, drawn once and saved with the model
            self.register_buffer("bases", F.normalize(torch.rand(self.S, self.D, self.R), dim=1))

    def _update_coef(self, x, bases, coef):
        # coef (B*S, N, R) <- coef * (x^T bases) / (coef bases^T bases)
        return coef * torch.bmm(x.transpose(1, 2), bases) / (
            coef.bmm(bases.transpose(1, 2).bmm(bases)) + self.eps)

    def _update_bases(self, x, bases, coef):
        # bases (B*S, D, R) <- bases * (x coef) / (bases coef^T coef)
        return bases * torch.bmm(x, coef) / (bases.bmm(coef.transpose(1, 2).bmm(coef)) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        dtype = x.dtype
        # Multiplicative updates in fp32 (the meta device, used to count FLOPs, has no autocast).
        no_autocast = contextlib.nullcontext() if x.device.type == "meta" else \
            torch.autocast(x.device.type, enabled=False)
        with no_autocast:
            x = x.float().reshape(b * self.S, self.D, h * w)
            if self.rand_init:
                bases = F.normalize(torch.rand(b * self.S, self.D, self.R, device=x.device), dim=1)
            else:
                bases = self.bases.float().repeat(b, 1, 1)
            coef = F.softmax(self.inv_t * torch.bmm(x.transpose(1, 2), bases), dim=-1)
            for _ in range(self.train_steps if self.training else self.eval_steps):
                coef = self._update_coef(x, bases, coef)
                bases = self._update_bases(x, bases, coef)
            coef = self._update_coef(x, bases, coef)
            out = torch.bmm(bases, coef.transpose(1, 2))  # (B*S, D, N)
        return out.reshape(b, c, h, w).to(dtype)


class Hamburger(nn.Module):
    def __init__(self, channels: int, groups: int, **nmf_kwargs) -> None:
        super().__init__()
        self.ham_in = nn.Conv2d(channels, channels, 1)
        self.ham = NMF2D(channels, **nmf_kwargs)
        self.ham_out = ConvGNReLU(channels, channels, groups=groups, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ham_out(self.ham(F.relu(self.ham_in(x))))
        return F.relu(x + y)


class LightHamHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], in_reductions: Sequence[int], num_classes: int,
                 *, in_index: int | Sequence[int] = (-3, -2, -1), channels: int = 256,
                 ham_channels: int = 256, md_s: int = 1, md_r: int = 16, train_steps: int = 6,
                 eval_steps: int = 7, inv_t: float = 1.0, rand_init: bool = True,
                 norm_groups: int = 32, dropout: float = 0.1, align_corners: bool = False) -> None:
        super().__init__()
        self.num_inputs = len(in_channels)
        try:
            self.in_index = resolve_in_index("LightHamHead", in_index, in_channels, in_reductions)
        except IncompatibleBackboneError as err:
            n = 1 if isinstance(in_index, int) else len(in_index)
            raise IncompatibleBackboneError(
                f"{err} Backbones with at least {n} feature maps fit (mscan_t..mscan_l, "
                "mit_b0..mit_b5, resnet*, convnext_*).") from err
        for option, value in (("ham_channels", ham_channels), ("channels", channels)):
            if value % norm_groups:
                raise ConfigError(f"LightHamHead: {option}={value} must be a multiple of "
                                  f"norm_groups={norm_groups} (GroupNorm).")
        self.align_corners = align_corners
        self.squeeze = ConvGNReLU(sum(in_channels[i] for i in self.in_index), ham_channels,
                                  groups=norm_groups)
        self.hamburger = Hamburger(ham_channels, norm_groups, md_s=md_s, md_r=md_r,
                                   train_steps=train_steps, eval_steps=eval_steps, inv_t=inv_t,
                                   rand_init=rand_init)
        self.align = ConvGNReLU(ham_channels, channels, groups=norm_groups)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        maps = select_features(features, self.in_index, self.num_inputs)
        size = max((tuple(m.shape[-2:]) for m in maps), key=lambda s: s[0] * s[1])  # finest
        x = torch.cat([resize(m, size, self.align_corners) for m in maps], dim=1)
        return self.classifier(self.align(self.hamburger(self.squeeze(x))))
