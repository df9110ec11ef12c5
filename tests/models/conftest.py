"""Helpers of the model tests."""

from __future__ import annotations

from torch import nn


def n_params(module: nn.Module) -> int:
    """The parameter count of ``module``, as the papers' tables count it."""
    return sum(p.numel() for p in module.parameters())
