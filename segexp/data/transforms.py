"""Joint image/mask transforms for the YAML pipelines (``conf/transforms/``).

torchvision.transforms.v2 does most of the work: geometry moves ``tv_tensors.Image`` and
``tv_tensors.Mask`` together (masks nearest-neighbour), photometric ops leave masks alone, and
per-type ``fill`` pads images and masks with different values. What is here is what v2 lacks or
computes differently from MMSegmentation, each class saying why:

- :class:`KeepRatioResize`: MMSeg's ``RandomResize``/``Resize(keep_ratio)`` with ``(h, w)`` sizes.
- :class:`RandomCropCatMax`: MMSeg's ``RandomCrop(cat_max_ratio)`` (v2 crops without looking at
  the mask).
- :class:`PhotoMetricDistortion`: MMSeg's photometric distortion, its own arithmetic (additive
  brightness, OpenCV uint8 HSV saturation/hue) and its order; contrast is v2's own kernel.

Used as is from torchvision (see ``conf/transforms/strong.yaml``): ``v2.RandomRotation`` under
``v2.RandomApply`` (MMSeg's ``RandomRotate(prob, degree)``: v2 rotates masks with ``NEAREST``
whatever the image interpolation, and ``fill_by_type`` fills images 0 / masks 255), and
``v2.GaussianBlur`` under ``v2.RandomApply`` (no kernel is registered for masks, so v2 passes
them through unchanged).

Every random choice is drawn from torch's global RNG (``torch.rand``/``torch.randint``), which
:meth:`segexp.data.base.SegmentationDataset.__getitem__` seeds per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
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


def _size_pair(size: int | Sequence[int], name: str = "size") -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or any(int(s) <= 0 for s in size):
        raise ValueError(f"{name} must be a positive int or (height, width), got {size}")
    return int(size[0]), int(size[1])


class RandomCropCatMax(v2.Transform):
    """MMSegmentation's ``RandomCrop(crop_size, cat_max_ratio)``: a random ``size`` ``(h, w)``
    crop, redrawn up to ``max_tries`` (10) times until no single class (``ignore_index`` not
    counted) covers ``cat_max_ratio`` or more of the crop's labelled pixels and more than one
    class is present; after ``max_tries`` rejections one more crop is drawn and kept unchecked,
    exactly as MMSeg does. ``cat_max_ratio >= 1`` (or no mask in the input) is a plain random
    crop.

    Where the image is smaller than ``size`` the crop takes the whole side and, with
    ``pad_if_needed``, pads at the bottom/right (where MMSeg's ``Pad``/data preprocessor pads)
    with ``fill`` for images and ``mask_fill`` (default ``ignore_index``) for masks, so padding is
    never learnt.

    Why not ``v2.RandomCrop``: its crop position cannot depend on the mask's content.
    """

    def __init__(self, size: int | Sequence[int], cat_max_ratio: float = 0.75,
                 ignore_index: int = IGNORE_INDEX, max_tries: int = 10, pad_if_needed: bool = True,
                 fill: float | Sequence[float] = 0, mask_fill: int | None = None) -> None:
        super().__init__()
        self.size = _size_pair(size)
        if not 0 < cat_max_ratio:
            raise ValueError(f"cat_max_ratio must be > 0, got {cat_max_ratio}")
        if max_tries < 0:
            raise ValueError(f"max_tries must be >= 0, got {max_tries}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_tries = int(max_tries)
        self.pad_if_needed = bool(pad_if_needed)
        self.fill = fill
        self.mask_fill = self.ignore_index if mask_fill is None else int(mask_fill)

    def _random_offset(self, height: int, width: int) -> tuple[int, int]:
        """One candidate's top-left corner, uniform over the valid positions (MMSeg's
        ``generate_crop_bbox``)."""
        top = int(torch.randint(0, max(height - self.size[0], 0) + 1, ()))
        left = int(torch.randint(0, max(width - self.size[1], 0) + 1, ()))
        return top, left

    def acceptable(self, crop: torch.Tensor) -> bool:
        """MMSeg's test: more than one class and the largest under ``cat_max_ratio``."""
        labels = crop.reshape(-1).long()
        labels = labels[labels != self.ignore_index]
        if labels.numel() == 0:
            return False
        if int(labels.min()) >= 0:
            counts = torch.bincount(labels)
            counts = counts[counts > 0]
        else:
            counts = torch.unique(labels, return_counts=True)[1]
        return counts.numel() > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = self.size
        top, left = self._random_offset(height, width)
        masks = [inpt for inpt in flat_inputs if isinstance(inpt, tv_tensors.Mask)]
        if self.cat_max_ratio < 1.0 and masks:
            mask = masks[0]
            for _ in range(self.max_tries):
                if self.acceptable(mask[..., top: top + crop_h, left: left + crop_w]):
                    break
                top, left = self._random_offset(height, width)
        out_h, out_w = min(crop_h, height - top), min(crop_w, width - left)
        pad = self.pad_if_needed and (out_h < crop_h or out_w < crop_w)
        return {"top": top, "left": left, "height": out_h, "width": out_w,
                "padding": [0, 0, crop_w - out_w, crop_h - out_h] if pad else None}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = v2.functional.crop(inpt, params["top"], params["left"], params["height"],
                                 params["width"])
        if params["padding"] is not None:
            fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.fill
            out = v2.functional.pad(out, params["padding"], fill=fill)
        return out


def _is_pure_tensor(inpt: Any) -> bool:
    return isinstance(inpt, torch.Tensor) and not isinstance(inpt, tv_tensors.TVTensor)


def add_brightness_delta(image: torch.Tensor, delta: float) -> torch.Tensor:
    """MMSeg's brightness on ``uint8``: ``clip(float32(image) + delta, 0, 255)`` truncated back
    to ``uint8`` (``astype``: 110.7 -> 110). v2's ``adjust_brightness`` multiplies instead."""
    return (image.float() + delta).clamp_(0, 255).to(torch.uint8)


def _hsv_round_trip(image: torch.Tensor, channel: int, edit) -> torch.Tensor:
    """``image`` (``...x3xHxW`` RGB ``uint8``) to OpenCV's 8-bit HSV (H in 0..179, S and V in
    0..255), ``edit`` applied to one HSV channel, back to RGB: ``mmcv.bgr2hsv``/``hsv2bgr`` on
    our RGB channel order (RGB2HSV of RGB gives BGR2HSV of BGR exactly)."""
    if image.shape[-3] != 3:
        raise ValueError(f"saturation/hue need 3-channel RGB images, got {image.shape[-3]} channels")
    flat = image.reshape(-1, *image.shape[-3:]).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(flat)
    for i, rgb in enumerate(flat):
        hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
        hsv[..., channel] = edit(hsv[..., channel])
        out[i] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return torch.from_numpy(out).permute(0, 3, 1, 2).reshape(image.shape).to(image.device)


class PhotoMetricDistortion(v2.Transform):
    """MMSegmentation's ``PhotoMetricDistortion`` on ``uint8`` images (masks and anything else
    that is not an image pass through untouched). In MMSeg's order, each step with probability
    0.5: brightness (add a delta uniform in ``+-brightness_delta``), contrast (multiply by a factor
    uniform in ``contrast_range``) either here or last (a fair coin, MMSeg's ``mode``),
    saturation (multiply OpenCV's 8-bit HSV S channel by a factor in ``saturation_range``), hue
    (add an integer delta in ``[-hue_delta, hue_delta)`` to OpenCV's 0..179 H channel, modulo
    180; the exclusive upper end is numpy's ``randint``, as MMSeg draws it). Every step computes
    in float32, clips to 0..255 and truncates to ``uint8``, like MMSeg's ``convert``.

    Whose arithmetic: MMSeg's "contrast" is a plain gain ``x * alpha`` (no blend with the mean),
    which is exactly v2's ``adjust_brightness`` kernel (float32 product, clamp, truncate): that is
    used. The others are ours because v2 computes something else: v2's brightness multiplies
    (MMSeg adds a delta); v2's ``adjust_saturation`` blends with the grey image (changing V; MMSeg
    scales S only); v2's ``adjust_hue`` shifts hue in float HSV while MMSeg round-trips through
    OpenCV's quantised 8-bit HSV (2-degree hue steps), once for saturation and again for hue.
    ``cv2.cvtColor`` does those conversions, exactly as ``mmcv.bgr2hsv``/``hsv2bgr`` do.
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Video, _is_pure_tensor)

    def __init__(self, brightness_delta: float = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18) -> None:
        super().__init__()
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)
        if self.brightness_delta < 0 or self.hue_delta < 0:
            raise ValueError("brightness_delta and hue_delta must be >= 0")
        for name, (low, high) in (("contrast_range", self.contrast_range),
                                  ("saturation_range", self.saturation_range)):
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be 0 <= low <= high, got {(low, high)}")

    @staticmethod
    def _coin() -> bool:
        return bool(torch.randint(0, 2, ()))

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + float(torch.rand(())) * (high - low)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """``None`` for a step that is skipped; ``contrast_first`` is MMSeg's ``mode == 1``."""
        brightness = (self._uniform(-self.brightness_delta, self.brightness_delta)
                      if self._coin() else None)
        contrast_first = self._coin()
        contrast = self._uniform(*self.contrast_range) if self._coin() else None
        saturation = self._uniform(*self.saturation_range) if self._coin() else None
        hue = None
        if self._coin():
            hue = int(torch.randint(-self.hue_delta, self.hue_delta, ())) if self.hue_delta else 0
        return {"brightness": brightness, "contrast_first": contrast_first, "contrast": contrast,
                "saturation": saturation, "hue": hue}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if inpt.dtype != torch.uint8:
            raise TypeError(f"PhotoMetricDistortion works on uint8 images (MMSeg's 0..255 "
                            f"arithmetic), got {inpt.dtype}: put it before ToDtype/Normalize.")
        image = inpt.as_subclass(torch.Tensor)
        if params["brightness"] is not None:
            image = add_brightness_delta(image, params["brightness"])
        if params["contrast"] is not None and params["contrast_first"]:
            image = v2.functional.adjust_brightness(image, params["contrast"])
        if params["saturation"] is not None:
            alpha = params["saturation"]
            image = _hsv_round_trip(image, 1, lambda s: np.clip(
                s.astype(np.float32) * np.float32(alpha), 0, 255).astype(np.uint8))
        if params["hue"] is not None:
            delta = params["hue"]
            image = _hsv_round_trip(image, 0, lambda h: ((h.astype(int) + delta) % 180).astype(np.uint8))
        if params["contrast"] is not None and not params["contrast_first"]:
            image = v2.functional.adjust_brightness(image, params["contrast"])
        return tv_tensors.wrap(image, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else image
