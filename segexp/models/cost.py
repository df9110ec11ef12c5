"""Size and compute of a composed model, without building its weights."""

from __future__ import annotations

import torch

from segexp.config import compose_train_config
from segexp.models import build_model
from segexp.profiling import count_gflops, count_params


def model_cost(overrides: list[str], size: tuple[int, int] = (512, 512)) -> tuple[float, float]:
    """(params in millions, GMACs at ``size``) of the model the train overrides compose, built on
    the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = build_model(compose_train_config(list(overrides))[0], pretrained=False)
    return count_params(model) / 1e6, count_gflops(model, size, device="meta")
