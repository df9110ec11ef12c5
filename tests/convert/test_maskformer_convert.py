"""MaskFormer weights from transformers: a random small ``MaskFormerForInstanceSegmentation`` (Swin
and ResNet backbones), saved and loaded into ``model=maskformer`` through ``model.checkpoint``,
gives the same class logits, mask logits and semantic scores; deep supervision matches the
reference implementation's; files that do not fit are refused with the option and the remedy; and
the layout is told apart from Mask2Former's."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from segexp.convert.hf_maskformer import convert_hf_maskformer, looks_like_hf_maskformer
from segexp.errors import ConfigError
from segexp.models import Segmentor, build_model
from segexp.models.mask_classification import MaskPredictions
from segexp.models.weights import _converters, convert
from tests.conftest import compose_config, hf_mask2former, randomise

NUM_LABELS = 5
# A small MaskFormer: width 64 (GroupNorm(32) needs a multiple of 32), 3 decoder layers, 10
# queries. The Swin has window 3, so on a 128x96 input every stage's height (32, 16, 8, 4) is
# padded to whole windows and every second block shifts: the padding order matters.
HEAD = ["head.feature_dim=64", "head.mask_dim=64", "head.hidden_dim=64", "head.num_queries=10",
        "head.num_heads=4", "head.decoder_layers=3", "head.decoder_ffn_dim=80"]
# The same small backbones from segexp's configs (timm takes the lists as plain lists: _convert_).
BACKBONE = {
    "swin": ["backbone=swin_tiny", "+backbone.embed_dim=32", "+backbone.depths=[2,2,2,2]",
             "+backbone.num_heads=[1,2,4,8]", "+backbone.window_size=3", "backbone.drop_path_rate=0.0",
             "+backbone._convert_=all"],
    "resnet": ["backbone=resnet50", "+backbone.layers=[1,1,1,1]", "+backbone._convert_=all"],
}


def hf_maskformer(backbone: str, num_labels: int = NUM_LABELS):
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig, SwinConfig
    from transformers.models.maskformer.configuration_maskformer import MaskFormerDetrConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if backbone == "swin":
        backbone_config = SwinConfig(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                                     window_size=3, drop_path_rate=0.0, out_features=stages)
    else:
        backbone_config = ResNetConfig(depths=[1, 1, 1, 1], out_features=stages)
    decoder_config = MaskFormerDetrConfig(d_model=64, decoder_layers=3, decoder_ffn_dim=80,
                                          decoder_attention_heads=4, encoder_attention_heads=4,
                                          num_queries=10)
    config = MaskFormerConfig(backbone_config=backbone_config, decoder_config=decoder_config,
                              fpn_feature_size=64, mask_feature_size=64, num_labels=num_labels)
    torch.manual_seed(0)
    model = MaskFormerForInstanceSegmentation(config)
    randomise(model)
    return model.eval()


def save(model: torch.nn.Module, path) -> str:
    """The state dict as a hub file holds it (safetensors)."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def segexp_maskformer(backbone: str, *overrides: str, num_classes: int = NUM_LABELS) -> Segmentor:
    cfg = compose_config("model=maskformer", *BACKBONE[backbone], f"dataset.num_classes={num_classes}",
                         *HEAD, *overrides)
    return build_model(cfg, pretrained=False)


@pytest.mark.parametrize("backbone", ["swin", "resnet"])
def test_same_logits_as_transformers(tmp_path, backbone):
    reference = hf_maskformer(backbone)
    state = reference.state_dict()
    assert looks_like_hf_maskformer(state)
    plain = segexp_maskformer(backbone)
    converted, fmt = convert(state, set(plain.state_dict()))
    assert fmt == "hf_maskformer"
    assert set(converted) == set(plain.state_dict())  # every tensor mapped, none left over
    ours = segexp_maskformer(backbone, f"model.checkpoint={save(reference, tmp_path / 'model.safetensors')}")
    ours.eval()
    images = torch.randn(2, 3, 128, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixel_values=images, output_hidden_states=True)
        predictions = ours(images, return_aux=True)
        semantic = ours(images)
    assert isinstance(predictions, MaskPredictions)
    assert predictions.class_logits.shape == (2, 10, NUM_LABELS + 1)
    assert predictions.mask_logits.shape == (2, 10, 32, 24)
    assert expected.masks_queries_logits.abs().max() > 1e-2  # nothing collapsed
    assert expected.class_queries_logits.std() > 1e-2
    assert (predictions.class_logits - expected.class_queries_logits).abs().max() <= 1e-4
    assert (predictions.mask_logits - expected.masks_queries_logits).abs().max() <= 1e-4
    # Deep supervision: the 2 earlier layers, as the reference implementation predicts them (each
    # layer's output through the decoder's final LayerNorm), computed with transformers' modules
    # from its recorded hidden states: the zero initial queries, each earlier layer's output, the
    # final (normalised) output.
    states = expected.transformer_decoder_hidden_states
    assert len(states) == 4 and not states[0].any()
    assert torch.equal(states[-1], expected.transformer_decoder_last_hidden_state)
    norm = reference.model.transformer_module.decoder.layernorm
    assert len(predictions.aux) == 2
    for (cls, mask), hidden in zip(predictions.aux, states[1:-1], strict=True):
        decoded = norm(hidden)
        aux_masks = torch.einsum("nqc,nchw->nqhw", reference.mask_embedder(decoded),
                                 expected.pixel_decoder_last_hidden_state)
        assert (cls - reference.class_predictor(decoded)).abs().max() <= 1e-4
        assert (mask - aux_masks).abs().max() <= 1e-4
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
    from transformers import MaskFormerImageProcessor

    processor = MaskFormerImageProcessor()
    return processor.post_process_semantic_segmentation(outputs, target_sizes=[tuple(size)] * 2)


def _transformers4_layout(state: dict) -> dict:
    """The DETR decoder's key names in the transformers-4 files on the hub."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("model.transformer_module.decoder.layers."):
            key = key.replace(".o_proj.", ".out_proj.")
            key = re.sub(r"\.mlp\.(fc[12])\.", r".\1.", key)
        renamed[key] = value
    return renamed


def test_transformers4_layout_converts_the_same():
    state = hf_maskformer("swin").state_dict()
    old = _transformers4_layout(state)
    assert set(old) != set(state)
    ours, theirs = convert_hf_maskformer(state), convert_hf_maskformer(old)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_converter_refuses_other_files_unknown_keys_and_other_backbones():
    mask2former = hf_mask2former("swin").state_dict()
    with pytest.raises(ConfigError, match="not a transformers MaskFormerForInstanceSegmentation.*"
                                          "model=mask2former.*hf_mask2former"):
        convert_hf_maskformer(mask2former)
    with pytest.raises(ConfigError, match="checkpoint_format=auto"):
        convert_hf_maskformer({"decode_head.weight": torch.zeros(1)})
    reference = hf_maskformer("swin")
    state = dict(reference.state_dict())
    state["model.transformer_module.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match="extra.weight"):
        convert_hf_maskformer(state)
    no_backbone = {k: v for k, v in reference.state_dict().items()
                   if not k.startswith("model.pixel_level_module.encoder.")}
    with pytest.raises(ConfigError, match="neither a Swin backbone"):
        convert_hf_maskformer(no_backbone)


def test_auto_detection_tells_maskformer_from_mask2former():
    maskformer = hf_maskformer("swin").state_dict()
    mask2former = hf_mask2former("swin").state_dict()
    # Exactly one registered detector claims each file.
    for state, fmt in ((maskformer, "hf_maskformer"), (mask2former, "hf_mask2former")):
        assert [name for name, (detect, _) in _converters().items() if detect(state)] == [fmt]
    assert convert(maskformer, set())[1] == "hf_maskformer"
    assert convert(mask2former, set())[1] == "hf_mask2former"
    # A Mask2Former file read as hf_maskformer (model.checkpoint_format=hf_maskformer) is refused.
    with pytest.raises(ConfigError, match="load it into model=mask2former"):
        convert(mask2former, set(), "hf_maskformer")


def test_backbone_and_class_count_mismatch_name_the_file_and_the_remedy(tmp_path):
    reference = hf_maskformer("swin")
    path = save(reference, tmp_path / "maskformer_swin.safetensors")
    with pytest.raises(ConfigError) as info:
        segexp_maskformer("resnet", f"model.checkpoint={path}")
    message = str(info.value)
    assert message.startswith(f"model.checkpoint={path} (read as 'hf_maskformer') does not fit")
    assert "backbone.body.conv1.weight" in message  # a missing ResNet key is named
    assert "Check model=, backbone= and head=" in message
    other = hf_maskformer("swin", num_labels=NUM_LABELS + 2)
    path = save(other, tmp_path / "maskformer_7_classes.safetensors")
    with pytest.raises(ConfigError) as info:
        segexp_maskformer("swin", f"model.checkpoint={path}")
    message = str(info.value)
    assert message.startswith(f"model.checkpoint={path} (read as 'hf_maskformer') does not fit")
    assert "decode_head.transformer.class_predictor.weight" in message
    assert "set model.reinit_classifier=true" in message
    ours = segexp_maskformer("swin", f"model.checkpoint={path}", "model.reinit_classifier=true")
    assert ours.decode_head.transformer.class_predictor.out_features == NUM_LABELS + 1
    assert torch.equal(ours.decode_head.transformer.queries_embedder.weight,
                       other.model.transformer_module.queries_embedder.weight)
