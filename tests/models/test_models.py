"""Every architecture builds from its config, runs forward/backward and returns full-size logits."""

from __future__ import annotations

import pytest
import torch

from segexp.config import instantiate
from segexp.engine.trainer import model_loss
from segexp.errors import ConfigError, IncompatibleBackboneError
from segexp.models import build_model
from segexp.models.mask_classification import MaskPredictions
from tests.conftest import ALL_MODELS, compose_config


def _small(model: str, backbone: str, *extra: str):
    overrides = [f"model={model}", f"backbone={backbone}", *extra]
    if model != "unet":  # the U-Net decoder mirrors the skip channels
        overrides.append("head.channels=32")
    if model in ("pspnet", "deeplabv3", "deeplabv3plus", "upernet"):
        overrides.append("model.aux_head.channels=16")
    return build_model(compose_config(*overrides))


@pytest.mark.parametrize("model", ["fcn", "pspnet", "deeplabv3", "deeplabv3plus", "upernet", "unet"])
@pytest.mark.parametrize("backbone", ["resnet18", "resnet18_d8", "convnext_tiny"])
def test_forward_backward_and_output_size(model, backbone):
    net = _small(model, backbone)
    images = torch.randn(2, 3, 64, 96)
    logits, aux = net(images, return_aux=True)
    assert logits.shape == (2, 6, 64, 96)
    assert (aux is not None) == (model != "fcn" and model != "unet")
    if aux is not None:
        assert aux.shape == logits.shape
    loss = logits.mean() + (aux.mean() if aux is not None else 0)
    loss.backward()
    assert net.backbone.body.conv1.weight.grad is not None if "resnet" in backbone else True
    assert all(p.grad is not None for p in net.decode_head.parameters() if p.requires_grad)


def test_paper_unet_runs_on_its_own_encoder():
    net = build_model(compose_config("model=unet", "backbone=unet", "backbone.base_channels=8"))
    assert net(torch.randn(1, 3, 32, 48)).shape == (1, 6, 32, 48)


def test_input_size_the_backbone_cannot_take_names_the_multiple():
    net = _small("fcn", "resnet18")
    with pytest.raises(ConfigError, match="not a multiple of 32"):
        net(torch.randn(1, 3, 64, 70))


def test_head_that_cannot_take_the_backbone_is_explained():
    with pytest.raises(IncompatibleBackboneError) as info:
        _small("upernet", "resnet18", "backbone.out_indices=[3,4]")
    message = str(info.value)
    assert "resnet18" in message and "backbone=" in message


def test_channels_flow_from_the_backbone():
    for backbone, deepest in (("resnet18", 512), ("convnext_tiny", 768)):
        net = _small("fcn", backbone)
        first_conv = next(m for m in net.decode_head.modules() if isinstance(m, torch.nn.Conv2d))
        assert first_conv.in_channels == deepest


@pytest.mark.parametrize("model", ALL_MODELS)
def test_every_model_on_its_default_backbone(model):
    """model=X alone composes with X's default backbone, gives full-size logits, and trains: its
    own criterion (the loop's model_loss) reaches every trainable parameter, which is also what
    DistributedDataParallel needs (a parameter without a gradient fails its second step)."""
    cfg = compose_config(f"model={model}")
    assert cfg.default_backbone  # conf/backbone/model_default/<model>.yaml exists
    net = build_model(cfg)
    size = max(64, net.size_divisor)
    images = torch.randn(2, 3, size, size)
    masks = torch.randint(0, cfg.dataset.num_classes, (2, size, size))
    out = net(images, return_aux=True)
    assert net(images).shape == (2, cfg.dataset.num_classes, size, size)
    if isinstance(out, MaskPredictions):  # mask classification: queries' classes and masks
        assert out.class_logits.shape[-1] == cfg.dataset.num_classes + 1
    else:
        assert out[0].shape == (2, cfg.dataset.num_classes, size, size)
    model_loss(instantiate(cfg.loss), net, out, masks).backward()
    trainable = {name: p for name, p in net.named_parameters() if p.requires_grad}
    assert trainable and [name for name, p in trainable.items() if p.grad is None] == []


@pytest.mark.parametrize("model", ALL_MODELS)
def test_every_model_runs_in_channels_last(model):
    """trainer.channels_last (on by default on CPUs and with mixed precision on GPUs) puts
    weights and images in NHWC: every model must give the NCHW logits (no ``.view`` of a
    permuted tensor, no layout-dependent op) and train."""
    torch.manual_seed(0)
    cfg = compose_config(f"model={model}")
    net = build_model(cfg).eval()
    size = max(64, net.size_divisor)
    images = torch.randn(2, 3, size, size)
    masks = torch.randint(0, cfg.dataset.num_classes, (2, size, size))
    with torch.no_grad():
        torch.manual_seed(1)  # (SegNeXt's Hamburger draws its bases at every forward)
        expected = net(images)
    net.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.manual_seed(1)
        got = net(images)
    scale = expected.abs().max().item()
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * max(scale, 1.0)), \
        (got - expected).abs().max().item()
    net.train()
    model_loss(instantiate(cfg.loss), net, net(images, return_aux=True), masks).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
