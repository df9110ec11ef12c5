"""Every default variant with a published parameter count stays within 2 % of it."""

from __future__ import annotations

import pytest
import torch
import yaml

from segexp.models import build_model
from tests.conftest import ROOT, compose_config

PUBLISHED = yaml.safe_load((ROOT / "segexp" / "models" /
                            "published.yaml").read_text())


@pytest.mark.parametrize("entry", PUBLISHED, ids=[e["name"] for e in PUBLISHED])
def test_parameter_count_matches_the_paper(entry):
    with torch.device("meta"):  # shapes only: even ViT-L costs no memory
        model = build_model(compose_config(*entry["overrides"]))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(entry["params_m"], rel=0.02), (params, entry["source"])
