"""torchvision's FCN and DeepLabV3 (ResNet-50/101) state dicts -> segexp's layout.

Target models: ``model=fcn_torchvision`` / ``model=deeplabv3_torchvision`` with
``backbone=resnet50_d8`` (or ``resnet101_d8``): timm's dilated ResNet names its layers as
torchvision does, and the heads are configured to torchvision's widths (conf/head/*_torchvision).
"""

from __future__ import annotations

import torch

# torchvision's ASPP concatenates [1x1, atrous x3, pooling]; segexp's concatenates
# [pooling, 1x1, atrous x3]: the projection's input channels are permuted to match.
_TV_ASPP_ORDER_IN_SEGEXP = [4, 0, 1, 2, 3]

_CONV_BN = {"0": "0", "1": "1"}  # conv, batch norm inside a ConvBNReLU / torchvision Sequential


def _fcn_head(prefix_tv: str, prefix_ours: str, state: dict, out: dict) -> None:
    """torchvision FCNHead (conv, bn, relu, dropout, conv) -> FCNHead(num_convs=1)."""
    for key, value in state.items():
        if not key.startswith(prefix_tv + "."):
            continue
        index, rest = key[len(prefix_tv) + 1:].split(".", 1)
        if index in _CONV_BN:
            out[f"{prefix_ours}.convs.0.{index}.{rest}"] = value
        elif index == "4":
            out[f"{prefix_ours}.classifier.1.{rest}"] = value


def _deeplab_head(state: dict, out: dict) -> None:
    """torchvision DeepLabHead (ASPP, conv, bn, relu, conv) -> ASPPHead(project_channels=...)."""
    for key, value in state.items():
        if not key.startswith("classifier."):
            continue
        parts = key.split(".")
        if parts[1] == "0" and parts[2] == "convs":  # ASPP branches
            branch, rest = int(parts[3]), parts[4:]
            if branch == 0:
                out["decode_head.aspp.branches.0." + ".".join(rest)] = value
            elif branch in (1, 2, 3):
                out[f"decode_head.aspp.branches.{branch}." + ".".join(rest)] = value
            else:  # pooling: AdaptiveAvgPool (no params) is index 0, then conv, bn
                index = str(int(rest[0]) - 1)
                out["decode_head.aspp.image_pool.1." + ".".join([index, *rest[1:]])] = value
        elif parts[1] == "0" and parts[2] == "project":
            index, rest = parts[3], parts[4:]
            if index == "0":  # conv: permute the concatenated input blocks
                blocks = value.chunk(5, dim=1)
                value = torch.cat([blocks[i] for i in _TV_ASPP_ORDER_IN_SEGEXP], dim=1)
            out["decode_head.aspp.project.0." + ".".join([index, *rest])] = value
        elif parts[1] in ("1", "2"):  # 3x3 conv + bn -> the bottleneck ConvBNReLU
            out["decode_head.aspp.bottleneck." + ".".join([str(int(parts[1]) - 1), *parts[2:]])] = value
        elif parts[1] == "4":
            out["decode_head.classifier.1." + ".".join(parts[2:])] = value


def convert_torchvision(state: dict) -> dict:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            out["backbone.body." + key[len("backbone."):]] = value
    if any(k.startswith("classifier.0.convs.") for k in state):
        _deeplab_head(state, out)
    else:
        _fcn_head("classifier", "decode_head", state, out)
    _fcn_head("aux_classifier", "aux_head", state, out)
    return out


def looks_like_torchvision(state: dict) -> bool:
    return "backbone.conv1.weight" in state and any(k.startswith("classifier.") for k in state)
