"""EoMT: logit parity with transformers' EomtForUniversalSegmentation (converted weights), the mask
annealing schedule, the training output, and the configs."""

from __future__ import annotations

import pytest
import torch
from transformers import EomtConfig, EomtForUniversalSegmentation

from segexp.convert.hf_eomt import convert_hf_eomt, looks_like_hf_eomt
from segexp.errors import ConfigError
from segexp.models import build_model
from segexp.models.eomt import EoMT, annealing_probability
from segexp.models.mask_classification import MaskPredictions
from segexp.models.weights import convert
from tests.conftest import compose_config

# A tiny EoMT: 4 blocks of width 64, the last 2 with 10 queries, 5 classes, 64x64 input (4x4 tokens).
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=64,
            patch_size=16, num_blocks=2, num_queries=10, num_labels=5)
# The same model in segexp: a DINOv2-with-registers timm ViT shrunk by timm keyword arguments.
TINY_OVERRIDES = ("model=eomt", "backbone=dinov2_reg_vits16", "+backbone.embed_dim=64",
                  "+backbone.depth=4", "+backbone.num_heads=4", "backbone.img_size=64",
                  "backbone.out_indices=[-1]", "head.num_blocks=2", "head.num_queries=10",
                  "dataset.num_classes=5")


def hf_reference() -> EomtForUniversalSegmentation:
    torch.manual_seed(0)
    model = EomtForUniversalSegmentation(EomtConfig(**TINY))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # Fresh LayerNorms are identities and layer scales 1: randomise them so that a swapped or
        # missing one shows; the register tokens start at 0.
        for name, param in model.named_parameters():
            if "norm" in name or "lambda1" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2
                            + (1.0 if name.endswith(("weight", "lambda1")) else 0.0))
            elif "register_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
        # A trained model: the masks are annealed away (transformers then evaluates unmasked).
        model.attn_mask_probs.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    reference = hf_reference()
    path = tmp_path_factory.mktemp("hf_eomt") / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    return reference, path


@pytest.fixture(scope="module")
def converted(reference_file):
    _, path = reference_file
    return build_model(compose_config(*TINY_OVERRIDES, f"model.checkpoint={path}"),
                       pretrained=False)


def test_eval_gives_transformers_logits(reference_file, converted):
    reference, _ = reference_file
    ours = converted.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(pixel_values=images)
        out = ours(images, return_aux=True)
        semantic = ours(images)
    assert out.class_logits.shape == expected.class_queries_logits.shape == (2, 10, 6)
    assert out.mask_logits.shape == expected.masks_queries_logits.shape == (2, 10, 16, 16)
    assert expected.masks_queries_logits.abs().max() > 1e-2  # nothing collapsed
    assert (out.class_logits - expected.class_queries_logits).abs().max() <= 1e-4
    assert (out.mask_logits - expected.masks_queries_logits).abs().max() <= 1e-4
    # transformers' semantic post-processing: masks to the image size, then softmax(classes)[:K]
    # x sigmoid(masks) summed over the queries.
    masks = torch.nn.functional.interpolate(expected.masks_queries_logits, size=(64, 64),
                                            mode="bilinear", align_corners=False)
    expected_semantic = torch.einsum("nqk,nqhw->nkhw",
                                     expected.class_queries_logits.softmax(-1)[..., :-1],
                                     masks.sigmoid())
    assert semantic.shape == (2, 5, 64, 64)
    assert (semantic - expected_semantic).abs().max() <= 1e-4


def test_masked_training_forward_gives_transformers_logits(reference_file, converted):
    """With every mask applied (probability 1: deterministic), the training forward pass runs
    masked attention exactly as transformers' does."""
    reference, _ = reference_file
    ours = converted.train()
    ours.mask_probs = [1.0, 1.0]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference.attn_mask_probs.fill_(1.0)
        reference.train()
        try:
            expected = reference(pixel_values=images)
        finally:
            reference.attn_mask_probs.zero_()
            reference.eval()
        out = ours(images, return_aux=True)
        ours.eval()
        unmasked = ours(images, return_aux=True)
    assert (out.class_logits - expected.class_queries_logits).abs().max() <= 1e-4
    assert (out.mask_logits - expected.masks_queries_logits).abs().max() <= 1e-4
    # The masks did change the result (the comparison above tests masking, not its absence).
    assert (unmasked.mask_logits - out.mask_logits).abs().max() > 1e-3


def test_training_output_has_one_aux_prediction_per_masked_block(converted):
    ours = converted.train()
    ours.set_progress(0, 100)
    images = torch.randn(2, 3, 64, 64)
    out = ours(images, return_aux=True)
    assert isinstance(out, MaskPredictions)
    assert len(out.aux) == 2  # head.num_blocks
    for class_logits, mask_logits in out.aux:
        assert class_logits.shape == (2, 10, 6) and mask_logits.shape == (2, 10, 16, 16)
    (out.mask_logits.sum() + sum(m.sum() for _, m in out.aux)).backward()
    assert ours.decode_head.query.weight.grad is not None
    ours.zero_grad()
    ours.eval()
    assert ours(images).shape == (2, 5, 64, 64)


def test_annealing_schedule():
    # EoMT's rule for 4 masked blocks over 6000 iterations: block i anneals from (i + 1) * 1000
    # to (i + 2) * 1000 with (1 - progress) ** 0.9.
    assert annealing_probability(999, 1000, 2000) == 1.0
    assert annealing_probability(1500, 1000, 2000) == pytest.approx(0.5 ** 0.9)
    assert annealing_probability(2000, 1000, 2000) == 0.0
    model = build_model(compose_config("model=eomt", "backbone=dinov2_reg_vits16",
                                       "+backbone.depth=6", "dataset.num_classes=3"),
                        pretrained=False)
    assert model.mask_probs == [1.0] * 4  # before any progress: every mask on
    model.set_progress(0, 6000)
    assert model.mask_probs == [1.0, 1.0, 1.0, 1.0]
    model.set_progress(1500, 6000)
    assert model.mask_probs == pytest.approx([0.5 ** 0.9, 1.0, 1.0, 1.0])
    model.set_progress(3250, 6000)
    assert model.mask_probs == pytest.approx([0.0, 0.0, 0.75 ** 0.9, 1.0])
    model.set_progress(4900, 6000)
    assert model.mask_probs == pytest.approx([0.0, 0.0, 0.0, 0.1 ** 0.9])
    model.set_progress(5999, 6000)
    assert model.mask_probs == [0.0] * 4


def test_every_key_maps_and_detection_routes_it(reference_file, converted):
    reference, _ = reference_file
    state = reference.state_dict()
    assert looks_like_hf_eomt(state)
    converted_state, fmt = convert(state, set(converted.state_dict()))
    assert fmt == "hf_eomt"
    assert set(converted_state) == set(converted.state_dict())
    state = dict(state)
    state["layers.0.mlp.weights_in.weight"] = torch.zeros(1)  # SwiGLU: not a timm ViT MLP
    with pytest.raises(ConfigError, match="weights_in"):
        convert_hf_eomt(state)


def test_configs_compose_with_the_mask_classification_loss():
    cfg = compose_config("model=eomt")
    assert cfg.model._target_ == "segexp.models.eomt.EoMT"
    assert cfg.backbone.name == "vit_small_patch14_reg4_dinov2" and cfg.backbone.patch_size == 16
    assert cfg.loss._target_.endswith("MaskClassificationLoss")
    assert compose_config("model=eomt", "loss=ce").loss._target_.endswith("CrossEntropyLoss")
    assert compose_config("model=upernet").loss._target_.endswith("CrossEntropyLoss")
    recipe = compose_config("experiment=eomt_dinov2_l_ade20k")
    assert recipe.backbone.name == "vit_large_patch14_reg4_dinov2"
    assert recipe.head.num_queries == 100 and recipe.optimizer.layer_decay == 0.8
    assert recipe.loss._target_.endswith("MaskClassificationLoss")
    small = compose_config("experiment=eomt_stanford_background")
    assert small.model._target_ == "segexp.models.eomt.EoMT"


def test_dinov3_backbone_runs_with_rotary_embeddings():
    model = build_model(compose_config("model=eomt", "backbone=dinov3_vits16",
                                       "+backbone.depth=3", "+backbone.embed_dim=48",
                                       "backbone.out_indices=[-1]",
                                       "+backbone.num_heads=3", "backbone.freeze=false",
                                       "head.num_blocks=2", "head.num_queries=7",
                                       "dataset.num_classes=3"), pretrained=False)
    assert isinstance(model, EoMT)
    images = torch.randn(1, 3, 48, 64)
    out = model.train()(images, return_aux=True)
    assert out.mask_logits.shape == (1, 7, 12, 16) and len(out.aux) == 2
    # Masked attention changes the queries' result, not the shapes.
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (1, 3, 48, 64)


def test_a_backbone_without_its_last_blocks_is_refused():
    with pytest.raises(ConfigError, match="out_indices"):
        build_model(compose_config("model=eomt", "backbone=dinov2_reg_vits16",
                                   "+backbone.depth=4", "backbone.out_indices=[1]",
                                   "dataset.num_classes=3"), pretrained=False)
