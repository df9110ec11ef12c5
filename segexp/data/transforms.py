"""Joint image/mask transforms that torchvision.transforms.v2 lacks, for use from YAML
(``conf/transforms/``). Everything else in the pipelines is torchvision's own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from segexp.data.base import IGNORE_INDEX


def fill_by_type(image: float = 0, mask: int = IGNORE_INDEX) -> dict:
    """The per-type ``fill`` of v2 padding transforms (``RandomCrop(pad_if_needed=True)``):
    images padded with ``image``, masks with ``mask`` (the ignore index). YAML cannot write the
    ``{tv_tensors.Image: 0, tv_tensors.Mask: 255}`` dict torchvision wants, so configs call this.
    """
    return {tv_tensors.Image: image, tv_tensors.Mask: mask}


class KeepRatioResize(v2.ScaleJitter):
    """Resize so the image fits ``base_size`` ``(h, w)`` keeping its aspect ratio, times a scale
    drawn from ``scale_range``: MMSegmentation's ``RandomResize(scale, ratio_range, keep_ratio)``
    for training (``scale_range=(0.5, 2.0)``) and its ``Resize(keep_ratio)`` for evaluation (the
    default ``(1.0, 1.0)``, which draws no random number). ``base_size=None`` rescales relative to
    the image's own size (and at scale 1 leaves it alone).

    Why not ``v2.ScaleJitter`` directly: its ``target_size`` is ``(width, height)``, unlike every
    other size in torchvision and in segexp configs, so ``${dataset.base_size}`` would be read
    transposed; it cannot express "no base size"; and v2 resizes masks with legacy ``NEAREST``
    (source pixel ``floor(dst * in / out)``), which sits up to half an input pixel off the
    bilinear image. Here masks use ``NEAREST_EXACT`` (pixel centres, like the image), so labels
    stay aligned with the pixels they describe; still nearest-neighbour, no new label values.
    """

    def __init__(self, base_size: Sequence[int] | None = None,
                 scale_range: Sequence[float] = (1.0, 1.0),
                 interpolation: str | v2.InterpolationMode = "bilinear",
                 antialias: bool = True) -> None:
        size = None if base_size is None else (int(base_size[0]), int(base_size[1]))
        low, high = (float(s) for s in scale_range)
        if low <= 0 or high < low:
            raise ValueError(f"scale_range must be 0 < low <= high, got {tuple(scale_range)}")
        super().__init__(target_size=size[::-1] if size else (0, 0), scale_range=(low, high),
                         interpolation=interpolation, antialias=antialias)
        self.base_size = size

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        scale = low if low == high else low + float(torch.rand(1)) * (high - low)
        if self.base_size is not None:
            scale *= min(self.base_size[0] / height, self.base_size[1] / width)
        return {"size": (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))}

    def transform(self, inpt, params: dict):
        if isinstance(inpt, tv_tensors.Mask):
            return v2.functional.resize(inpt, size=params["size"],
                                        interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return super().transform(inpt, params)
