"""The one model interface: backbone -> decode head (+ optional auxiliary head) -> logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from segexp.errors import ConfigError, IncompatibleBackboneError
from segexp.models.mask_classification import MaskPredictions

HeadFactory = Callable[..., nn.Module]


class InputSizeCheck:
    """What every segexp model offers the training and evaluation code about input sizes: the
    backbone's ``size_divisor`` and a clear error for a size it cannot take."""

    @property
    def size_divisor(self) -> int:
        return getattr(self.backbone, "size_divisor", 1)

    def check_input_size(self, height: int, width: int) -> None:
        d = self.size_divisor
        if height % d or width % d:
            name = getattr(self.backbone, "name", type(self.backbone).__name__)
            raise ConfigError(
                f"input size {height}x{width} (HxW) is not a multiple of {d}, which backbone "
                f"'{name}' needs. Use a crop size (dataset.crop_size) that divides by {d}; "
                f"evaluation pads images to a multiple of {d} by itself.")


class Segmentor(InputSizeCheck, nn.Module):
    """Encoder-decoder segmentation model.

    ``decode_head`` and ``aux_head`` are head *factories* (Hydra ``_partial_`` configs): the
    segmentor builds them with the backbone's ``channels`` and ``reductions``, so channel counts
    are never written twice. An optional ``neck`` factory (e.g. FastFCN's JPU) is built the same
    way and sits between them, exposing its own ``channels`` and ``reductions`` to the heads.
    ``forward`` returns logits at the input resolution. ``checkpoint`` loads whole-model
    weights (see :mod:`segexp.models.weights`).
    """

    def __init__(self, backbone: nn.Module, decode_head: HeadFactory, num_classes: int,
                 aux_head: HeadFactory | None = None, aux_weight: float = 0.4,
                 align_corners: bool = False, neck: HeadFactory | None = None,
                 checkpoint: str | None = None, checkpoint_format: str = "auto",
                 reinit_classifier: bool = False) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes}: a segmentation model needs at least 2 "
                              "classes (a binary task is background + foreground = 2).")
        self.backbone = backbone
        self.num_classes = num_classes
        self.aux_weight = aux_weight
        self.align_corners = align_corners
        self.neck = neck(in_channels=backbone.channels, in_reductions=backbone.reductions) \
            if neck else None
        self.decode_head = self._build_head(decode_head, "decode head")
        self.aux_head = self._build_head(aux_head, "auxiliary head") if aux_head else None
        if checkpoint:  # whole-model weights (segexp's own or a converted public layout)
            from segexp.models.weights import load_weights

            load_weights(self, checkpoint, checkpoint_format, reinit_classifier, num_classes)

    @property
    def feature_source(self) -> nn.Module:
        """What the heads read: the neck when there is one, else the backbone."""
        return self.neck if self.neck is not None else self.backbone

    def _build_head(self, factory: HeadFactory, role: str) -> nn.Module:
        try:
            return factory(in_channels=self.feature_source.channels,
                           in_reductions=self.feature_source.reductions,
                           num_classes=self.num_classes)
        except IncompatibleBackboneError as err:
            name = getattr(self.backbone, "name", type(self.backbone).__name__)
            raise IncompatibleBackboneError(
                f"the {role} cannot take backbone '{name}' (feature maps with channels "
                f"{self.feature_source.channels} at strides {self.feature_source.reductions}): {err} "
                "Choose another backbone= or head=.") from err

    def forward(self, images: torch.Tensor, return_aux: bool = False):
        """Logits ``(N, num_classes, H, W)``; with ``return_aux`` also the auxiliary logits
        (``None`` when the model has no auxiliary head). A mask-classification head (one that
        returns :class:`MaskPredictions`) gives its predictions whole with ``return_aux`` (what
        its criterion reads) and per-pixel class scores at the input resolution otherwise."""
        self.check_input_size(images.shape[-2], images.shape[-1])
        features = self.backbone(images)
        if self.neck is not None:
            features = self.neck(features)
        out = self.decode_head(features)
        if isinstance(out, MaskPredictions):
            if return_aux:
                return out
            return out.semantic_logits(images.shape[-2:], self.align_corners)
        logits = self._resize(out, images)
        if not return_aux:
            return logits
        aux = self._resize(self.aux_head(features), images) if self.aux_head is not None else None
        return logits, aux

    def _resize(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] == images.shape[-2:]:
            return logits
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                             align_corners=self.align_corners)
