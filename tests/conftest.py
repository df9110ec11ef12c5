"""Shared fixtures and helpers: config composition, tiny training runs, train.py and scripts/
as the tests run them, ports and environments for multi-process runs, and the location of the
shared real datasets. Test files import helpers from here (or from their folder's conftest.py),
never from another test file."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import segexp.config  # noqa: F401  (registers the resolvers conf/train.yaml uses: run names)
from segexp.weights_io import read_weights_file

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
ALL_MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))  # every model=<name>


def pytest_configure(config):
    """Under pytest-xdist (the README's ``-n auto``) the workers share the cores: each gets its
    share of torch threads, and the train.py processes it starts the same (``OMP_NUM_THREADS``),
    so that two workers never run four busy-waiting threads on two cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def load_script(name: str):
    """``scripts/<name>.py`` (``name`` may be ``bench/learning``) as a module, run in this process
    (its ``main(argv)`` is the command line); loaded from its file, as scripts are not a package."""
    module_name = "segexp_script_" + name.replace("/", "_")
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "scripts" / f"{name}.py")
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


# A tiny but real run: 32x32 synthetic images, a U-Net of 8-32 channels (unless a test picks
# another model), single-process loading, float32 on every machine (trainer.precision=auto would pick
# bf16 on CPUs that compute it natively).
TINY = ["trainer.batch_size=2", "trainer.val_batch_size=2", "trainer.num_workers=0", "trainer.precision=32",
        "trainer.progress_bar=false", "trainer.num_vis_images=2"]
TINY_SYNTHETIC = ["dataset.image_size=32", "dataset.train_length=16", "dataset.val_length=4"]
# The tiny model: a U-Net of 8-32 channels at strides 1-4, whose steps cost a seventh of an FCN
# on ResNet-18's on a CPU core (tests of the training loop run hundreds of them).
TINY_UNET = ["model=unet", "backbone=unet", "backbone.base_channels=8", "backbone.depth=3",
             "head.in_index=null", "head.decoder_channels=8"]


def tiny_config(*overrides: str):
    if not any(o.startswith("model=") for o in overrides):
        overrides = (*TINY_UNET, *overrides)
    if not any(o.startswith("dataset=") for o in overrides):
        overrides = (*TINY_SYNTHETIC, *overrides)
    return compose_config(*TINY, *overrides)


def train_py(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights of a run folder's checkpoints/last.pt."""
    return read_weights_file(run_dir / "checkpoints" / "last.pt")["model"]


def make_batch(n=2, c=4, h=5, w=6, seed=0, ignore_frac=0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded logits (n, c, h, w) and a target of class indices, about ``ignore_frac`` of it
    ignored (255)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * 2
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < ignore_frac] = 255
    return logits, target


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Fresh BN layers hold mean 0 / var 1, which would hide swapped statistics: randomise."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def free_port() -> int:
    """A local port nothing listens on (for a process group's rendezvous, or a refused connection)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_free_env() -> dict:
    """This environment without any launcher's variables (SLURM, submitit, torchrun), one thread
    per process and segexp importable: for train.py runs that start their own processes."""
    launcher_vars = ("SLURM_", "SUBMITIT_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


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


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Fresh norms are identity affines and deformable offsets start on a fixed grid: perturb
    every parameter and BatchNorm statistic so a swapped or missing tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.add_(0.05 * noise)
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=generator))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=generator))


def hf_mask2former(backbone: str, num_labels: int = 5):
    """A small random transformers Mask2Former (Swin or ResNet backbone), the reference of the
    Mask2Former and MaskFormer conversion tests."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if backbone == "swin":
        backbone_config = SwinConfig(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                                     window_size=2, drop_path_rate=0.0, out_features=stages)
    else:
        backbone_config = ResNetConfig(depths=[1, 1, 1, 1], out_features=stages)
    config = Mask2FormerConfig(
        backbone_config=backbone_config, feature_size=64, mask_feature_size=64, hidden_dim=64,
        encoder_feedforward_dim=96, dim_feedforward=80, encoder_layers=2, decoder_layers=5,
        num_attention_heads=4, num_queries=10, num_labels=num_labels)
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config)
    randomise(model)
    return model.eval()
