"""model.checkpoint with a transformers UPerNet-ConvNeXt file (openmmlab/upernet-convnext-*):
converted on load, it gives transformers' logits and auxiliary logits."""

from __future__ import annotations

import pytest
import torch
from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

from segexp.convert.hf_upernet import convert_hf_upernet, looks_like_hf_upernet
from segexp.errors import ConfigError
from segexp.models import build_model
from segexp.models.weights import convert
from tests.conftest import compose_config, randomise_batchnorm


def randomise_layernorms(model: torch.nn.Module, seed: int = 0) -> None:
    """Fresh LayerNorms are the identity affine (and ConvNeXt's layer scale is 1e-6, which would
    hide every block): randomise them so a swapped or missing one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or "hidden_states_norms" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2
                            + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("layer_scale_parameter"):
                param.copy_(torch.rand(param.shape, generator=generator) * 0.5 + 0.25)


def hf_reference(num_labels: int = 6) -> UperNetForSemanticSegmentation:
    torch.manual_seed(0)
    config = UperNetConfig(
        backbone_config=ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768],
                                       out_features=["stage1", "stage2", "stage3", "stage4"]),
        num_labels=num_labels, use_auxiliary_head=True)
    model = UperNetForSemanticSegmentation(config)
    randomise_batchnorm(model)
    randomise_layernorms(model)
    return model.eval()


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    reference = hf_reference()
    path = tmp_path_factory.mktemp("hf_upernet") / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    return reference, path


def test_hf_upernet_convnext_gives_the_same_logits(reference_file):
    reference, path = reference_file
    ours = build_model(compose_config("model=upernet", "backbone=convnext_tiny",
                                      f"model.checkpoint={path}")).eval()
    assert ours.align_corners is False and ours.decode_head.align_corners is False
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixel_values=images).logits
        # transformers' output does not carry the auxiliary logits: compute them as its forward does.
        features = reference.backbone(images).feature_maps
        expected_aux = torch.nn.functional.interpolate(
            reference.auxiliary_head(features), size=images.shape[-2:], mode="bilinear",
            align_corners=False)
        logits, aux = ours(images, return_aux=True)
    assert logits.shape == expected.shape == (1, 6, 64, 96)
    assert expected.abs().max() > 1e-2  # nothing collapsed to zero
    # Same operations in the same order: the difference is 0 on CPU. 1e-5 (tighter than needed)
    # still catches an out_norms eps of 1e-5 instead of transformers' 1e-6 (3e-5 here).
    assert (logits - expected).abs().max() <= 1e-5
    assert (aux - expected_aux).abs().max() <= 1e-5


def test_every_key_maps_and_detection_routes_it(reference_file):
    reference, _ = reference_file
    state = reference.state_dict()
    model_keys = set(build_model(compose_config("model=upernet", "backbone=convnext_tiny"))
                     .state_dict())
    assert looks_like_hf_upernet(state)
    converted, fmt = convert(state, model_keys)
    assert fmt == "hf_upernet"
    assert set(converted) == model_keys
    # A file saved without BatchNorm counters still converts to the full key set.
    trimmed = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert set(convert_hf_upernet(trimmed)) == model_keys


def test_unknown_keys_and_other_backbones_are_refused(reference_file):
    reference, _ = reference_file
    state = dict(reference.state_dict())
    state["decode_head.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match="decode_head.extra.weight"):
        convert_hf_upernet(state)
    swin_like = {k: v for k, v in reference.state_dict().items()
                 if not k.startswith("backbone.")}
    swin_like["backbone.embeddings.patch_embeddings.projection.weight"] = torch.zeros(1)
    assert looks_like_hf_upernet(swin_like)
    with pytest.raises(ConfigError, match="ConvNeXt backbone"):
        convert_hf_upernet(swin_like)
