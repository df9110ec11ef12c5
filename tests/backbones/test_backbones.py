"""timm backbones: feature_info flows through, dilated variants, local weights, offline errors."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from segexp.backbones import TimmBackbone
from segexp.errors import ConfigError


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
