"""Pictures of predictions: colourised masks and image | ground truth | prediction grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from segexp.atomic import write_with

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def colourise(mask: np.ndarray, palette: Sequence[tuple[int, int, int]],
              ignore_index: int = 255) -> np.ndarray:
    """Class-index mask -> RGB image; ignored pixels black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
    lut[ignore_index] = 0
    return lut[mask.astype(np.uint8)]


def denormalise(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """A normalised 3xHxW tensor back to an RGB uint8 array (for pictures only)."""
    mean_t = torch.tensor(mean, device=image.device).view(3, 1, 1)
    std_t = torch.tensor(std, device=image.device).view(3, 1, 1)
    image = (image.float() * std_t + mean_t).clamp(0, 1)
    return (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def prediction_grid(samples, palette, class_names: Sequence[str] | None = None,
                    alpha: float = 0.85) -> np.ndarray:
    """Rows of image | ground truth | prediction under a header, plus a colour legend. Masks are
    drawn nearly opaque over the image: class colours can resemble the objects' own colours."""
    rows = []
    for s in samples:
        overlays = [(s.image * (1 - alpha) + colourise(mask, palette) * alpha).astype(np.uint8)
                    for mask in (s.target, s.prediction)]
        rows.append(np.concatenate([s.image, *overlays], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    column = samples[0].image.shape[1]
    parts = [header(["image", "ground truth", "prediction"], column, width), *rows]
    if class_names:
        parts.append(legend(class_names, palette, width))
    return np.concatenate(parts, axis=0)


def header(titles: Sequence[str], column_width: int, width: int, height: int = 18) -> np.ndarray:
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for i, title in enumerate(titles):
        cv2.putText(canvas, title, (i * column_width + 4, height - 5), cv2.FONT_HERSHEY_SIMPLEX,
                    0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def legend(class_names: Sequence[str], palette, width: int, swatch: int = 14) -> np.ndarray:
    per_row = max(1, width // 120)
    n_rows = (len(class_names) + per_row - 1) // per_row
    canvas = np.full((n_rows * (swatch + 6) + 6, width, 3), 255, dtype=np.uint8)
    for i, (name, colour) in enumerate(zip(class_names, palette)):
        x, y = (i % per_row) * 120 + 4, (i // per_row) * (swatch + 6) + 4
        cv2.rectangle(canvas, (x, y), (x + swatch, y + swatch), tuple(int(c) for c in colour), -1)
        cv2.putText(canvas, str(name)[:14], (x + swatch + 4, y + swatch - 2),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def save_png(image: np.ndarray, path: str | Path) -> Path:
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)

    def write(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), bgr):
            raise OSError(f"OpenCV could not write {tmp}")

    return write_with(path, write)
