"""What a mask-classification model (MaskFormer, Mask2Former, EoMT) returns, and how it becomes
per-pixel class scores.

A per-pixel model returns logits ``(N, K, H, W)``. A mask-classification model predicts a set of
``Q`` queries, each a class distribution over ``K + 1`` classes (the last is "no object") and a
mask. In training it returns :class:`MaskPredictions`, which its criterion (Hungarian matching,
see ``conf/loss/mask_classification.yaml``) understands; everywhere else (validation, sliding
window, predict, export) it returns :meth:`MaskPredictions.semantic_logits` at the input
resolution, so metrics and inference treat both kinds alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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
