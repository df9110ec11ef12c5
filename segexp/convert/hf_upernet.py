"""Hugging Face ``transformers`` UPerNet + ConvNeXt weights -> segexp's UPerNet.

Source: the state dict of ``UperNetForSemanticSegmentation`` with a ``ConvNextBackbone``
(``openmmlab/upernet-convnext-tiny`` / ``-small`` / ``-base`` / ``-large`` / ``-xlarge``: their
``model.safetensors`` or ``pytorch_model.bin``). Target: ``model=upernet backbone=convnext_tiny``
(``convnext_small`` / ``convnext_base`` / ``convnext_large``), i.e. timm's ConvNeXt in
``backbone.body``, the per-map LayerNorms in ``backbone.out_norms`` and ``UPerHead`` /
``FCNHead`` as ``decode_head`` / ``aux_head``::

    backbone.embeddings.patch_embeddings                  -> backbone.body.stem_0
    backbone.embeddings.layernorm                         -> backbone.body.stem_1
    backbone.encoder.stages.{i}.downsampling_layer.{0,1}  -> backbone.body.stages_{i}.downsample.{0,1}
    backbone.encoder.stages.{i}.layers.{j}.dwconv         -> backbone.body.stages_{i}.blocks.{j}.conv_dw
        .layernorm / .pwconv1 / .pwconv2                   -> .norm / .mlp.fc1 / .mlp.fc2
        .layer_scale_parameter                             -> .gamma
    backbone.hidden_states_norms.stage{k}                 -> backbone.out_norms.{k-1}
    decode_head.psp_modules.{i}.1.{conv,batch_norm}       -> decode_head.ppm.branches.{i}.1.{0,1}
    decode_head.bottleneck                                -> decode_head.ppm_bottleneck
    decode_head.{lateral_convs.i,fpn_convs.i,fpn_bottleneck}.{conv,batch_norm} -> same.{0,1}
    decode_head.classifier                                -> decode_head.classifier.1
    auxiliary_head.{convs.i,conv_cat}.{conv,batch_norm}   -> aux_head.{convs.i,conv_cat}.{0,1}
    auxiliary_head.classifier                             -> aux_head.classifier.1

Every module computes the same function (checked in tests/convert/test_hf_upernet.py: logits within 1e-4):
LayerNorm eps 1e-6 everywhere in the backbone, exact GELU, bias-free convs before BatchNorm,
bilinear resizing with ``align_corners=False`` (segexp's ``model.align_corners`` / the head's
``align_corners`` default). transformers' heads have no dropout; segexp's dropout is inactive in
eval mode. A file without BatchNorm ``num_batches_tracked`` buffers gets them as zeros (they do
not affect the output).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from segexp.errors import ConfigError, first_few

_CONV_MODULE = r"\.(conv|batch_norm)\."
_CONV_INDEX = {"conv": "0", "batch_norm": "1"}

_BACKBONE = [
    (r"^backbone\.embeddings\.patch_embeddings\.", "backbone.body.stem_0."),
    (r"^backbone\.embeddings\.layernorm\.", "backbone.body.stem_1."),
    (r"^backbone\.encoder\.stages\.(\d+)\.downsampling_layer\.([01])\.",
     r"backbone.body.stages_\1.downsample.\2."),
    (r"^backbone\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$",
     r"backbone.body.stages_\1.blocks.\2.gamma"),
    (r"^backbone\.encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.",
     r"backbone.body.stages_\1.blocks.\2.conv_dw."),
    (r"^backbone\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.",
     r"backbone.body.stages_\1.blocks.\2.norm."),
    (r"^backbone\.encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.",
     r"backbone.body.stages_\1.blocks.\2.mlp.fc1."),
    (r"^backbone\.encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.",
     r"backbone.body.stages_\1.blocks.\2.mlp.fc2."),
]
# Head modules built from UperNetConvModule (conv + batch_norm + ReLU): (ours, theirs prefix).
_HEAD = [
    (r"^decode_head\.psp_modules\.(\d+)\.1" + _CONV_MODULE, r"decode_head.ppm.branches.\1.1."),
    (r"^decode_head\.bottleneck" + _CONV_MODULE, "decode_head.ppm_bottleneck."),
    (r"^decode_head\.lateral_convs\.(\d+)" + _CONV_MODULE, r"decode_head.lateral_convs.\1."),
    (r"^decode_head\.fpn_convs\.(\d+)" + _CONV_MODULE, r"decode_head.fpn_convs.\1."),
    (r"^decode_head\.fpn_bottleneck" + _CONV_MODULE, "decode_head.fpn_bottleneck."),
    (r"^auxiliary_head\.convs\.(\d+)" + _CONV_MODULE, r"aux_head.convs.\1."),
    (r"^auxiliary_head\.conv_cat" + _CONV_MODULE, "aux_head.conv_cat."),
]
_CLASSIFIERS = {"decode_head.classifier.": "decode_head.classifier.1.",
                "auxiliary_head.classifier.": "aux_head.classifier.1."}


def looks_like_hf_upernet(state: Mapping[str, object]) -> bool:
    """A transformers ``UperNetForSemanticSegmentation`` state dict (any backbone: a non-ConvNeXt
    one is refused by :func:`convert_hf_upernet` with a message saying so)."""
    return ("decode_head.classifier.weight" in state
            and "decode_head.fpn_bottleneck.conv.weight" in state)


def _convert_key(key: str) -> str | None:
    for prefix, ours in _CLASSIFIERS.items():
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    for pattern, replacement in _BACKBONE:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    match = re.match(r"^backbone\.hidden_states_norms\.stage(\d+)\.(.+)$", key)
    if match:
        return f"backbone.out_norms.{int(match.group(1)) - 1}.{match.group(2)}"
    for pattern, replacement in _HEAD:
        match = re.match(pattern, key)
        if match:
            part = match.group(match.lastindex)  # conv | batch_norm
            new_prefix = re.sub(pattern, replacement, match.group(0))
            return new_prefix + _CONV_INDEX[part] + "." + key[match.end():]
    return None


def convert_hf_upernet(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers UPerNet-ConvNeXt state dict to segexp keys (see the module docstring).

    Raises ``ConfigError`` for a UPerNet with another backbone (Swin, ...) and for any key it does
    not know, so nothing is dropped silently.
    """
    if not any(k.startswith("backbone.encoder.stages.") and ".layers." in k for k in state_dict) \
            or "backbone.embeddings.patch_embeddings.weight" not in state_dict:
        raise ConfigError(
            "convert_hf_upernet: this transformers UPerNet does not have a ConvNeXt backbone "
            "(no backbone.embeddings.patch_embeddings / backbone.encoder.stages.*.layers.*); only "
            "openmmlab/upernet-convnext-* files convert (to model=upernet backbone=convnext_*).")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        new = _convert_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        shown = first_few(unknown)
        raise ConfigError(f"convert_hf_upernet: keys not part of a transformers UPerNet-ConvNeXt: "
                          f"{shown}.")
    return add_missing_bn_counters(out)


def add_missing_bn_counters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every BatchNorm that has ``running_mean`` a ``num_batches_tracked`` (0) if the file
    has none: PyTorch saves the buffer, but some exported files drop it. It never changes the
    output, and in training only matters to a BatchNorm with ``momentum=None`` (segexp has none)."""
    for key in [k for k in state if k.endswith(".running_mean")]:
        counter = key[: -len("running_mean")] + "num_batches_tracked"
        state.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return state
