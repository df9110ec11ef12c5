"""MMSegmentation checkpoints (their ``state_dict``) -> segexp's layout.

Supported configs and the segexp model each one loads into:

=====================================  ===========================================================
MMSegmentation config                  segexp
=====================================  ===========================================================
``fcn_r50-d8`` (FCNHead + aux)         ``model=fcn backbone=resnet50_d8 backbone.name=resnet50c
                                       +head@model.aux_head=fcn_aux`` (``model=fcn`` has no
                                       auxiliary head; the experiment ``fcn_r50_d8_cityscapes``
                                       adds it)
``pspnet_r50-d8``                      ``model=pspnet backbone=resnet50_d8 backbone.name=resnet50c``
``deeplabv3_r50-d8``                   ``model=deeplabv3 backbone=resnet50_d8 backbone.name=resnet50c``
``upernet_convnext`` (T/S/B/L)         ``model=upernet backbone=convnext_tiny`` (``_small`` ...)
``segformer_mit-b0`` ... ``b5``        ``model=segformer backbone=mit_b0 head.proj_norm_act=true``
                                       (an option SegFormerHead must gain first: see "SegFormer"
                                       below; B2..B5 also ``head.channels=768``)
=====================================  ===========================================================

``r101-d8`` files load with ``backbone=resnet101_d8 backbone.name=resnet101c``.

Key layouts (MMSegmentation's ``ConvModule`` names its parts ``conv``, ``bn``; segexp's
``ConvBNReLU`` is a Sequential, ``0``, ``1``; every ``conv_seg`` is segexp's ``classifier.1``)::

    ResNetV1c (deep stem)
        backbone.stem.{0,1,3,4,6}                  -> backbone.body.conv1.{0,1,3,4,6}
        backbone.stem.7                            -> backbone.body.bn1
        backbone.layer{n}.*                        -> backbone.body.layer{n}.* (same names)
    ConvNeXt (mmpretrain)
        backbone.downsample_layers.0.{0,1}         -> backbone.body.stem_{0,1}
        backbone.downsample_layers.i.{0,1}         -> backbone.body.stages_i.downsample.{0,1}
        backbone.stages.i.j.depthwise_conv         -> backbone.body.stages_i.blocks.j.conv_dw
          .norm / .pointwise_conv1 / .pointwise_conv2 / .gamma -> .norm / .mlp.fc1 / .mlp.fc2 / .gamma
        backbone.norm{i}                           -> backbone.out_norms.{i}
    MiT (SegFormer)
        backbone.layers.i.0.projection / .norm     -> backbone.stages.i.patch_embed.proj / .norm
        backbone.layers.i.1.j.norm1 / .norm2       -> backbone.stages.i.blocks.j.norm1 / .norm2
        ...attn.attn.in_proj_{weight,bias}         -> ...attn.{q,k,v} (split in 3)
        ...attn.attn.out_proj / .attn.sr / .attn.norm -> ...attn.proj / .attn.sr / .attn.sr_norm
        ...ffn.layers.{0,1,4}                      -> ...mlp.{fc1,dwconv,fc2} (1x1 convs -> Linear)
        backbone.layers.i.2                        -> backbone.stages.i.norm
    FCNHead
        decode_head.convs.i / .conv_cat            -> decode_head.convs.i / .conv_cat
    PSPHead
        decode_head.psp_modules.i.1                -> decode_head.ppm.branches.i.1
        decode_head.bottleneck                     -> decode_head.bottleneck
    ASPPHead
        decode_head.image_pool.1                   -> decode_head.aspp.image_pool.1
        decode_head.aspp_modules.i                 -> decode_head.aspp.branches.i
        decode_head.bottleneck                     -> decode_head.aspp.bottleneck
    UPerHead
        decode_head.psp_modules.i.1                -> decode_head.ppm.branches.i.1
        decode_head.bottleneck                     -> decode_head.ppm_bottleneck
        decode_head.{lateral_convs.i,fpn_convs.i,fpn_bottleneck} -> same names
    SegformerHead
        decode_head.convs.i                        -> decode_head.proj.i (a ConvBNReLU)
        decode_head.fusion_conv                    -> decode_head.fuse (input blocks reversed)
    auxiliary FCNHead
        auxiliary_head.*                           -> aux_head.*

Both ASPP implementations concatenate [image pool, 1x1, atrous...] in that order; MMSeg's
``deeplabv3_r50-d8`` rates (1, 12, 24, 36) are segexp's defaults for a stride-8 map. The d8 ResNets
match too: timm's ``output_stride=8`` gives the first block of a dilated stage the previous
dilation, as MMSegmentation's ``contract_dilation=True``.

SegFormer: MMSegmentation's ``SegformerHead`` is not the official all-MLP head that segexp's
``SegFormerHead`` follows: each level's 1x1 projection is a ConvModule (bias-free conv, BatchNorm,
ReLU), not a Linear, and the levels are concatenated shallow first (the official code and segexp:
deepest first). The concatenation order is a permutation of the fuse conv's input channels, done
here; the per-level BatchNorm + ReLU needs the head built with them (``head.proj_norm_act=true``,
keys ``decode_head.proj.i.{0,1}``). MMSegmentation's MiT also uses LayerNorm eps 1e-6 in the patch
embeddings and the key/value reduction, where the official code (and segexp) use 1e-5: same keys,
outputs differ slightly.

Not converted, with an error naming the keys: other heads or backbones (DeepLabV3+'s separable
ASPP, Swin, ViT/SETR, ...), several auxiliary heads (``auxiliary_head.0``), ConvNeXt V2 (GRN).
``data_preprocessor.*`` buffers (mean/std, in some MMSeg 1.x files) are not weights and are
dropped. A file without BatchNorm ``num_batches_tracked`` buffers gets them as zeros.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from segexp.convert.hf_upernet import add_missing_bn_counters
from segexp.errors import ConfigError, first_few

_PART = {"conv": "0", "bn": "1"}  # ConvModule -> ConvBNReLU


def looks_like_mmseg(state: Mapping[str, object]) -> bool:
    """An MMSegmentation ``EncoderDecoder`` state dict: every MMSeg decode head ends in
    ``conv_seg`` (transformers calls it ``classifier``, segexp ``classifier.1``)."""
    return "decode_head.conv_seg.weight" in state and any(k.startswith("backbone.") for k in state)


def _conv_module(key: str, prefix: str, ours: str) -> str | None:
    """``{prefix}.conv.weight`` / ``{prefix}.bn.running_mean`` -> ``{ours}.0.weight`` / ``{ours}.1...``."""
    match = re.match(re.escape(prefix) + r"\.(conv|bn)\.(.+)$", key)
    return f"{ours}.{_PART[match.group(1)]}.{match.group(2)}" if match else None


# ---------------------------------------------------------------------------------------------
# Backbones


def _resnet(key: str) -> str | None:
    match = re.match(r"^backbone\.stem\.(\d+)\.(.+)$", key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        if index in (0, 1, 3, 4, 6):
            return f"backbone.body.conv1.{index}.{rest}"
        return f"backbone.body.bn1.{rest}" if index == 7 else None
    if re.match(r"^backbone\.(layer[1-4]\.|conv1\.|bn1\.)", key):  # also a plain 7x7 stem (V1b)
        return "backbone.body." + key[len("backbone."):]
    return None


_CONVNEXT_BLOCK = {"depthwise_conv.": "conv_dw.", "norm.": "norm.", "pointwise_conv1.": "mlp.fc1.",
                   "pointwise_conv2.": "mlp.fc2."}


def _convnext(key: str) -> str | None:
    match = re.match(r"^backbone\.downsample_layers\.(\d+)\.([01])\.(.+)$", key)
    if match:
        stage, part, rest = match.groups()
        return (f"backbone.body.stem_{part}.{rest}" if stage == "0"
                else f"backbone.body.stages_{stage}.downsample.{part}.{rest}")
    match = re.match(r"^backbone\.stages\.(\d+)\.(\d+)\.(.+)$", key)
    if match:
        stage, block, rest = match.groups()
        prefix = f"backbone.body.stages_{stage}.blocks.{block}."
        if rest == "gamma":
            return prefix + "gamma"
        for theirs, ours in _CONVNEXT_BLOCK.items():
            if rest.startswith(theirs):
                return prefix + ours + rest[len(theirs):]
        return None
    match = re.match(r"^backbone\.norm(\d+)\.(.+)$", key)
    return f"backbone.out_norms.{match.group(1)}.{match.group(2)}" if match else None


_MIT_BLOCK = {"norm1.": "norm1.", "norm2.": "norm2.", "attn.attn.out_proj.": "attn.proj.",
              "attn.sr.": "attn.sr.", "attn.norm.": "attn.sr_norm.", "ffn.layers.0.": "mlp.fc1.",
              "ffn.layers.1.": "mlp.dwconv.", "ffn.layers.4.": "mlp.fc2."}


def _mit(key: str, value: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    match = re.match(r"^backbone\.layers\.(\d+)\.0\.(projection|norm)\.(.+)$", key)
    if match:
        stage, part, rest = match.groups()
        out[f"backbone.stages.{stage}.patch_embed.{'proj' if part == 'projection' else 'norm'}."
            f"{rest}"] = value
        return True
    match = re.match(r"^backbone\.layers\.(\d+)\.2\.(.+)$", key)
    if match:
        out[f"backbone.stages.{match.group(1)}.norm.{match.group(2)}"] = value
        return True
    match = re.match(r"^backbone\.layers\.(\d+)\.1\.(\d+)\.(.+)$", key)
    if not match:
        return False
    stage, block, rest = match.groups()
    prefix = f"backbone.stages.{stage}.blocks.{block}."
    in_proj = re.match(r"^attn\.attn\.in_proj_(weight|bias)$", rest)
    if in_proj:  # nn.MultiheadAttention packs [q; k; v] along dim 0
        for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
            out[f"{prefix}attn.{name}.{in_proj.group(1)}"] = part.contiguous()
        return True
    for theirs, ours in _MIT_BLOCK.items():
        if rest.startswith(theirs):
            if ours in ("mlp.fc1.", "mlp.fc2.") and value.ndim == 4:
                value = value.flatten(1)  # 1x1 conv (out, in, 1, 1) -> Linear (out, in)
            out[prefix + ours + rest[len(theirs):]] = value
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Heads


def _fcn_head(key: str, theirs: str, ours: str) -> str | None:
    match = re.match(re.escape(theirs) + r"\.convs\.(\d+)\.", key)
    if match:
        return _conv_module(key, f"{theirs}.convs.{match.group(1)}", f"{ours}.convs.{match.group(1)}")
    return _conv_module(key, f"{theirs}.conv_cat", f"{ours}.conv_cat")


def _ppm(key: str, ours: str) -> str | None:
    match = re.match(r"^decode_head\.psp_modules\.(\d+)\.1\.", key)
    if match:
        index = match.group(1)
        return _conv_module(key, f"decode_head.psp_modules.{index}.1",
                            f"{ours}.branches.{index}.1")
    return None


def _decode_head(key: str, kind: str) -> str | None:
    if key.startswith("decode_head.conv_seg."):
        return "decode_head.classifier.1." + key[len("decode_head.conv_seg."):]
    if kind == "fcn":
        return _fcn_head(key, "decode_head", "decode_head")
    if kind == "psp":
        return _ppm(key, "decode_head.ppm") or _conv_module(key, "decode_head.bottleneck",
                                                            "decode_head.bottleneck")
    if kind == "aspp":
        match = re.match(r"^decode_head\.aspp_modules\.(\d+)\.", key)
        if match:
            return _conv_module(key, f"decode_head.aspp_modules.{match.group(1)}",
                                f"decode_head.aspp.branches.{match.group(1)}")
        return (_conv_module(key, "decode_head.image_pool.1", "decode_head.aspp.image_pool.1")
                or _conv_module(key, "decode_head.bottleneck", "decode_head.aspp.bottleneck"))
    if kind == "uper":
        converted = _ppm(key, "decode_head.ppm") or _conv_module(key, "decode_head.bottleneck",
                                                                 "decode_head.ppm_bottleneck")
        if converted:
            return converted
        match = re.match(r"^decode_head\.(lateral_convs|fpn_convs)\.(\d+)\.", key)
        if match:
            name = f"decode_head.{match.group(1)}.{match.group(2)}"
            return _conv_module(key, name, name)
        return _conv_module(key, "decode_head.fpn_bottleneck", "decode_head.fpn_bottleneck")
    if kind == "segformer":
        match = re.match(r"^decode_head\.convs\.(\d+)\.", key)
        if match:
            return _conv_module(key, f"decode_head.convs.{match.group(1)}",
                                f"decode_head.proj.{match.group(1)}")
        return _conv_module(key, "decode_head.fusion_conv", "decode_head.fuse")
    return None


def _head_kind(state: Mapping[str, object]) -> str:
    if "decode_head.fusion_conv.conv.weight" in state:
        return "segformer"
    if any(k.startswith("decode_head.lateral_convs.") for k in state):
        return "uper"
    if any(k.startswith("decode_head.psp_modules.") for k in state):
        return "psp"
    if any(k.startswith("decode_head.aspp_modules.") for k in state):
        return "aspp"
    if any(k.startswith("decode_head.convs.") for k in state):
        return "fcn"
    return "unknown"


def _backbone_kind(state: Mapping[str, object]) -> str:
    if "backbone.layers.0.0.projection.weight" in state:
        return "mit"
    if "backbone.downsample_layers.0.0.weight" in state:
        return "convnext"
    if "backbone.stem.0.weight" in state or "backbone.conv1.weight" in state:
        return "resnet"
    return "unknown"


def convert_mmseg(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an MMSegmentation state dict to segexp keys (see the module docstring for the configs,
    the segexp models they load into and the key layouts).

    Raises ``ConfigError`` listing every key it does not know (an unsupported head or backbone),
    so nothing is dropped silently except ``data_preprocessor.*`` buffers.
    """
    backbone, head = _backbone_kind(state_dict), _head_kind(state_dict)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith("data_preprocessor."):
            continue
        new = None
        if key.startswith("backbone."):
            if backbone == "mit":
                if _mit(key, value, out):
                    continue
            elif backbone == "convnext":
                new = _convnext(key)
            elif backbone == "resnet":
                new = _resnet(key)
        elif key.startswith("decode_head."):
            new = _decode_head(key, head)
        elif key.startswith("auxiliary_head."):
            if key.startswith("auxiliary_head.conv_seg."):
                new = "aux_head.classifier.1." + key[len("auxiliary_head.conv_seg."):]
            else:
                new = _fcn_head(key, "auxiliary_head", "aux_head")
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        shown = first_few(unknown)
        raise ConfigError(
            f"convert_mmseg: keys outside the supported MMSegmentation layouts (backbone read as "
            f"'{backbone}', decode head as '{head}'): {shown}. Supported: ResNetV1c-D8 with "
            "FCNHead / PSPHead / ASPPHead, ConvNeXt with UPerHead, MiT with SegformerHead, each "
            "with at most one FCNHead auxiliary head.")
    if head == "segformer" and "decode_head.fuse.0.weight" in out:
        # MMSeg concatenates the levels shallow first, segexp deepest first: reverse the blocks
        # of the fuse conv's input channels.
        weight = out["decode_head.fuse.0.weight"]
        levels = len({k.split(".")[2] for k in out if k.startswith("decode_head.proj.")})
        out["decode_head.fuse.0.weight"] = torch.cat(weight.chunk(levels, dim=1)[::-1], dim=1)
    return add_missing_bn_counters(out)
