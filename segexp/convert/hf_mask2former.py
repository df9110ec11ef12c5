"""Hugging Face ``transformers`` Mask2Former weights -> segexp's ``model=mask2former``.

Source: the state dict of ``Mask2FormerForUniversalSegmentation`` (``facebook/mask2former-swin-
tiny-ade-semantic`` and the other ``facebook/mask2former-swin-*`` files), in the layout of the
files on the hub (transformers 4: ``attention.self.query``, ...) or of transformers 5
(``swin.encoder...attention.q_proj``). Backbones: Swin (target ``backbone=swin_tiny`` / ``_small``
/ ``_base``: timm's Swin in ``backbone.body`` and the per-map LayerNorms in
``backbone.out_norms``) and transformers' ResNet (``backbone=resnet50`` / ``resnet101``); the
backbone keys are mapped by :mod:`segexp.convert.hf_backbones` (shared with MaskFormer)::

    model.pixel_level_module.encoder.[swin.]embeddings.patch_embeddings.projection -> backbone.body.patch_embed.proj
    ...encoder.layers.{i}.blocks.{j}.layernorm_before / layernorm_after      -> body.layers_{i}.blocks.{j}.norm1 / norm2
        .attention q, k, v projections (concatenated)                         -> .attn.qkv
        .attention output projection / relative_position_bias_table          -> .attn.proj / .attn.relative_position_bias_table
        .mlp.fc1 / fc2 (intermediate.dense / output.dense)                    -> .mlp.fc1 / fc2
    ...encoder.layers.{i}.downsample                                          -> body.layers_{i+1}.downsample
    model.pixel_level_module.encoder.hidden_states_norms.stage{k}              -> backbone.out_norms.{k-1}
    model.pixel_level_module.decoder.*                                         -> decode_head.pixel_decoder.*
        adapter_{k} / layer_{k}                                               -> lateral_convs / output_convs (coarse to fine)
    model.transformer_module.*                                                 -> decode_head.transformer.*
        decoder.layers.{i}.self_attn.{q,k,v}_proj (concatenated)              -> layers.{i}.self_attn.in_proj_*
        decoder.layernorm / decoder.mask_predictor.mask_embedder.{i}          -> layernorm / mask_embedder.layers.{i}
    class_predictor                                                            -> decode_head.transformer.class_predictor

Dropped: the Swin model's final ``layernorm`` (the backbone returns the ``hidden_states_norms``
maps, not it), relative position index buffers, and the loss's ``criterion.empty_weight``.

Same function (tests/models/test_mask2former.py: class logits, mask logits and semantic scores within
1e-4): both Swins partition every stage into whole windows (transformers' backbone runs with
``always_partition=True``, segexp's config with timm's ``always_partition``), LayerNorm eps 1e-5,
the same multi-scale deformable attention and masked attention.
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


def looks_like_hf_mask2former(state: Mapping[str, object]) -> bool:
    """A transformers ``Mask2FormerForUniversalSegmentation`` state dict."""
    return "class_predictor.weight" in state and any(
        k.startswith(_TRF + "decoder.mask_predictor.") for k in state)


# Head keys transformers has, relative to their module (ours carry the same names there).
_PIXEL_DECODER_KEY = re.compile(
    r"^(level_embed|input_projections\.\d+\.[01]\.(weight|bias)|mask_projection\.(weight|bias)"
    r"|encoder\.layers\.\d+\.(self_attn\.(sampling_offsets|attention_weights|value_proj|"
    r"output_proj)|self_attn_layer_norm|fc1|fc2|final_layer_norm)\.(weight|bias))$")
_TRANSFORMER_KEY = re.compile(
    r"^((queries_embedder|queries_features|level_embed)\.weight"
    r"|input_projections\.\d+\.(weight|bias)|layernorm\.(weight|bias)"
    r"|layers\.\d+\.(cross_attn\.(in_proj_weight|in_proj_bias)|(cross_attn|self_attn)\.out_proj"
    r"\.(weight|bias)|(self_attn_layer_norm|cross_attn_layer_norm|fc1|fc2|final_layer_norm)"
    r"\.(weight|bias)))$")


def _head_key(key: str, num_fpn: int) -> str | None:
    if key in ("class_predictor.weight", "class_predictor.bias"):
        return "decode_head.transformer." + key
    if key.startswith(_PIX):
        rest = key[len(_PIX):]
        match = re.match(r"^(adapter|layer)_(\d+)\.([012]\.(weight|bias))$", rest)
        if match:  # registered fine to coarse; ours are used (and listed) coarse to fine
            group = "lateral_convs" if match.group(1) == "adapter" else "output_convs"
            return f"decode_head.pixel_decoder.{group}.{num_fpn - int(match.group(2))}." \
                   f"{match.group(3)}"
        return "decode_head.pixel_decoder." + rest if _PIXEL_DECODER_KEY.match(rest) else None
    if key.startswith(_TRF):
        rest = key[len(_TRF):].removeprefix("decoder.")
        match = re.match(r"^mask_predictor\.mask_embedder\.(\d+)\.0\.(weight|bias)$", rest)
        if match:
            return f"decode_head.transformer.mask_embedder.layers.{match.group(1)}.0." \
                   f"{match.group(2)}"
        return "decode_head.transformer." + rest if _TRANSFORMER_KEY.match(rest) else None
    return None


def _dropped(key: str) -> bool:
    return (key == "criterion.empty_weight" or key.endswith("relative_position_index")
            or (key.startswith(_ENC) and swin_final_norm(key[len(_ENC):])))


def convert_hf_mask2former(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers Mask2Former state dict (Swin or ResNet backbone) to segexp keys (see the
    module docstring). Raises ``ConfigError`` for another backbone and for any key it does not
    know, so nothing is dropped silently."""
    swin = is_swin(state_dict, _ENC)
    resnet = is_resnet(state_dict, _ENC)
    if not (swin or resnet):
        raise ConfigError(
            "convert_hf_mask2former: this transformers Mask2Former has neither a Swin backbone "
            "(embeddings.patch_embeddings) nor a ResNet one (embedder.embedder); only those "
            "convert (to model=mask2former backbone=swin_* or resnet50/resnet101).")
    num_fpn = len({m.group(1) for k in state_dict
                   if (m := re.match(re.escape(_PIX) + r"adapter_(\d+)\.", k))})
    keys = KeyMap()
    for key, value in state_dict.items():
        if _dropped(key):
            continue
        if key.startswith(_ENC):
            keys.backbone(key, key[len(_ENC):], swin, value)
            continue
        match = re.match(r"^" + re.escape(_TRF) + r"decoder\.layers\.(\d+)\.self_attn\."
                         r"([qkv])_proj\.(weight|bias)$", key)
        if match:
            keys.part(f"decode_head.transformer.layers.{match.group(1)}.self_attn.in_proj_"
                      f"{match.group(3)}", "qkv".index(match.group(2)), value)
        else:
            keys.put(key, _head_key(key, num_fpn), value)
    return keys.result("convert_hf_mask2former", "Mask2Former")
