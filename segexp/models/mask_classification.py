"""What a mask-classification model (MaskFormer, Mask2Former, EoMT) returns, and how it becomes
per-pixel class scores.

A per-pixel model returns logits ``(N, K, H, W)``. A mask-classification model predicts a set of
``Q`` queries, each a class distribution over ``K + 1`` classes (the last is "no object") and a
mask. In training it returns :class:`MaskPredictions`, which its criterion (Hungarian matching,
see ``conf/loss/mask_classification.yaml``) understands; everywhere else (validation, sliding
window, predict, export) it returns :meth:`MaskPredictions.semantic_logits` at the input
resolution, so metrics and inference treat both kinds alike.

Such a head (or model) says so with a class attribute ``mask_classification = True``
(:func:`is_mask_classification`), so a per-pixel loss given to it, or the mask criterion given
to a per-pixel model, is refused before training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def is_mask_classification(model) -> bool:
    """Whether ``model`` (a Segmentor, a bare head, or either wrapped in DistributedDataParallel)
    returns :class:`MaskPredictions` in training: ``mask_classification = True`` on the model or
    on its ``decode_head``."""
    model = getattr(model, "module", model)
    return bool(getattr(model, "mask_classification", False)
                or getattr(getattr(model, "decode_head", None), "mask_classification", False))


@dataclass
class MaskPredictions:
    """Queries' class logits ``(N, Q, K + 1)`` and mask logits ``(N, Q, h, w)`` of the last
    decoder layer; ``aux``: the same pair from every earlier layer, shallow to deep, for deep
    supervision (empty when there is none)."""

    class_logits: torch.Tensor
    mask_logits: torch.Tensor
    aux: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def semantic_logits(self, size: tuple[int, int] | torch.Size,
                        align_corners: bool = False) -> torch.Tensor:
        """Per-pixel class scores ``(N, K, H, W)`` at ``size``: the mask logits are upsampled
        first (bilinear) and then combined, ``sum_q softmax(class)[:K] * sigmoid(mask)``, as
        Mask2Former's semantic inference and transformers' post-processing do."""
        masks = self.mask_logits
        if masks.shape[-2:] != tuple(size):
            masks = F.interpolate(masks, size=tuple(size), mode="bilinear",
                                  align_corners=align_corners)
        classes = self.class_logits.softmax(-1)[..., :-1]
        return torch.einsum("nqk,nqhw->nkhw", classes, masks.sigmoid())
