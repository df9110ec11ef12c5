"""Hugging Face ``transformers`` MaskFormer weights -> segexp's ``model=maskformer``.

Source: the state dict of ``MaskFormerForInstanceSegmentation`` (``facebook/maskformer-swin-tiny-ade``
and the other ``facebook/maskformer-swin-*`` files), in the layout of the files on the hub
(transformers 4: DETR's ``out_proj`` and ``fc1``) or of transformers 5 (``o_proj``, ``mlp.fc1``).
Backbones: transformers' MaskFormer Swin (target ``backbone=swin_tiny`` / ``swin_small``; the
window-12 Swin-B files need ``backbone=swin_base backbone.name=swin_base_patch4_window12_384``:
timm's Swin in ``backbone.body``, the per-map LayerNorms in ``backbone.out_norms``) and
transformers' ResNet (``backbone=resnet50`` / ``resnet101``). The backbone keys are mapped by
:mod:`segexp.convert.hf_backbones` (shared with Mask2Former)::

    model.pixel_level_module.encoder.model.embeddings / .encoder.layers.* -> backbone.body.*
    model.pixel_level_module.encoder.hidden_states_norms.{k}              -> backbone.out_norms.{k}
    model.pixel_level_module.encoder.embedder / .encoder.stages (ResNet)  -> backbone.body.*
    model.pixel_level_module.decoder.*                          -> decode_head.pixel_decoder.*
        fpn.stem / mask_projection                              -> stem / mask_projection
        fpn.layers.{i}.proj / fpn.layers.{i}.block              -> lateral_convs.{i} / output_convs.{i}
    model.transformer_module.*                                  -> decode_head.transformer.*
        queries_embedder / input_projection / decoder.layernorm -> (same) / (same) / layernorm
        decoder.layers.{i}.self_attn / encoder_attn             -> layers.{i}.self_attn / cross_attn
            {q,k,v}_proj (concatenated) / o_proj (out_proj)     -> in_proj_* / out_proj
        decoder.layers.{i}.self_attn_layer_norm                 -> layers.{i}.self_attn_layer_norm
        decoder.layers.{i}.encoder_attn_layer_norm              -> layers.{i}.cross_attn_layer_norm
        decoder.layers.{i}.mlp.fc1 / fc2 (transformers 4: fc1 / fc2) -> layers.{i}.fc1 / fc2
        decoder.layers.{i}.final_layer_norm                     -> layers.{i}.final_layer_norm
    class_predictor                                             -> decode_head.transformer.class_predictor
    mask_embedder.{i}.0                                 -> decode_head.transformer.mask_embedder.layers.{i}.0

Dropped: the Swin model's final ``layernorm`` (the backbone returns the ``hidden_states_norms``
maps, not it), relative position index buffers, and the loss's ``criterion.empty_weight``.

Same function (tests/convert/test_maskformer_convert.py: class logits, mask logits and semantic scores
within 1e-4): both Swins pad each map to whole windows before the cyclic shift and keep the window
size and shift in every stage, LayerNorm eps 1e-5; the same FPN (GroupNorm(32), nearest
upsampling), DETR decoder (post-norm, sine position embedding normalised to ``(0, 2 pi]`` on the
deepest map, zero initial queries) and 3-layer mask embedding on the decoder's normalised output.
The earlier layers' predictions (deep supervision, training only) follow the reference
implementation: each layer's output through the shared LayerNorm, the next layer reading the
un-normalised output. transformers' ``use_auxiliary_loss`` logits differ (they come from its
recorded hidden states without that LayerNorm, the zero initial queries included), so the test
checks them against transformers' per-layer hidden states put through its own LayerNorm and
predictors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from segexp.convert.hf_backbones import KeyMap, is_resnet, is_swin, swin_final_norm
from segexp.errors import ConfigError

_ENC = "model.pixel_level_module.encoder."
_PIX = "model.pixel_level_module.decoder."
_TRF = "model.transformer_module."

_HEAD = [  # (theirs: a pattern on the whole key, ours: its replacement)
    (r"^" + re.escape(_PIX) + r"fpn\.stem\.([01])\.(weight|bias)$", r"decode_head.pixel_decoder.stem.\1.\2"),
    (r"^" + re.escape(_PIX) + r"fpn\.layers\.(\d+)\.proj\.([01])\.(weight|bias)$",
     r"decode_head.pixel_decoder.lateral_convs.\1.\2.\3"),
    (r"^" + re.escape(_PIX) + r"fpn\.layers\.(\d+)\.block\.([01])\.(weight|bias)$",
     r"decode_head.pixel_decoder.output_convs.\1.\2.\3"),
    (r"^" + re.escape(_PIX) + r"mask_projection\.(weight|bias)$",
     r"decode_head.pixel_decoder.mask_projection.\1"),
    (r"^" + re.escape(_TRF) + r"(queries_embedder\.weight|input_projection\.(weight|bias))$",
     r"decode_head.transformer.\1"),
    (r"^" + re.escape(_TRF) + r"decoder\.layernorm\.(weight|bias)$", r"decode_head.transformer.layernorm.\1"),
    (r"^class_predictor\.(weight|bias)$", r"decode_head.transformer.class_predictor.\1"),
    (r"^mask_embedder\.(\d+)\.0\.(weight|bias)$", r"decode_head.transformer.mask_embedder.layers.\1.0.\2"),
]
_DECODER_LAYER = {  # theirs after "decoder.layers.{i}." (transformers 5 and 4) -> ours
    "self_attn.o_proj.": "self_attn.out_proj.",
    "self_attn.out_proj.": "self_attn.out_proj.",
    "encoder_attn.o_proj.": "cross_attn.out_proj.",
    "encoder_attn.out_proj.": "cross_attn.out_proj.",
    "self_attn_layer_norm.": "self_attn_layer_norm.",
    "encoder_attn_layer_norm.": "cross_attn_layer_norm.",
    "mlp.fc1.": "fc1.",
    "mlp.fc2.": "fc2.",
    "fc1.": "fc1.",
    "fc2.": "fc2.",
    "final_layer_norm.": "final_layer_norm.",
}
_ATTENTION = {"self_attn": "self_attn", "encoder_attn": "cross_attn"}


def looks_like_hf_maskformer(state: Mapping[str, object]) -> bool:
    """A transformers ``MaskFormerForInstanceSegmentation`` state dict."""
    return ("class_predictor.weight" in state and any(k.startswith("mask_embedder.") for k in state)
            and any(k.startswith(_PIX + "fpn.") for k in state))


def _head_key(key: str) -> str | None:
    for pattern, replacement in _HEAD:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    match = re.match(r"^" + re.escape(_TRF) + r"decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if match:
        ours = _DECODER_LAYER.get(match.group(2) + ".")
        if ours is not None:
            return f"decode_head.transformer.layers.{match.group(1)}.{ours}{match.group(3)}"
    return None


def _dropped(key: str) -> bool:
    return (key == "criterion.empty_weight" or key.endswith("relative_position_index")
            or (key.startswith(_ENC) and swin_final_norm(key[len(_ENC):])))


def convert_hf_maskformer(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers MaskFormer state dict (Swin or ResNet backbone) to segexp keys (see the
    module docstring). Raises ``ConfigError`` for a state dict that is not MaskFormer's, for
    another backbone and for any key it does not know, so nothing is dropped silently."""
    if not looks_like_hf_maskformer(state_dict):
        mask2former = any(k.startswith(_TRF + "decoder.mask_predictor.") for k in state_dict)
        hint = ("it is a transformers Mask2Former (model.transformer_module.decoder.mask_predictor): "
                "load it into model=mask2former, with model.checkpoint_format=auto or hf_mask2former"
                if mask2former else "set model.checkpoint_format=auto to detect its layout, or the "
                "format it was saved in")
        raise ConfigError(
            "convert_hf_maskformer: not a transformers MaskFormerForInstanceSegmentation state dict "
            f"(no class_predictor, mask_embedder.* and {_PIX}fpn.* keys); {hint}.")
    swin = is_swin(state_dict, _ENC)
    resnet = is_resnet(state_dict, _ENC)
    if not (swin or resnet):
        raise ConfigError(
            "convert_hf_maskformer: this transformers MaskFormer has neither a Swin backbone "
            "(embeddings.patch_embeddings) nor a ResNet one (embedder.embedder); only those "
            "convert (to model=maskformer backbone=swin_* or resnet50/resnet101).")
    keys = KeyMap()
    for key, value in state_dict.items():
        if _dropped(key):
            continue
        if key.startswith(_ENC):
            keys.backbone(key, key[len(_ENC):], swin, value)
            continue
        match = re.match(r"^" + re.escape(_TRF) + r"decoder\.layers\.(\d+)\.(self_attn|encoder_attn)\."
                         r"([qkv])_proj\.(weight|bias)$", key)
        if match:
            keys.part(f"decode_head.transformer.layers.{match.group(1)}."
                      f"{_ATTENTION[match.group(2)]}.in_proj_{match.group(4)}",
                      "qkv".index(match.group(3)), value)
        else:
            keys.put(key, _head_key(key), value)
    return keys.result("convert_hf_maskformer", "MaskFormer")
