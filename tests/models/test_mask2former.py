"""Mask2Former / MaskFormer heads: logit parity with transformers (random small models converted
on load), the deformable attention against a naive reference, shapes on several backbones, the
Segmentor's train / eval outputs, and clear errors for backbones that cannot feed them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segexp.backbones import TimmBackbone
from segexp.config import instantiate
from segexp.convert.hf_mask2former import convert_hf_mask2former, looks_like_hf_mask2former
from segexp.errors import ConfigError
from segexp.heads.mask2former import Mask2FormerHead, multi_scale_deformable_attention
from segexp.models import Segmentor, build_model
from segexp.models.mask_classification import MaskPredictions
from segexp.models.weights import convert
from tests.conftest import compose_config, hf_mask2former

NUM_LABELS = 5
# A small Mask2Former: width 64 (GroupNorm(32) needs a multiple of 32), 2 deformable layers,
# 4 masked-attention layers (transformers counts 5: the initial prediction is one), 10 queries.
HEAD_KW = dict(feature_dim=64, mask_dim=64, hidden_dim=64, encoder_layers=2, encoder_heads=4,
               encoder_ffn_dim=96, num_queries=10, num_heads=4, decoder_layers=4,
               decoder_ffn_dim=80)


def segexp_mask2former(backbone: str) -> Segmentor:
    if backbone == "swin":
        body = TimmBackbone("swin_tiny_patch4_window7_224", depths=(1, 1, 2, 1), embed_dim=32,
                            num_heads=(1, 2, 4, 8), window_size=2, strict_img_size=False,
                            always_partition=True, out_norms=True, out_norm_eps=1e-5)
    else:
        body = TimmBackbone("resnet50", layers=(1, 1, 1, 1))

    def head(**kw):
        return Mask2FormerHead(**kw, **HEAD_KW)

    return Segmentor(body, head, num_classes=NUM_LABELS)


@pytest.mark.parametrize("backbone", ["swin", "resnet"])
def test_same_logits_as_transformers(backbone):
    reference = hf_mask2former(backbone)
    state = reference.state_dict()
    assert looks_like_hf_mask2former(state)
    ours = segexp_mask2former(backbone)
    converted, fmt = convert(state, set(ours.state_dict()))
    assert fmt == "hf_mask2former"
    assert set(converted) == set(ours.state_dict())
    ours.load_state_dict(converted)
    ours.eval()
    images = torch.randn(2, 3, 128, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixel_values=images, output_auxiliary_logits=True)
        predictions = ours(images, return_aux=True)
        semantic = ours(images)
    assert isinstance(predictions, MaskPredictions)
    assert predictions.class_logits.shape == (2, 10, NUM_LABELS + 1)
    assert predictions.mask_logits.shape == (2, 10, 32, 24)
    assert expected.masks_queries_logits.abs().max() > 1e-2  # nothing collapsed
    assert (predictions.class_logits - expected.class_queries_logits).abs().max() <= 1e-4
    assert (predictions.mask_logits - expected.masks_queries_logits).abs().max() <= 1e-4
    # Deep supervision: the 4 earlier predictions, as transformers' auxiliary logits.
    assert len(predictions.aux) == len(expected.auxiliary_logits) == 4
    for (cls, mask), aux in zip(predictions.aux, expected.auxiliary_logits):
        assert (cls - aux["class_queries_logits"]).abs().max() <= 1e-4
        assert (mask - aux["masks_queries_logits"]).abs().max() <= 1e-4
    # Semantic scores as transformers' post-processing computes them (before its argmax).
    masks = F.interpolate(expected.masks_queries_logits, size=images.shape[-2:], mode="bilinear",
                          align_corners=False)
    scores = torch.einsum("nqk,nqhw->nkhw", expected.class_queries_logits.softmax(-1)[..., :-1],
                          masks.sigmoid())
    assert semantic.shape == (2, NUM_LABELS, 128, 96)
    assert (semantic - scores).abs().max() <= 1e-4
    processed = torch.stack(_hf_semantic_maps(expected, images.shape[-2:]))
    # Same class map, up to near-ties that rounding may flip.
    assert (semantic.argmax(1) != processed).float().mean() < 1e-3


def _hf_semantic_maps(outputs, size):
    from transformers import Mask2FormerImageProcessor

    processor = Mask2FormerImageProcessor()
    return processor.post_process_semantic_segmentation(outputs, target_sizes=[tuple(size)] * 2)


def test_converter_refuses_unknown_keys_and_other_backbones():
    reference = hf_mask2former("swin")
    state = dict(reference.state_dict())
    state["model.transformer_module.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match="extra.weight"):
        convert_hf_mask2former(state)
    no_backbone = {k: v for k, v in reference.state_dict().items()
                   if not k.startswith("model.pixel_level_module.encoder.")}
    with pytest.raises(ConfigError, match="neither a Swin backbone"):
        convert_hf_mask2former(no_backbone)


def test_deformable_attention_matches_a_naive_reference():
    """Bilinear sampling at each point written out by hand (zero outside the map, pixel centres
    at (i + 0.5) / size), weighted and summed per head."""
    generator = torch.Generator().manual_seed(0)
    n, heads, dim, points = 2, 3, 4, 2
    shapes = [(5, 7), (3, 4), (2, 2)]
    value = torch.randn(n, sum(h * w for h, w in shapes), heads, dim, generator=generator)
    lq = 6
    # Locations partly outside [0, 1] to exercise the zero padding.
    locations = torch.rand(n, lq, heads, len(shapes), points, 2, generator=generator) * 1.4 - 0.2
    weights = torch.rand(n, lq, heads, len(shapes), points, generator=generator)
    out = multi_scale_deformable_attention(value, shapes, locations, weights)

    expected = torch.zeros(n, lq, heads, dim)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for b in range(n):
        for q in range(lq):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    grid = value[b, starts[lvl]:starts[lvl + 1], m].view(h, w, dim)
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0] * w - 0.5
                        y = locations[b, q, m, lvl, p, 1] * h - 0.5
                        x0, y0 = int(torch.floor(x)), int(torch.floor(y))
                        sample = torch.zeros(dim)
                        for yy, xx in [(y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)]:
                            if 0 <= yy < h and 0 <= xx < w:
                                sample += (1 - abs(x - xx)) * (1 - abs(y - yy)) * grid[yy, xx]
                        expected[b, q, m] += weights[b, q, m, lvl, p] * sample
    assert out.shape == (n, lq, heads * dim)
    assert torch.allclose(out, expected.reshape(n, lq, heads * dim), atol=1e-5)


@pytest.mark.parametrize("backbone", ["resnet18", "convnext_tiny", "mit_b0"])
def test_shapes_on_hierarchical_backbones(backbone):
    """The head takes any backbone with maps at strides 4..32 (5 maps for ResNet, 4 for ConvNeXt
    and MiT): read from the backbone's feature_info (built on the meta device: no weights), fed
    random maps of those shapes."""
    cfg = compose_config("model=mask2former", f"backbone={backbone}", "dataset.num_classes=3",
                         *[f"head.{k}={v}" for k, v in HEAD_KW.items()])
    with torch.device("meta"):
        model = build_model(cfg, pretrained=False)
    channels, reductions = model.backbone.channels, model.backbone.reductions
    head = instantiate(cfg.head)(in_channels=channels, in_reductions=reductions,
                                 num_classes=3).eval()
    features = [torch.randn(1, c, 64 // r, 64 // r) for c, r in zip(channels, reductions)]
    with torch.no_grad():
        out = head(features)
    assert out.class_logits.shape == (1, 10, 4)
    assert out.mask_logits.shape == (1, 10, 16, 16)  # stride 4
    assert len(out.aux) == 4


def test_segmentor_train_and_eval_outputs():
    cfg = compose_config("model=mask2former", "backbone=resnet18", "dataset.num_classes=4",
                         *[f"head.{k}={v}" for k, v in HEAD_KW.items()])
    assert cfg.loss._target_.endswith("MaskClassificationLoss")  # the model picks its criterion
    model = build_model(cfg, pretrained=False)
    images = torch.randn(2, 3, 64, 64)
    model.train()
    out = model(images, return_aux=True)
    assert isinstance(out, MaskPredictions)
    assert out.class_logits.shape == (2, 10, 5) and out.mask_logits.shape == (2, 10, 16, 16)
    assert len(out.aux) == 4
    assert all(c.shape == out.class_logits.shape and m.shape == out.mask_logits.shape
               for c, m in out.aux)
    # Gradients reach the queries through every prediction (deep supervision).
    sum(c.sum() + m.sum() for c, m in [*out.aux, (out.class_logits, out.mask_logits)]).backward()
    assert model.decode_head.transformer.queries_features.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        scores = model(images)
    assert scores.shape == (2, 4, 64, 64)
    assert (scores >= 0).all() and (scores.sum(1) <= 10 + 1e-4).all()


def test_default_mask2former_is_the_paper_layout():
    cfg = compose_config("model=mask2former", "dataset.num_classes=150")
    assert cfg.backbone.name == "resnet50"
    with torch.device("meta"):
        model = build_model(cfg, pretrained=False)
    head = model.decode_head
    assert len(head.pixel_decoder.encoder.layers) == 6
    assert len(head.transformer.layers) == 9
    assert head.transformer.queries_features.weight.shape == (100, 256)
    assert head.transformer.class_predictor.out_features == 151
    assert [model.backbone.reductions[i] for i in head.in_index] == [4, 8, 16, 32]


def test_single_scale_backbone_is_refused_clearly():
    with pytest.raises(ConfigError, match="multi-scale backbone"):
        build_model(compose_config("model=mask2former", "backbone=vit_tiny"), pretrained=False)
    with pytest.raises(ConfigError, match="growing strides"):
        Mask2FormerHead([64, 128, 256, 512], [4, 8, 16, 32], num_classes=3, in_index=[-1, -2, -3])


def test_maskformer_outputs_and_deep_supervision():
    cfg = compose_config("model=maskformer", "backbone=resnet18", "dataset.num_classes=4",
                         "head.feature_dim=64", "head.mask_dim=64", "head.hidden_dim=64",
                         "head.num_queries=10", "head.num_heads=4", "head.decoder_layers=3",
                         "head.decoder_ffn_dim=80")
    assert cfg.loss._target_.endswith("MaskClassificationLoss")
    model = build_model(cfg, pretrained=False)
    images = torch.randn(2, 3, 64, 64)
    out = model.train()(images, return_aux=True)
    assert out.class_logits.shape == (2, 10, 5) and out.mask_logits.shape == (2, 10, 16, 16)
    assert len(out.aux) == 2  # one per earlier decoder layer
    with torch.no_grad():
        scores = model.eval()(images)
    assert scores.shape == (2, 4, 64, 64)
