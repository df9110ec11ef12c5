"""Hugging Face ``transformers`` SegFormer weights -> segexp's SegFormer (MiT + SegFormerHead).

Accepts the state dict of ``SegformerForSemanticSegmentation`` (``segformer.*`` +
``decode_head.*``), ``SegformerModel`` (encoder keys without the ``segformer.`` prefix) or
``SegformerForImageClassification`` (the ``nvidia/mit-b0`` ... ``nvidia/mit-b5`` ImageNet encoders;
their ``classifier.*`` ImageNet head is dropped), in either key layout:

* the files on the Hub (``encoder.block.{i}.{j}.attention.self.query`` ...,
  ``decode_head.linear_c.{i}``), and
* the in-memory layout of recent transformers releases (``stages.{i}.blocks.{j}.attention.q_proj``
  ..., ``decode_head.linear_projections.{i}``).

Result keys are those of ``segexp.models.Segmentor`` with ``backbone=mit_*`` and ``model=segformer``:
``backbone.stages.{i}...`` and ``decode_head.{proj,fuse,classifier}...``. The decoder's per-level
``nn.Linear`` weights become 1x1 conv weights. Both implementations concatenate the upsampled
levels deepest first, so the fuse conv's weight is copied unchanged.

Usage::

    from safetensors.torch import load_file
    model.load_state_dict(convert_hf_segformer(load_file("model.safetensors")))
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from segexp.errors import ConfigError, first_few

# Encoder structure: (pattern on the key without "segformer.", replacement prefix). Both layouts.
_OUTER = [
    (r"^encoder\.patch_embeddings\.(\d+)\.proj\.", r"backbone.stages.\1.patch_embed.proj."),
    (r"^encoder\.patch_embeddings\.(\d+)\.layer_norm\.", r"backbone.stages.\1.patch_embed.norm."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.", r"backbone.stages.\1.blocks.\2."),
    (r"^encoder\.layer_norm\.(\d+)\.", r"backbone.stages.\1.norm."),
    (r"^stages\.(\d+)\.patch_embeddings\.proj\.", r"backbone.stages.\1.patch_embed.proj."),
    (r"^stages\.(\d+)\.patch_embeddings\.layer_norm\.", r"backbone.stages.\1.patch_embed.norm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"backbone.stages.\1.blocks.\2."),
    (r"^stages\.(\d+)\.layer_norm\.", r"backbone.stages.\1.norm."),
]
# Inside a transformer block (the part after "backbone.stages.{i}.blocks.{j}.").
_BLOCK = {
    "layer_norm_1.": "norm1.", "layernorm_before.": "norm1.",
    "layer_norm_2.": "norm2.", "layernorm_after.": "norm2.",
    "attention.self.query.": "attn.q.", "attention.q_proj.": "attn.q.",
    "attention.self.key.": "attn.k.", "attention.k_proj.": "attn.k.",
    "attention.self.value.": "attn.v.", "attention.v_proj.": "attn.v.",
    "attention.output.dense.": "attn.proj.", "attention.o_proj.": "attn.proj.",
    "attention.self.sr.": "attn.sr.",
    "attention.sequence_reduction.sequence_reduction.": "attn.sr.",
    "attention.self.layer_norm.": "attn.sr_norm.",
    "attention.sequence_reduction.layer_norm.": "attn.sr_norm.",
    "mlp.dense1.": "mlp.fc1.", "mlp.fc1.": "mlp.fc1.",
    "mlp.dwconv.dwconv.": "mlp.dwconv.",
    "mlp.dense2.": "mlp.fc2.", "mlp.fc2.": "mlp.fc2.",
}
_HEAD = [
    (r"^decode_head\.(?:linear_c|linear_projections)\.(\d+)\.proj\.", r"decode_head.proj.\1."),
    (r"^decode_head\.linear_fuse\.", "decode_head.fuse.0."),
    (r"^decode_head\.batch_norm\.", "decode_head.fuse.1."),
    (r"^decode_head\.classifier\.", "decode_head.classifier.1."),
]
_BLOCK_PREFIX = re.compile(r"^backbone\.stages\.\d+\.blocks\.\d+\.")


def is_hf_segformer(state: Mapping[str, object]) -> bool:
    """Whether ``state`` looks like a transformers SegFormer/MiT state dict (either layout)."""
    return any(re.match(r"^(segformer\.)?(encoder\.(block|patch_embeddings)\.|"
                        r"stages\.\d+\.patch_embeddings\.)", k) for k in state)


def _convert_key(key: str) -> str | None:
    for pattern, replacement in _HEAD:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    key = key.removeprefix("segformer.")
    for pattern, replacement in _OUTER:
        if re.match(pattern, key):
            new = re.sub(pattern, replacement, key)
            prefix = _BLOCK_PREFIX.match(new)
            if prefix is None:
                return new
            rest = new[prefix.end():]
            for old, ours in _BLOCK.items():
                if rest.startswith(old):
                    return prefix.group(0) + ours + rest[len(old):]
            return None
    return None


def convert_hf_segformer(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers SegFormer state dict to segexp keys (see the module docstring).

    Raises ``ConfigError`` listing any key it does not know, so nothing is silently dropped
    except the ImageNet classifier (``classifier.*``) of the ``nvidia/mit-b*`` encoders.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith("classifier."):  # SegformerForImageClassification's ImageNet head
            continue
        new = _convert_key(key)
        if new is None:
            unknown.append(key)
            continue
        if new.startswith("decode_head.proj.") and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # nn.Linear (out, in) -> 1x1 conv (out, in, 1, 1)
        out[new] = value
    if unknown:
        shown = first_few(unknown)
        raise ConfigError(f"convert_hf_segformer: keys not part of a transformers SegFormer: "
                          f"{shown}.")
    return out
