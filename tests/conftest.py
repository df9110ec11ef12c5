"""Shared fixtures: config composition and the location of the shared real datasets."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import segexp.config  # noqa: F401  (registers the resolvers conf/train.yaml uses: run names)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


def load_script(name: str):
    """``scripts/<name>.py`` as a module, run in this process (its ``main(argv)`` is the command
    line); loaded from its file, as scripts are not a package."""
    spec = importlib.util.spec_from_file_location(f"segexp_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def segexp_importable_in_subprocesses(monkeypatch):
    """The scripts and train.py that tests start import segexp from this checkout, also where it
    is not installed (pytest's ``pythonpath`` setting covers this process only); with the
    README's editable install this is the same folder."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def compose_config(*overrides: str):
    """The config `python train.py <overrides>` would run with (Hydra's compose API)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    # Let ${hydra:...} interpolations (the run name) resolve as they do under train.py.
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATASETS} (a fresh clone has no ../shared)")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def empty_weight_caches(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weight_caches")
    return {"hub": root / "hf_hub", "torch": root / "torch"}


@pytest.fixture(autouse=True)
def no_network_weights(monkeypatch, empty_weight_caches):
    """No test waits on a model hub or reads this machine's weight caches: backbones default to
    backbone.pretrained=auto, which then finds nothing, warns and trains from scratch at once.
    Set in the environment too, so train.py subprocesses inherit it."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(empty_weight_caches["hub"]))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(empty_weight_caches["hub"]))
    monkeypatch.setenv("TORCH_HOME", str(empty_weight_caches["torch"]))


@pytest.fixture
def offline_hub(monkeypatch):
    """Make every model-hub download fail the way it does on a machine without network."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def unreachable(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", unreachable)
