"""The backbone keys of Hugging Face ``transformers`` segmentation models -> segexp's
:class:`~segexp.backbones.TimmBackbone` (``backbone.body`` + ``backbone.out_norms``), shared by
the MaskFormer and Mask2Former converters. Each function takes a key relative to the backbone
module (after ``model.pixel_level_module.encoder.``) and returns segexp's key, or ``None`` for a
key it does not know.

Swin (transformers' ``SwinBackbone`` under ``swin.`` in transformers 5, at the top in the
transformers-4 files; ``MaskFormerSwinBackbone`` under ``model.``; block names of either
version)::

    embeddings.patch_embeddings.projection / embeddings.norm -> backbone.body.patch_embed.proj / .norm
    encoder.layers.{i}.blocks.{j}.layernorm_before / _after  -> body.layers_{i}.blocks.{j}.norm1 / norm2
        .attention q, k, v projections (concatenated)        -> .attn.qkv
        .attention output projection, relative_position_bias_table -> .attn.proj, .attn.(same)
        .mlp.fc1 / fc2 (intermediate.dense / output.dense)   -> .mlp.fc1 / fc2
    encoder.layers.{i}.downsample                            -> body.layers_{i+1}.downsample
    hidden_states_norms.stage{k} (Mask2Former) / .{k-1} (MaskFormer) -> backbone.out_norms.{k-1}

ResNet (transformers' ``ResNetBackbone``)::

    embedder.embedder.convolution / normalization          -> backbone.body.conv1 / bn1
    encoder.stages.{s}.layers.{b}.shortcut.convolution / normalization -> body.layer{s+1}.{b}.downsample.0 / 1
    encoder.stages.{s}.layers.{b}.layer.{k}.convolution / normalization -> body.layer{s+1}.{b}.conv / bn{k+1}
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from segexp.convert.hf_upernet import add_missing_bn_counters
from segexp.errors import ConfigError, first_few

_SWIN_BLOCK = [  # (theirs after "blocks.{j}.", ours after "blocks.{j}.")
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.o_proj.", "attn.proj."),
    ("attention.output.dense.", "attn.proj."),
    ("attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
]
_QKV = {"attention.q_proj.": 0, "attention.k_proj.": 1, "attention.v_proj.": 2,
        "attention.self.query.": 0, "attention.self.key.": 1, "attention.self.value.": 2}
_SWIN_WRAPPER = re.compile(r"^(swin|model)\.")


def is_swin(keys: Iterable[str], prefix: str) -> bool:
    """Whether the backbone under ``prefix`` is a Swin (it has patch embeddings)."""
    return any(k.startswith(prefix) and "patch_embeddings" in k for k in keys)


def is_resnet(keys: Iterable[str], prefix: str) -> bool:
    """Whether the backbone under ``prefix`` is transformers' ResNet."""
    return any(k.startswith(prefix + "embedder.embedder.") for k in keys)


def swin_final_norm(rest: str) -> bool:
    """The Swin model's last LayerNorm: unused by the segmentation models (they read the
    ``hidden_states_norms`` maps), so the converters drop it."""
    return _SWIN_WRAPPER.sub("", rest).startswith("layernorm.")


def swin_key(rest: str) -> str | None:
    """segexp's key for a Swin parameter other than the q / k / v projections (:func:`swin_qkv`)."""
    rest = _SWIN_WRAPPER.sub("", rest)
    if rest.startswith("embeddings.patch_embeddings.projection."):
        return "backbone.body.patch_embed.proj." + rest.split(".")[-1]
    if rest.startswith("embeddings.norm."):
        return "backbone.body.patch_embed.norm." + rest.split(".")[-1]
    match = re.match(r"^encoder\.layers\.(\d+)\.downsample\.(.+)$", rest)
    if match:
        return f"backbone.body.layers_{int(match.group(1)) + 1}.downsample.{match.group(2)}"
    match = re.match(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", rest)
    if match:
        prefix = f"backbone.body.layers_{match.group(1)}.blocks.{match.group(2)}."
        tail = match.group(3)
        for theirs, ours in _SWIN_BLOCK:
            if tail.startswith(theirs):
                return prefix + ours + tail[len(theirs):]
    match = re.match(r"^hidden_states_norms\.(?:stage(\d+)|(\d+))\.(.+)$", rest)
    if match:
        index = int(match.group(1)) - 1 if match.group(1) else int(match.group(2))
        return f"backbone.out_norms.{index}.{match.group(3)}"
    return None


def swin_qkv(rest: str) -> tuple[str, int] | None:
    """For a Swin block's query, key or value projection: segexp's fused ``attn.qkv`` key and the
    part (0, 1, 2) it fills; ``None`` for any other key."""
    match = re.match(r"^(.*blocks\.\d+\.)(attention\.(?:self\.)?(?:q_proj|k_proj|v_proj|query|key|"
                     r"value)\.)(weight|bias)$", _SWIN_WRAPPER.sub("", rest))
    if not match:
        return None
    ours = swin_key(match.group(1) + "layernorm_before.x")
    if ours is None:
        return None
    return ours.removesuffix("norm1.x") + "attn.qkv." + match.group(3), _QKV[match.group(2)]


def resnet_key(rest: str) -> str | None:
    """segexp's key for a parameter or buffer of transformers' ResNet backbone."""
    match = re.match(r"^embedder\.embedder\.(convolution|normalization)\.(.+)$", rest)
    if match:
        return "backbone.body." + ("conv1." if match.group(1) == "convolution" else "bn1.") \
            + match.group(2)
    match = re.match(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\."
                     r"(convolution|normalization)\.(.+)$", rest)
    if match:
        index = "0" if match.group(3) == "convolution" else "1"
        return (f"backbone.body.layer{int(match.group(1)) + 1}.{match.group(2)}.downsample."
                f"{index}.{match.group(4)}")
    match = re.match(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\."
                     r"(convolution|normalization)\.(.+)$", rest)
    if match:
        kind = "conv" if match.group(4) == "convolution" else "bn"
        return (f"backbone.body.layer{int(match.group(1)) + 1}.{match.group(2)}."
                f"{kind}{int(match.group(3)) + 1}.{match.group(5)}")
    return None


class KeyMap:
    """What a converter collects over a state dict: renamed tensors, q/k/v projections to
    concatenate into one input projection, and the keys that map nowhere (reported together)."""

    def __init__(self) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.qkv: dict[str, list] = {}
        self.unknown: list[str] = []

    def put(self, key: str, new: str | None, value: torch.Tensor) -> None:
        if new is None:
            self.unknown.append(key)
        else:
            self.out[new] = value

    def part(self, target: str, index: int, value: torch.Tensor) -> None:
        """Part ``index`` (0 q, 1 k, 2 v) of ``target``'s stacked projection."""
        self.qkv.setdefault(target, [None] * 3)[index] = value

    def backbone(self, key: str, rest: str, swin: bool, value: torch.Tensor) -> None:
        """A backbone key (``rest``: after the encoder prefix) of a Swin or ResNet encoder."""
        if swin:
            part = swin_qkv(rest)
            if part:
                self.part(*part, value)
                return
            self.put(key, swin_key(rest), value)
        else:
            self.put(key, resnet_key(rest), value)

    def result(self, converter: str, model: str) -> dict[str, torch.Tensor]:
        """The converted state dict; a ConfigError naming the keys that are not ``model``'s."""
        for target, parts in self.qkv.items():
            if any(p is None for p in parts):
                self.unknown.append(f"{target} (incomplete q/k/v)")
            else:
                self.out[target] = torch.cat(parts)
        if self.unknown:
            raise ConfigError(f"{converter}: keys not part of a transformers {model}: "
                              f"{first_few(self.unknown)}.")
        return add_missing_bn_counters(self.out)
