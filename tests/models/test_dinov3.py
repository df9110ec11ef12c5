"""DINOv3 backbones (timm's Eva with rotary embeddings and registers) behind ViTBackbone: feature
shapes, parameter counts against the published ones, and the models that read them (the DINOv2
linear head, UPerNet through the MultiLevelNeck)."""

from __future__ import annotations

import pytest
import timm
import torch
from hydra.utils import instantiate

from segexp.backbones.vit import ViTBackbone
from segexp.errors import IncompatibleBackboneError
from segexp.heads.multilevel import MultiLevelNeck
from segexp.models import build_model
from tests.conftest import compose_config

# DINOv3 README (facebookresearch/dinov3), parameters of the LVD-1689M ViTs, in millions.
PUBLISHED_M = {"dinov3_vits16": 21, "dinov3_vitb16": 86, "dinov3_vitl16": 300}


@pytest.mark.parametrize("option", sorted(PUBLISHED_M))
def test_parameter_count_matches_the_published_one(option):
    cfg = compose_config(f"backbone={option}").backbone
    assert timm.is_model(cfg.name)
    with torch.device("meta"):  # ViT-L in a second: no memory, no initialisation
        body = timm.create_model(cfg.name, pretrained=False, num_classes=0)
    count = sum(p.numel() for p in body.parameters()) / 1e6
    # The README rounds down to whole millions (ViT-S/16 has 21.59 M): 3 % for S, 2 % otherwise.
    tolerance = 0.03 if option == "dinov3_vits16" else 0.02
    assert abs(count - PUBLISHED_M[option]) <= tolerance * PUBLISHED_M[option], count


def tiny_dinov3(**kwargs) -> ViTBackbone:
    return ViTBackbone("vit_small_patch16_dinov3", pretrained=False, depth=4, embed_dim=48,
                       num_heads=3, out_indices=[-4, -3, -2, -1], final_norm="all",
                       size_divisor=16, **kwargs)


def test_backbone_returns_the_last_blocks_at_stride_16():
    backbone = tiny_dinov3()
    assert type(backbone.body).__name__ == "Eva" and backbone.body.num_prefix_tokens == 5
    assert backbone.channels == [48] * 4 and backbone.reductions == [16] * 4
    features = backbone(torch.randn(2, 3, 48, 80))
    assert [tuple(f.shape) for f in features] == [(2, 48, 3, 5)] * 4
    # Rotary embeddings: no position table, so another grid needs nothing resampled.
    assert getattr(backbone.body, "pos_embed", None) is None
    assert tuple(backbone(torch.randn(1, 3, 64, 32))[-1].shape) == (1, 48, 4, 2)


def test_layer_ids_cover_embeddings_blocks_and_norm():
    backbone = tiny_dinov3()
    ids = {name: backbone.layer_id(name) for name, _ in backbone.named_parameters()}
    assert ids["body.cls_token"] == ids["body.reg_token"] == ids["body.patch_embed.proj.weight"] == 0
    assert ids["body.blocks.0.attn.qkv.weight"] == 1 and ids["body.blocks.3.gamma_1"] == 4
    assert ids["body.norm.weight"] == backbone.num_layers - 1 == 5


def test_dinov2_linear_head_on_dinov3():
    model = build_model(compose_config("model=dinov2", "backbone=dinov3_vits16",
                                       "+backbone.depth=4", "dataset.num_classes=3"),
                        pretrained=False).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 50, 70)).shape == (2, 3, 50, 70)  # resized to 48x64 inside


def test_upernet_on_dinov3_through_the_multilevel_neck():
    model = build_model(compose_config("model=upernet", "backbone=dinov3_vits16",
                                       "+neck@model.neck=multilevel", "+backbone.depth=4",
                                       "dataset.num_classes=3"), pretrained=False).eval()
    assert isinstance(model.neck, MultiLevelNeck)
    assert model.neck.reductions == [4, 8, 16, 32] and model.neck.channels == [384] * 4
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.neck(model.backbone(images))
        assert [tuple(f.shape[-2:]) for f in features] == [(16, 24), (8, 12), (4, 6), (2, 3)]
        logits, aux = model(images, return_aux=True)
    assert logits.shape == aux.shape == (2, 3, 64, 96)


def test_multilevel_neck_refuses_a_pyramid_backbone():
    neck = instantiate(compose_config("+neck@model.neck=multilevel").model.neck)
    with pytest.raises(IncompatibleBackboneError, match="one width and one stride"):
        neck(in_channels=[64, 128, 256, 512], in_reductions=[4, 8, 16, 32])
