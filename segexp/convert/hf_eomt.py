"""Hugging Face ``transformers`` EoMT weights -> segexp's :class:`~segexp.models.eomt.EoMT`.

Source: the state dict of ``EomtForUniversalSegmentation`` (``tue-mps/ade20k_semantic_eomt_large_512``
and the other ``tue-mps/*_eomt_*`` files: ``model.safetensors``), a DINOv2-with-registers ViT at
patch size 16. Target: ``model=eomt backbone=dinov2_reg_vitl16`` (ViT-L; ``dinov2_reg_vits16`` /
``vitb16`` for smaller ones) with ``backbone.img_size`` the checkpoint's input size (its position
table has ``(img_size / 16) ** 2`` rows: 512 -> 1024) and ``head.num_queries`` its query count::

    embeddings.cls_token / register_tokens           -> backbone.body.cls_token / reg_token
    embeddings.patch_embeddings.projection           -> backbone.body.patch_embed.proj
    embeddings.position_embeddings.weight (P, C)     -> backbone.body.pos_embed (1, P, C)
    layers.{i}.attention.{q,k,v}_proj                -> backbone.body.blocks.{i}.attn.qkv (stacked q, k, v)
    layers.{i}.attention.out_proj                    -> backbone.body.blocks.{i}.attn.proj
    layers.{i}.{norm1,norm2,mlp.fc1,mlp.fc2}         -> backbone.body.blocks.{i}.(same)
    layers.{i}.layer_scale{1,2}.lambda1              -> backbone.body.blocks.{i}.ls{1,2}.gamma
    layernorm                                        -> backbone.body.norm
    query.weight                                     -> decode_head.query.weight
    class_predictor                                  -> decode_head.class_head
    mask_head.fc{1,2,3}                              -> decode_head.mask_head.{0,2,4}
    upscale_block.block.{i}.{conv1,conv2,layernorm2d} -> decode_head.upscale.{i}.{conv1,conv2,norm}

Dropped: ``criterion.empty_weight`` (a loss setting) and ``attn_mask_probs`` (the annealing state:
0 in a trained model, which segexp's evaluation assumes; a file where it is not 0 is reported).
Every module computes the same function (tests/models/test_eomt.py: class and mask logits and the
semantic map within 1e-4 in evaluation, and in training with every attention mask applied).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

from segexp.errors import ConfigError, first_few

log = logging.getLogger(__name__)

_RENAMES = [
    (r"^embeddings\.cls_token$", "backbone.body.cls_token"),
    (r"^embeddings\.register_tokens$", "backbone.body.reg_token"),
    (r"^embeddings\.patch_embeddings\.projection\.", "backbone.body.patch_embed.proj."),
    (r"^layers\.(\d+)\.attention\.out_proj\.", r"backbone.body.blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.", r"backbone.body.blocks.\1.\2."),
    (r"^layers\.(\d+)\.layer_scale([12])\.lambda1$", r"backbone.body.blocks.\1.ls\2.gamma"),
    (r"^layernorm\.", "backbone.body.norm."),
    (r"^query\.weight$", "decode_head.query.weight"),
    (r"^class_predictor\.", "decode_head.class_head."),
    (r"^mask_head\.fc1\.", "decode_head.mask_head.0."),
    (r"^mask_head\.fc2\.", "decode_head.mask_head.2."),
    (r"^mask_head\.fc3\.", "decode_head.mask_head.4."),
    (r"^upscale_block\.block\.(\d+)\.conv([12])\.", r"decode_head.upscale.\1.conv\2."),
    (r"^upscale_block\.block\.(\d+)\.layernorm2d\.", r"decode_head.upscale.\1.norm."),
]
_DROPPED = ("criterion.empty_weight", "attn_mask_probs")
_QKV = re.compile(r"^layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


def looks_like_hf_eomt(state: Mapping[str, object]) -> bool:
    """A transformers ``EomtForUniversalSegmentation`` state dict."""
    return ("query.weight" in state and "class_predictor.weight" in state
            and any(k.startswith("upscale_block.block.") for k in state))


def convert_hf_eomt(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers EoMT state dict to segexp keys (see the module docstring). Raises
    ``ConfigError`` for any key it does not know (e.g. the SwiGLU MLP of the giant models), so
    nothing is dropped silently."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _DROPPED:
            if key == "attn_mask_probs" and bool((value != 0).any()):
                log.warning(f"the EoMT file's attn_mask_probs are {value.tolist()}, not 0: it was "
                            "saved before the masks were annealed away; segexp evaluates it "
                            "without masked attention.")
            continue
        if key == "embeddings.position_embeddings.weight":
            out["backbone.body.pos_embed"] = value[None]
            continue
        match = _QKV.match(key)
        if match:
            block, part, kind = match.groups()
            qkv.setdefault((block, kind), {})[part] = value
            continue
        for pattern, replacement in _RENAMES:
            if re.match(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        shown = first_few(unknown)
        raise ConfigError(f"convert_hf_eomt: keys segexp's EoMT (a timm ViT with an MLP, not "
                          f"SwiGLU) has no place for: {shown}.")
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConfigError(f"convert_hf_eomt: block {block} has attention {kind}s for "
                              f"{sorted(parts)} only; q, k and v are all needed.")
        # timm's fused projection computes q, k, v in this order from one matrix.
        out[f"backbone.body.blocks.{block}.attn.qkv.{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return out
