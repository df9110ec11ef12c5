"""Plain Vision Transformers from timm (ViT/DeiT/AugReg, DINOv2, DINOv3) as single-stride feature
extractors.

A plain ViT has no pyramid: every block outputs ``H/p x W/p`` patch tokens of the same width (``p``
= patch size). :class:`ViTBackbone` returns the patch tokens of the blocks in ``out_indices``
reshaped to NCHW (class/register tokens dropped), shallow to deep, all at reduction ``p``. This is
what SETR (several blocks of ViT-L/16), Segmenter (the last block) and the DINOv2 linear heads (the
last four blocks) read.

Any input whose sides are multiples of the patch size works: the model is built with timm's
``dynamic_img_size=True``, so the position embeddings (learnt for ``img_size``) are interpolated to
the input's token grid on every forward pass.

DINOv3 (Siméoni et al. 2025) is built by timm as an ``Eva`` model, not a ``VisionTransformer``: no
absolute position embeddings but rotary ones (RoPE, computed for any token grid), a class token and
4 register tokens, layer scale. Both classes share what this module uses (``patch_embed``,
``blocks``, ``norm``, ``num_prefix_tokens``, ``forward_intermediates``,
``prune_intermediate_layers``), so one wrapper serves both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from segexp.backbones.pretrained import (
    create_timm_model,
    pretrained_mode,
    pretrained_skipped,
)
from segexp.backbones.timm_backbone import create_from_checkpoint
from segexp.errors import ConfigError

log = logging.getLogger(__name__)

FINAL_NORM_MODES = ("none", "last", "all")
# Parameters that sit before the first block: layer id 0 for layer-wise lr decay (BEiT/MMSeg).
_EMBEDDING_PREFIXES = ("cls_token", "reg_token", "mask_token", "dist_token", "pos_embed",
                       "patch_embed", "norm_pre", "rope")
# timm classes of plain ViTs: VisionTransformer (ViT, DeiT, DINOv2) and Eva (EVA-02, DINOv3).
PLAIN_VIT_TYPES = (VisionTransformer, Eva)


def _final_norm_mode(value: bool | str | None) -> str:
    if value is None or value is False:
        return "none"
    if value is True:
        return "last"
    mode = str(value).lower()
    if mode not in FINAL_NORM_MODES:
        raise ConfigError(f"backbone.final_norm={value}: choose none (no final LayerNorm), last "
                          "(on the last block's output, as timm / Segmenter / MMSeg final_norm=True) "
                          "or all (on every returned map, as DINOv2's get_intermediate_layers).")
    return mode


class ViTBackbone(nn.Module):
    """A plain timm ViT (``VisionTransformer``, or ``Eva`` for DINOv3) returning the patch tokens of
    chosen blocks as NCHW maps.

    Args:
        name: timm model name, e.g. ``vit_base_patch16_224``, ``vit_small_patch14_dinov2`` or
            ``vit_small_patch16_dinov3``.
        pretrained: ``"auto"`` (the configs' default: timm's weights from the local cache or the
            hub, else random with a warning), ``True`` (the weights or a ConfigError) or ``False``
            (random); see :mod:`segexp.backbones.pretrained`. ``pretrained_source`` records it.
        checkpoint: local ``.pth``/``.safetensors`` state dict of the same timm model; keys are
            checked strictly (a file that does not fit is refused, never loaded partly).
        out_indices: block indices to return (negative = from the last block), shallow to deep.
            Blocks after the deepest one are removed (they would never be used).
        img_size: the grid the position embeddings are learnt for (``None``: timm's default, e.g.
            224 for ``vit_*_224``, 518 for DINOv2). Inputs of other sizes interpolate them.
        drop_path_rate: stochastic depth of the blocks.
        freeze: ``requires_grad=False`` for every parameter and the module stays in eval mode
            whatever ``train()`` asks (linear probing of DINOv2 features).
        size_divisor: input sides must be multiples of it; ``None`` = the patch size.
        resize_input: accept any input size by resizing it (bilinear) to the nearest multiple
            of the patch size first; the segmentor resizes the logits back. DINOv2's patch of
            14 rarely divides the crop sizes other backbones use (64, 512), so its configs do this.
        final_norm: ``none`` (no final LayerNorm: MMSeg's ViT default, used by SETR whose heads
            normalise their own inputs), ``last`` (the final LayerNorm on the last block's output
            when it is returned: timm's ``forward_features``, Segmenter) or ``all`` (on every
            returned map: DINOv2's ``get_intermediate_layers(norm=True)``, the linear heads' input).
        timm_kwargs: passed to ``timm.create_model`` (e.g. ``attn_drop_rate``).

    Attributes (the backbone contract): ``channels``, ``reductions``, ``size_divisor``, ``name``;
    for layer-wise lr decay ``num_layers`` (= depth + 2, as MMSeg's LayerDecayOptimizerConstructor)
    and ``layer_id(param_name)`` in ``0 .. num_layers - 1``.
    """

    def __init__(self, name: str, pretrained: bool | str = False, checkpoint: str | None = None,
                 out_indices: Sequence[int] = (-1,), img_size: int | Sequence[int] | None = None,
                 drop_path_rate: float = 0.0, freeze: bool = False, size_divisor: int | None = None,
                 final_norm: bool | str = "last", resize_input: bool = False,
                 **timm_kwargs) -> None:
        super().__init__()
        self.name = name
        self.freeze = bool(freeze)
        if not timm.is_model(name):
            raise ConfigError(f"backbone.name={name} is not a timm model. Plain ViTs are named like "
                              "vit_small_patch16_224 or vit_base_patch14_dinov2 "
                              "(timm.list_models('vit_*') lists them).")
        kwargs = dict(num_classes=0, dynamic_img_size=True, **timm_kwargs)
        if img_size is not None:
            kwargs["img_size"] = int(img_size) if isinstance(img_size, int) else tuple(img_size)
        if drop_path_rate:
            kwargs["drop_path_rate"] = float(drop_path_rate)
        mode = pretrained_mode(pretrained)
        if checkpoint:
            # timm drops the classifier and resamples the position embeddings to img_size.
            body, self.pretrained_source = create_from_checkpoint(
                name, checkpoint, kwargs, {k: v for k, v in timm_kwargs.items()
                                           if k not in ("pretrained_cfg_overlay",)})
        else:
            # Frozen: auto's warning says that the random backbone never trains.
            body, self.pretrained_source = create_timm_model(name, mode, kwargs,
                                                             frozen=self.freeze)
        if not isinstance(body, PLAIN_VIT_TYPES):
            raise ConfigError(f"backbone '{name}' is a {type(body).__name__}, not a plain timm "
                              "ViT (VisionTransformer or Eva); use segexp.backbones.TimmBackbone "
                              "for hierarchical models.")
        patch = tuple(body.patch_embed.patch_size)
        if patch[0] != patch[1]:
            raise ConfigError(f"backbone '{name}' has non-square patches {patch}; ViTBackbone "
                              "supports square patches only.")
        self.patch_size = int(patch[0])

        depth = len(body.blocks)
        self.depth = depth  # before pruning: models that run the blocks themselves check it
        self.out_indices = self._resolve_out_indices(out_indices, depth)
        self.final_norm = _final_norm_mode(final_norm)
        # The final LayerNorm only matters if something reads it.
        norm_used = self.final_norm == "all" or (self.final_norm == "last"
                                                 and self.out_indices[-1] == depth - 1)
        self._norm_last = self.final_norm == "last" and norm_used
        # Drop blocks past the deepest tap, the classifier and an unused final norm: no dead
        # parameters (DDP would complain about them, and they would count in the model size).
        body.prune_intermediate_layers(self.out_indices, prune_norm=not norm_used, prune_head=True)
        self.body = body

        self.embed_dim = int(body.embed_dim)
        self.channels: list[int] = [self.embed_dim] * len(self.out_indices)
        self.reductions: list[int] = [self.patch_size] * len(self.out_indices)
        divisor = self.patch_size if size_divisor is None else int(size_divisor)
        if divisor <= 0 or divisor % self.patch_size:
            raise ConfigError(f"backbone.size_divisor={size_divisor} must be a multiple of the "
                              f"patch size {self.patch_size} of '{name}' (null = the patch size).")
        self.resize_input = bool(resize_input)
        self.size_divisor = 1 if self.resize_input else divisor
        # Layer-wise lr decay (BEiT / MMSeg LayerDecayOptimizerConstructor): embeddings 0,
        # block i -> i + 1, everything after the last block -> depth + 1 = num_layers - 1.
        self.num_layers = len(body.blocks) + 2

        if self.freeze:
            for param in self.parameters():
                param.requires_grad_(False)
            # (auto has said so already when it found none)
            if mode == "false" and not checkpoint and not pretrained_skipped():
                log.warning(f"backbone '{name}' is frozen but has random weights "
                            "(pretrained=false, no checkpoint): only the head will learn. Set "
                            "backbone.pretrained=auto or true, or backbone.checkpoint=/path/to/weights.")
            self.train(False)

    @staticmethod
    def _resolve_out_indices(out_indices: Sequence[int] | int, depth: int) -> list[int]:
        raw = [int(out_indices)] if isinstance(out_indices, int) else [int(i) for i in out_indices]
        if not raw:
            raise ConfigError("backbone.out_indices is empty; name at least one block, e.g. [-1].")
        for i in raw:
            if not -depth <= i < depth:
                raise ConfigError(f"backbone.out_indices contains {i}, but the model has {depth} "
                                  f"blocks (indices 0..{depth - 1}, or -{depth}..-1 from the end).")
        return sorted({i % depth for i in raw})

    def train(self, mode: bool = True) -> ViTBackbone:
        # A frozen backbone is a fixed feature extractor: dropout / drop path stay off.
        return super().train(mode and not self.freeze)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` resized to the nearest multiple of the patch size when ``resize_input`` is set;
        an input the patches do not tile is refused."""
        h, w = x.shape[-2:]
        if self.resize_input and (h % self.patch_size or w % self.patch_size):
            p = self.patch_size
            size = (max(p, round(h / p) * p), max(p, round(w / p) * p))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            h, w = size
        if h % self.patch_size or w % self.patch_size:
            raise ConfigError(f"input size {h}x{w} (HxW) is not a multiple of the patch size "
                              f"{self.patch_size} of backbone '{self.name}'.")
        return x

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.prepare_input(x)
        features = self.body.forward_intermediates(
            x, indices=self.out_indices, norm=self.final_norm == "all", output_fmt="NCHW",
            intermediates_only=True)
        if self._norm_last:
            last = features[-1]
            features[-1] = self.body.norm(last.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return list(features)

    def layer_id(self, param_name: str) -> int:
        """Layer index of a parameter for layer-wise lr decay; ``param_name`` is relative to this
        module (``body.blocks.3.attn.qkv.weight``); a leading ``backbone.`` is accepted too."""
        name = param_name.removeprefix("backbone.").removeprefix("body.")
        if name.startswith(_EMBEDDING_PREFIXES):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers - 1
