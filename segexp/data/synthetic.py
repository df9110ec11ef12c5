"""Procedurally generated shape scenes: the default dataset, no files, trains on CPU in minutes.

Each image is a textured background (class 0) with a few shapes drawn on top. Every shape class
has its own outline *and* its own texture/colour character, so both shape and appearance carry the
label; colours and textures vary randomly around the class's character, shapes vary in count,
size, position and rotation, and later shapes occlude earlier ones. The mask is exact: it is drawn
with the same (non-antialiased) OpenCV rasterisation that decides which pixels get the texture.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from segexp.data.base import IGNORE_INDEX, Sample, SegmentationDataset
from segexp.errors import ConfigError


@dataclass(frozen=True)
class _Look:
    """A class's appearance: hue centre/spread (OpenCV hue 0..180), texture kind, saturation and
    value ranges (0..255) for the two colours the texture blends between."""

    hue: float
    hue_spread: float
    texture: str
    saturation: tuple[int, int] = (150, 255)
    value: tuple[int, int] = (140, 255)


ALL_CLASS_NAMES = ("background", "circle", "rectangle", "triangle", "ellipse", "star", "cross",
                   "ring")

_LOOKS = (
    _Look(hue=0, hue_spread=90, texture="blobs", saturation=(0, 70), value=(50, 190)),
    _Look(hue=0, hue_spread=8, texture="stripes"),        # circle: red stripes
    _Look(hue=112, hue_spread=8, texture="checker"),      # rectangle: blue checkerboard
    _Look(hue=60, hue_spread=8, texture="speckle"),       # triangle: green speckle
    _Look(hue=27, hue_spread=5, texture="waves"),         # ellipse: yellow smooth waves
    _Look(hue=150, hue_spread=8, texture="dots"),         # star: magenta dots
    _Look(hue=88, hue_spread=6, texture="grid"),          # cross: cyan grid lines
    _Look(hue=14, hue_spread=4, texture="rings", saturation=(120, 220)),  # ring: orange rings
)

_PALETTE = (
    (40, 40, 40), (220, 50, 50), (50, 90, 230), (60, 190, 70),
    (235, 215, 50), (200, 60, 200), (60, 210, 210), (245, 140, 30),
)


class SyntheticDataset(SegmentationDataset):
    """Generated on the fly: sample ``index`` of ``split`` is a pure function of
    ``(seed, split, index)`` (same seed, same pixels; other splits, other images).

    ``num_classes`` (2..8) keeps the first classes of ``background, circle, rectangle, triangle,
    ellipse, star, cross, ring``. ``train_length`` / ``val_length`` set the split sizes (``test``
    uses ``val_length``); ``min_shapes``..``max_shapes`` shapes per image, each of radius
    ``shape_size`` (fractions of ``image_size``); ``noise`` is the std of per-pixel Gaussian noise
    and ``illumination`` the strength of a random brightness gradient (0..255 scale).
    ``crop_size`` / ``base_size`` default to the image size, so training crops are whole images
    at scale 1.
    """

    palette = _PALETTE

    def __init__(self, split: str = "train", transforms=None, ignore_index: int = IGNORE_INDEX,
                 num_classes: int | None = 6, crop_size: Sequence[int] | None = None,
                 base_size: Sequence[int] | None = None, image_size: int = 128,
                 train_length: int = 512, val_length: int = 96, seed: int = 0,
                 min_shapes: int = 2, max_shapes: int = 6,
                 shape_size: Sequence[float] = (0.08, 0.3), noise: float = 6.0,
                 illumination: float = 25.0) -> None:
        super().__init__(split=split, transforms=transforms, ignore_index=ignore_index,
                         num_classes=num_classes)
        count = 6 if num_classes is None else int(num_classes)
        if not 2 <= count <= len(ALL_CLASS_NAMES):
            raise ConfigError(f"dataset.num_classes={num_classes}: the synthetic dataset has 2 to "
                              f"{len(ALL_CLASS_NAMES)} classes ({', '.join(ALL_CLASS_NAMES)}).")
        if split not in ("train", "val", "test"):
            raise ConfigError(
                f"unknown split {split!r} for the synthetic dataset: use train, val or test.")
        if int(image_size) < 16:
            raise ConfigError(f"dataset.image_size={image_size} is too small; use 16 or more.")
        if not 0 <= int(min_shapes) <= int(max_shapes):
            raise ConfigError(f"need 0 <= dataset.min_shapes <= dataset.max_shapes, got "
                              f"{min_shapes} and {max_shapes}.")
        if not 0 < float(shape_size[0]) <= float(shape_size[1]):
            raise ConfigError(f"dataset.shape_size must be [low, high] with 0 < low <= high, got "
                              f"{list(shape_size)}.")
        self.class_names = ALL_CLASS_NAMES[:count]
        self.palette = _PALETTE[:count]
        self.image_size = int(image_size)
        self.crop_size = tuple(crop_size) if crop_size is not None else (self.image_size,) * 2
        self.base_size = tuple(base_size) if base_size is not None else (self.image_size,) * 2
        self.length = int(train_length if split == "train" else val_length)
        self.seed = int(seed)
        self.min_shapes, self.max_shapes = int(min_shapes), int(max_shapes)
        self.shape_size = (float(shape_size[0]), float(shape_size[1]))
        self.noise = float(noise)
        self.illumination = float(illumination)
        self._split_code = zlib.crc32(split.encode())
        n = self.image_size
        self._ys, self._xs = np.mgrid[0:n, 0:n].astype(np.float32)
        self.check_num_classes()

    def __len__(self) -> int:
        return self.length

    def files(self) -> list[Path]:
        return []  # generated: the parameters alone determine every sample

    def load(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        rng = np.random.default_rng([self.seed, self._split_code, index])
        n = self.image_size
        image = self._texture(rng, 0, (n / 2, n / 2))
        mask = np.zeros((n, n), np.uint8)
        canvas = np.zeros((n, n), np.uint8)
        for _ in range(int(rng.integers(self.min_shapes, self.max_shapes + 1))):
            cls = int(rng.integers(1, self.num_classes))
            centre = rng.uniform(-0.05 * n, 1.05 * n, size=2)
            radius = rng.uniform(*self.shape_size) * n
            canvas[:] = 0
            _draw(canvas, ALL_CLASS_NAMES[cls], centre, radius, rng)
            inside = canvas.astype(bool)
            image[inside] = self._texture(rng, cls, centre)[inside]
            mask[inside] = cls
        # Sensor-like noise and a soft illumination gradient, so colour alone is not exact.
        slope = rng.uniform(-1, 1, size=2) * self.illumination
        gradient = (slope[0] * (self._xs / n - 0.5) + slope[1] * (self._ys / n - 0.5))[..., None]
        image = image + gradient + rng.normal(0.0, self.noise, size=image.shape).astype(np.float32)
        image = np.clip(image, 0, 255).astype(np.uint8)
        return Sample(image=image, mask=mask, source=f"synthetic/{self.split}/{index}")

    # -- generation -------------------------------------------------------------------------
    def _texture(self, rng: np.random.Generator, cls: int, centre) -> np.ndarray:
        """A full-size ``float32 HxWx3`` texture in the class's character (cheap at these sizes)."""
        look = _LOOKS[cls]
        n, xs, ys = self.image_size, self._xs, self._ys
        kind = look.texture
        angle = rng.uniform(0, np.pi)
        u = xs * np.cos(angle) + ys * np.sin(angle)
        v = -xs * np.sin(angle) + ys * np.cos(angle)
        period = rng.uniform(4.0, 9.0)
        if kind == "blobs":  # smooth low-frequency noise
            low = rng.random((4 + n // 32, 4 + n // 32)).astype(np.float32)
            t = cv2.resize(low, (n, n), interpolation=cv2.INTER_CUBIC)
        elif kind == "stripes":
            t = (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
        elif kind == "checker":
            t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
        elif kind == "speckle":
            t = rng.random((n, n), dtype=np.float32)
        elif kind == "waves":
            wobble = 2.0 * np.sin(2 * np.pi * v / (3 * period))
            t = 0.5 + 0.5 * np.sin(2 * np.pi * u / (2 * period) + wobble)
        elif kind == "dots":
            cell = period + 2
            du = (u % cell) - cell / 2
            dv = (v % cell) - cell / 2
            t = (du * du + dv * dv < (cell * 0.3) ** 2).astype(np.float32)
        elif kind == "grid":
            cell = period + 3
            t = (((u % cell) < 2) | ((v % cell) < 2)).astype(np.float32)
        elif kind == "rings":
            r = np.hypot(xs - centre[0], ys - centre[1])
            t = 0.5 + 0.5 * np.sin(2 * np.pi * r / period)
        else:  # pragma: no cover - the table above lists every kind
            raise AssertionError(kind)
        hue = (look.hue + rng.uniform(-look.hue_spread, look.hue_spread)) % 180
        hue2 = (hue + rng.uniform(-4, 4)) % 180
        s_lo, s_hi = look.saturation
        v_lo, v_hi = look.value
        # The two colours differ clearly in value so the texture shows.
        value_a = rng.uniform(v_lo, v_hi)
        step = rng.uniform(50, 100)
        value_b = value_a - step if value_a - step >= 30 else min(255.0, value_a + step)
        hsv = np.array([[[hue, rng.uniform(s_lo, s_hi), value_a],
                         [hue2, rng.uniform(s_lo, s_hi), value_b]]])
        colours = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)[0]
        colours = colours.astype(np.float32)
        return colours[0] + t[..., None] * (colours[1] - colours[0])


def _draw(canvas: np.ndarray, shape: str, centre, radius: float, rng: np.random.Generator) -> None:
    """Rasterise one filled shape with value 1 (no antialiasing: the mask is exact)."""
    cx, cy = float(centre[0]), float(centre[1])
    angle = rng.uniform(0, 2 * np.pi)

    def polygon(angles, radii):
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)

    if shape == "circle":
        cv2.circle(canvas, (round(cx), round(cy)), max(2, round(radius)), 1, -1)
    elif shape == "rectangle":
        w, h = radius * rng.uniform(1.2, 2.0), radius * rng.uniform(1.2, 2.0)
        box = cv2.boxPoints(((cx, cy), (w, h), np.degrees(angle)))
        cv2.fillPoly(canvas, [np.round(box).astype(np.int32)], 1)
    elif shape == "triangle":
        angles = angle + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)
        polygon(angles, radius * rng.uniform(0.9, 1.2, 3))
    elif shape == "ellipse":
        axes = (max(2, round(radius * 1.1)), max(1, round(radius * rng.uniform(0.35, 0.6))))
        cv2.ellipse(canvas, (round(cx), round(cy)), axes, np.degrees(angle), 0, 360, 1, -1)
    elif shape == "star":
        angles = angle + np.arange(10) * np.pi / 5
        polygon(angles, np.where(np.arange(10) % 2 == 0, radius * 1.1, radius * 0.45))
    elif shape == "cross":
        for turn in (0.0, 90.0):
            box = cv2.boxPoints(((cx, cy), (2.0 * radius, 0.6 * radius), np.degrees(angle) + turn))
            cv2.fillPoly(canvas, [np.round(box).astype(np.int32)], 1)
    elif shape == "ring":
        outer = max(3, round(radius))
        cv2.circle(canvas, (round(cx), round(cy)), outer, 1, -1)
        cv2.circle(canvas, (round(cx), round(cy)), max(1, round(outer * 0.5)), 0, -1)
    else:  # pragma: no cover
        raise AssertionError(shape)
