"""timm backbones: feature_info flows through, dilated variants, local weights, offline errors."""

from __future__ import annotations

import pytest
import timm
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from segexp.backbones import TimmBackbone
from segexp.errors import ConfigError
from tests.conftest import compose_config


def test_channels_and_reductions_come_from_timm():
    backbone = TimmBackbone("resnet18")
    assert backbone.channels == [64, 64, 128, 256, 512]
    assert backbone.reductions == [2, 4, 8, 16, 32]
    features = backbone(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == backbone.channels
    assert [64 // f.shape[-1] for f in features] == backbone.reductions


def test_output_stride_8_dilates_last_stages():
    backbone = TimmBackbone("resnet18", output_stride=8)
    assert backbone.reductions == [2, 4, 8, 8, 8]
    assert backbone(torch.rand(1, 3, 64, 64))[-1].shape[-1] == 8


def test_convnext_gives_four_stages():
    backbone = TimmBackbone("convnext_tiny")
    assert backbone.channels == [96, 192, 384, 768]
    assert backbone.reductions == [4, 8, 16, 32]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_checkpoint_loads(tmp_path, suffix):
    reference = timm.create_model("resnet18")  # random weights, as a downloaded file would hold
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        save_file(reference.state_dict(), path)
    backbone = TimmBackbone("resnet18", checkpoint=str(path))
    loaded = backbone.body.state_dict()
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer2.0.bn1.running_mean"):
        assert torch.equal(loaded[key], reference.state_dict()[key]), key


def test_missing_checkpoint_file_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="backbone.checkpoint=.*no such file"):
        TimmBackbone("resnet18", checkpoint=str(tmp_path / "nope.pth"))


def test_checkpoint_of_another_model_is_explained(tmp_path):
    path = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_tiny").state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit timm model 'resnet18'"):
        TimmBackbone("resnet18", checkpoint=str(path))


def test_pretrained_without_network_says_how_to_use_a_local_file(offline_hub):
    with pytest.raises(ConfigError) as info:
        TimmBackbone("resnet18", pretrained=True, cache_dir=None)
    message = str(info.value)
    assert "backbone.checkpoint=" in message and "resnet18" in message


RESNET_CONFIGS = ["resnet18", "resnet18_d8", "resnet50", "resnet50_d8", "resnet50_d16", "resnet101",
                  "resnet101_d8", "resnet101_d16"]


@pytest.mark.parametrize("name", RESNET_CONFIGS)
def test_resnets_from_scratch_start_with_live_residual_branches(name):
    """timm zero-initialises each residual block's last BatchNorm; the ResNet configs turn that
    off (torchvision's init: from scratch, 20-minute runs learnt more without it,
    docs/performance.md), so no block starts as an identity."""
    cfg = compose_config(f"backbone={name}", "backbone.pretrained=false")
    assert cfg.backbone.zero_init_last is False
    if name not in ("resnet18", "resnet50_d8"):  # one BasicBlock and one Bottleneck network
        return
    def last_norm(block):  # Bottleneck's bn3, BasicBlock's bn2
        return getattr(block, "bn3", None) or block.bn2

    backbone = instantiate(cfg.backbone)
    last_norms = [last_norm(block) for layer in ("layer1", "layer2", "layer3", "layer4")
                  for block in getattr(backbone.body, layer)]
    assert last_norms and all(torch.all(norm.weight == 1) for norm in last_norms)
    # timm's own default, kept on request: backbone.zero_init_last=true
    zeroed = instantiate(compose_config(f"backbone={name}", "backbone.pretrained=false",
                                        "backbone.zero_init_last=true").backbone)
    assert torch.all(last_norm(zeroed.body.layer1[0]).weight == 0)
