"""backbone.pretrained = auto | true | false: cached weights load offline, no weights means one
warning and training from scratch at once, and runs record what the backbone started from.

Nothing here touches the network: conftest's autouse fixture sets HF_HUB_OFFLINE and points the
weight caches at empty folders; the tests that exercise the hub check aim it at this machine."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from segexp.backbones import TimmBackbone, UNetEncoder
from segexp.backbones import pretrained as pretrained_module
from segexp.backbones.litehrnet import LiteHRNet
from segexp.backbones.mit import MixVisionTransformer
from segexp.backbones.mscan import MSCAN
from segexp.backbones.pretrained import PretrainedSource, no_pretrained_weights, pretrained_mode
from segexp.backbones.vit import ViTBackbone
from segexp.engine import experiment
from segexp.engine.experiment import run_training
from segexp.errors import ConfigError
from segexp.loggers import JsonlLogger
from segexp.models import build_model
from tests.conftest import CONF, compose_config, free_port, tiny_config

KEYS = ("conv1.weight", "layer2.0.bn1.running_mean", "layer4.1.conv2.weight")


def _hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache that huggingface_hub (already imported) and subprocesses use."""
    cache = tmp_path / "hf_hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_timm_weights(cache: Path, name: str) -> dict[str, torch.Tensor]:
    """Write a random timm model's weights where the hub client would have put timm's default
    pretrained file for ``name``: models--<org>--<repo>/snapshots/<rev>/model.safetensors."""
    repo_id = timm.models.get_pretrained_cfg(name).hf_hub_id  # e.g. timm/resnet18.a1_in1k
    assert repo_id, f"timm publishes no hub weights for {name}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    state = {k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}
    save_file(state, repo / "snapshots" / revision / "model.safetensors")
    return state


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def no_probe(monkeypatch):
    """Fail the test if anything asks the network."""
    def probe(url, timeout):
        raise AssertionError(f"network probe of {url} with HF_HUB_OFFLINE set")

    monkeypatch.setattr(pretrained_module, "_unreachable", probe)


def test_auto_loads_weights_from_the_hub_cache(tmp_path, monkeypatch, caplog, no_probe):
    reference = _cache_timm_weights(_hub_cache(tmp_path, monkeypatch), "resnet18")
    with caplog.at_level(logging.INFO):
        backbone = TimmBackbone("resnet18", pretrained="auto")
    loaded = backbone.body.state_dict()
    for key in KEYS:
        assert torch.equal(loaded[key], reference[key]), key
    assert backbone.pretrained_source == PretrainedSource(
        "imagenet", "timm: resnet18.a1_in1k, local cache")
    assert not _warnings(caplog)
    # pretrained=true takes the same cached file, still without the network.
    strict = TimmBackbone("resnet18", pretrained=True)
    assert torch.equal(strict.body.state_dict()[KEYS[0]], reference[KEYS[0]])


def test_auto_loads_weights_from_the_torch_hub_cache(tmp_path, monkeypatch, caplog, no_probe):
    """Weights timm fetches by URL land in torch.hub's checkpoints folder."""
    torch_home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    url = timm.models.get_pretrained_cfg("resnet18").url
    path = torch_home / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True)
    reference = timm.create_model("resnet18").state_dict()
    torch.save(reference, path)
    with caplog.at_level(logging.WARNING):
        backbone = TimmBackbone("resnet18", pretrained="auto")
    assert torch.equal(backbone.body.state_dict()[KEYS[2]], reference[KEYS[2]])
    assert backbone.pretrained_source.kind == "imagenet"
    assert not _warnings(caplog)


def test_auto_without_weights_offline_warns_once_and_trains_from_scratch(caplog, no_probe):
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        backbone = TimmBackbone("resnet18", pretrained="auto")
    assert time.perf_counter() - start < 5.0  # no network wait
    (message,) = _warnings(caplog)
    for part in ("'resnet18'", "resnet18.a1_in1k", "HF_HUB_OFFLINE", "training from scratch",
                 "backbone.checkpoint=", "backbone.pretrained=false"):
        assert part in message, part
    assert "\n" not in message
    assert backbone.pretrained_source == PretrainedSource("none", "auto: offline, no cached weights")


def test_pretrained_true_without_weights_stops_with_what_to_do(caplog, no_probe):
    with pytest.raises(ConfigError) as info:
        TimmBackbone("resnet18", pretrained=True)
    message = str(info.value)
    assert "not in the local cache" in message and "backbone.checkpoint=" in message
    assert "backbone.pretrained=false" in message
    with pytest.raises(ConfigError, match="has no pretrained weights"):
        UNetEncoder(pretrained=True)
    with pytest.raises(ConfigError, match="no Lite-HRNet weights"):
        LiteHRNet("s", pretrained=True)
    with pytest.raises(ConfigError, match=r"nvidia/mit-b0.*backbone\.checkpoint="):
        MixVisionTransformer("b0", pretrained=True)


def test_pretrained_false_is_silent(caplog, no_probe):
    with caplog.at_level(logging.WARNING):
        backbone = TimmBackbone("resnet18", pretrained=False)
        mit = MixVisionTransformer("b0", pretrained="false", depths=[1, 1, 1, 1])
    assert not _warnings(caplog)
    assert backbone.pretrained_source == mit.pretrained_source == PretrainedSource(
        "none", "pretrained=false")


def test_auto_warns_only_where_weights_are_published(caplog, no_probe):
    with caplog.at_level(logging.WARNING):
        unet, hrnet = UNetEncoder(pretrained="auto"), LiteHRNet("s", pretrained="auto")
        shallow = MixVisionTransformer("b0", pretrained="auto", depths=[1, 1, 1, 1])
    assert not _warnings(caplog)  # nothing published: from scratch is what anyone expects
    assert {unet.pretrained_source.kind, hrnet.pretrained_source.kind,
            shallow.pretrained_source.kind} == {"none"}
    for build, published in ((lambda: MixVisionTransformer("b0", pretrained="auto"), "nvidia/mit-b0"),
                             (lambda: MSCAN("t", pretrained="auto"), "mscan_t_20230227")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            backbone = build()
        (message,) = _warnings(caplog)
        assert published in message and "training from scratch" in message
        assert backbone.pretrained_source.kind == "none"


def test_frozen_vit_without_weights_gets_one_warning(caplog, no_probe):
    with caplog.at_level(logging.WARNING):
        ViTBackbone("vit_tiny_patch16_224", pretrained="auto", freeze=True, img_size=32, depth=2)
    (message,) = _warnings(caplog)
    assert "frozen backbone keeps random weights" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ViTBackbone("vit_tiny_patch16_224", pretrained=False, freeze=True, img_size=32, depth=2)
    (message,) = _warnings(caplog)
    assert "frozen" in message


def _online(monkeypatch, endpoint: str) -> None:
    """HF_HUB_OFFLINE unset, and the hub's weights URL on this machine."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(pretrained_module._TimmWeights, "download_url",
                        lambda self: f"{endpoint}/{self.full_name}/model.safetensors")


def test_auto_gives_up_at_once_when_the_hub_refuses(monkeypatch, caplog):
    _online(monkeypatch, f"http://127.0.0.1:{free_port()}")
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        backbone = TimmBackbone("resnet18", pretrained="auto")
    assert time.perf_counter() - start < 5.0
    (message,) = _warnings(caplog)
    assert "127.0.0.1" in message and "cannot be reached" in message
    assert "training from scratch" in message
    assert backbone.pretrained_source.detail == "auto: hub unreachable, no cached weights"
    with pytest.raises(ConfigError, match="cannot be reached"):
        TimmBackbone("resnet18", pretrained=True)


def test_auto_waits_no_longer_than_the_probe_timeout(monkeypatch, caplog):
    """A hub that accepts the connection and never answers."""
    monkeypatch.setattr(pretrained_module, "PROBE_TIMEOUT_S", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        _online(monkeypatch, f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.perf_counter()
        with caplog.at_level(logging.WARNING):
            TimmBackbone("resnet18", pretrained="auto")
        elapsed = time.perf_counter() - start
    assert elapsed < 4.0
    (message,) = _warnings(caplog)
    assert "127.0.0.1" in message and "did not answer within 0.5 s" in message


def test_pretrained_values():
    assert [pretrained_mode(v) for v in ("auto", "AUTO", True, False, "true", "false")] == [
        "auto", "auto", "true", "false", "true", "false"]
    with pytest.raises(ConfigError, match="backbone.pretrained='maybe'.*auto"):
        pretrained_mode("maybe")
    with pytest.raises(ConfigError, match="backbone.pretrained="):
        TimmBackbone("resnet18", pretrained="yes please")


def test_models_for_trained_weights_fetch_nothing_and_say_nothing(caplog, no_probe):
    """Evaluation, export and inference load a run's checkpoint over the model they build."""
    with caplog.at_level(logging.WARNING):
        model = build_model(compose_config("model=fcn", "backbone.pretrained=true"), pretrained=False)
        with no_pretrained_weights():
            vit = ViTBackbone("vit_tiny_patch16_224", pretrained=True, freeze=True, img_size=32,
                              depth=2)
    assert not _warnings(caplog)
    assert model.backbone.pretrained_source == vit.pretrained_source == PretrainedSource(
        "none", "pretrained=false")
    with pytest.raises(ConfigError):  # outside, pretrained=true insists again
        build_model(compose_config("model=fcn", "backbone.pretrained=true"))


def test_every_backbone_config_defaults_to_auto():
    paths = sorted((CONF / "backbone").glob("*.yaml"))
    assert len(paths) > 30
    for path in paths:
        config = OmegaConf.load(path)
        if "pretrained" not in config:  # a family name (backbone=convnext): its sized file's value
            config = compose_config(f"backbone={path.stem}").backbone
        assert config.pretrained == "auto", path.name
    assert compose_config().backbone.pretrained == "auto"  # `python train.py`'s ResNet-18


class RecordingLogger(JsonlLogger):
    seen: dict = {}

    def start(self, run) -> None:
        super().start(run)
        RecordingLogger.seen.update(tags=list(run.tags), config=run.config)

    def log_summary(self, summary) -> None:
        RecordingLogger.seen["summary"] = summary


def test_a_run_records_the_weights_it_started_from(tmp_path, monkeypatch, no_probe):
    _cache_timm_weights(_hub_cache(tmp_path, monkeypatch), "resnet18")
    monkeypatch.setattr(experiment, "JsonlLogger", RecordingLogger)
    RecordingLogger.seen.clear()
    run_training(tiny_config("model=fcn", "head.channels=16", "trainer=debug", "trainer.measure_speed=false"),
                 tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    source = "imagenet (timm: resnet18.a1_in1k, local cache)"
    assert (summary["pretrained"], summary["pretrained_source"]) == ("imagenet", source)
    seen = RecordingLogger.seen
    assert "pretrained:imagenet" in seen["tags"]
    assert seen["config"]["pretrained_source"] == seen["summary"]["pretrained_source"] == source
    assert seen["config"]["backbone"]["pretrained"] == "auto"  # what was asked, beside what was had
