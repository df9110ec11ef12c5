"""Inference with a trained run: whole-image, sliding-window and test-time augmentation.

    from segexp.inference import Segmenter
    seg = Segmenter.from_run("outputs/2026-11-22/10-00-00_fcn_resnet18_synthetic")
    mask = seg.predict(rgb_uint8_image)            # HxW class indices
    seg = Segmenter.from_run(run_dir, mode="slide", crop=(512, 512), stride=(341, 341),
                             scales=(0.5, 1.0, 1.5), flip=True)

Modes (MMSegmentation's ``test_cfg``):

* ``whole``: the whole (normalised) image at once, padded to the backbone's ``size_divisor`` and
  cropped back (:func:`whole_logits`, what validation during training uses).
* ``slide``: ``mode='slide'``: windows of ``crop`` (h, w) every ``stride`` (h, w); the last window
  of a row/column is shifted back so it ends at the border; the logits of all windows are summed
  into the full image and divided by the count of windows covering each pixel.

Test-time augmentation (MMSegmentation's ``SegTTAModel`` / 0.x ``aug_test``): for each scale in
``scales`` (relative to the size the run's val pipeline gives) and, with ``flip``, its horizontal
mirror, the image is resized (bilinear), predicted with the mode above, the logits resized back
(bilinear) and un-flipped; the **softmax probabilities** of all views are averaged, as MMSeg does.
With more than one view :func:`infer_logits` returns ``log`` of that average (valid logits whose
softmax is the MMSeg average, same argmax); with one view (``scales=[1.0]``, no flip) it returns
the plain logits, so it is identical to inference without TTA.

:func:`evaluate_loader` is the one loop that accumulates a confusion matrix over a data loader:
the training loop's validation and ``scripts/evaluate.py`` both run it. :func:`load_trained_model`
is how evaluation, export and :class:`Segmenter` load a run's checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torchvision import tv_tensors
from tqdm.auto import tqdm

from segexp.config import instantiate
from segexp.data.base import default_palette, to_model_input
from segexp.errors import ConfigError, SegexpError
from segexp.loggers import VisSample
from segexp.metrics import ConfusionMatrix
from segexp.runtime import autocast, resolve_device
from segexp.visualize import colourise, denormalise
from segexp.weights_io import load_weights_into, read_weights_file

MODES = ("whole", "slide")


@dataclass
class InferenceOptions:
    """How to run the model over an image: ``mode``, window ``crop``/``stride`` (h, w) for
    ``slide``, TTA ``scales`` and ``flip``, and the autocast ``precision``."""

    mode: str = "whole"
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    precision: str = "32"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"inference mode {self.mode!r}: use one of {', '.join(MODES)}.")
        self.scales = tuple(float(s) for s in (self.scales or (1.0,)))
        if any(s <= 0 for s in self.scales):
            raise ConfigError(f"TTA scales must be positive, got {list(self.scales)}.")
        if self.mode == "slide":
            if self.crop is None:
                raise ConfigError("mode=slide needs a window size: --crop H W (e.g. the training "
                                  "crop, dataset.crop_size).")
            self.crop = _pair(self.crop, "crop")
            # MMSeg's usual choice: two thirds of the crop, so windows overlap by a third.
            self.stride = _pair(self.stride, "stride") if self.stride is not None else \
                (max(1, self.crop[0] * 2 // 3), max(1, self.crop[1] * 2 // 3))

    @property
    def views(self) -> list[tuple[float, bool]]:
        return [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]


def _pair(value: Any, name: str) -> tuple[int, int]:
    values = [int(v) for v in (value if isinstance(value, Sequence) else (value, value))]
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"{name} must be two positive integers (h, w), got {value}.")
    return values[0], values[1]


# -- tensors in, logits out ----------------------------------------------------------------------
def whole_logits(model: nn.Module, images: torch.Tensor, precision: str = "32") -> torch.Tensor:
    """Logits for whole images of any size: pad to the backbone's size divisor, crop back."""
    height, width = images.shape[-2:]
    divisor = getattr(model, "size_divisor", 1)
    pad_h, pad_w = (-height) % divisor, (-width) % divisor
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    with autocast(images.device, precision):
        logits = model(images)
    return logits[..., :height, :width].float()


def slide_logits(model: nn.Module, images: torch.Tensor, crop: Sequence[int],
                 stride: Sequence[int], precision: str = "32") -> torch.Tensor:
    """MMSegmentation's ``slide_inference``: windows of ``crop`` every ``stride``, logits summed
    and divided by the per-pixel window count. Each window goes through :func:`whole_logits`, so a
    window smaller than ``crop`` (a small image) is padded to the size divisor as usual."""
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    batch, _, h_img, w_img = images.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    total: torch.Tensor | None = None
    count = torch.zeros((1, 1, h_img, w_img), device=images.device)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            logits = whole_logits(model, images[:, :, y1:y2, x1:x2], precision)
            if total is None:
                total = images.new_zeros((batch, logits.shape[1], h_img, w_img), dtype=torch.float32)
            total[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    assert total is not None and bool((count > 0).all())
    return total / count


def single_view_logits(model: nn.Module, images: torch.Tensor,
                       options: InferenceOptions) -> torch.Tensor:
    if options.mode == "slide":
        return slide_logits(model, images, options.crop, options.stride, options.precision)
    return whole_logits(model, images, options.precision)


@torch.no_grad()
def infer_logits(model: nn.Module, images: torch.Tensor,
                 options: InferenceOptions | None = None) -> torch.Tensor:
    """Logits ``BxCxHxW`` at the input size for a normalised batch ``Bx3xHxW`` (see the module
    docstring for the modes and how TTA views are merged). ``model`` should be in eval mode."""
    options = options or InferenceOptions()
    views = options.views
    if len(views) == 1 and views[0] == (1.0, False):
        return single_view_logits(model, images, options)
    height, width = images.shape[-2:]
    probs: torch.Tensor | None = None
    for scale, flip in views:
        x = images
        if scale != 1.0:
            size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = x.flip(-1)
        logits = single_view_logits(model, x, options)
        if flip:
            logits = logits.flip(-1)
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear",
                                   align_corners=False)
        p = logits.softmax(1)
        probs = p if probs is None else probs + p
    assert probs is not None
    return (probs / len(views)).clamp_min(1e-12).log()


# -- a dataset loop with any inference mode (validation, segexp-eval) -----------------------------
@torch.no_grad()
def evaluate_loader(model: nn.Module, loader, num_classes: int, device: torch.device,
                    options: InferenceOptions | None = None, ignore_index: int = 255,
                    max_batches: int | None = None, num_vis: int = 0, progress: bool = False,
                    on_prediction: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
                    | None = None) -> tuple[ConfusionMatrix, list[VisSample]]:
    """The confusion matrix over ``loader`` (``.compute()`` gives the metrics), predicted with
    :func:`infer_logits` (``options``: mode, TTA, precision) on at most ``max_batches`` batches;
    up to ``num_vis`` samples for a picture, and ``on_prediction(index, image, mask, prediction)``
    for every image (``index`` counts images in loader order)."""
    options = options or InferenceOptions()
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    samples: list[VisSample] = []
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    index = 0
    for i, (images, masks) in enumerate(tqdm(loader, total=total, desc="eval", leave=False,
                                              disable=not progress)):
        if i >= total:
            break
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        prediction = infer_logits(model, images, options).argmax(1)
        matrix.update(prediction, masks)
        for j in range(len(images)):
            if len(samples) < num_vis:
                samples.append(VisSample(denormalise(images[j]), masks[j].cpu().numpy(),
                                         prediction[j].cpu().numpy()))
            if on_prediction is not None:
                on_prediction(index, images[j], masks[j], prediction[j])
            index += 1
    model.train(was_training)
    return matrix, samples


# -- the user-facing object ----------------------------------------------------------------------
def checkpoint_path(run_dir: str | Path, checkpoint: str | Path = "best") -> Path:
    """``best`` / ``last`` -> the run's ``checkpoints/<name>.pt``; anything else is a file path."""
    if str(checkpoint) in ("best", "last"):
        return Path(run_dir) / "checkpoints" / f"{checkpoint}.pt"
    return Path(checkpoint)


def load_run_config(run_dir: str | Path) -> DictConfig:
    """The config the run's weights were trained with: the one its checkpoint records (``best.pt``,
    else ``last.pt``), which a later command in the same folder (a resume refused for a wrong
    override, say) cannot overwrite; else ``.hydra/config.yaml``. A class count the run inferred
    from its data (``dataset.num_classes: null``) is filled in from the checkpoint's class names."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    for name in ("best", "last"):
        checkpoint = checkpoint_path(run_dir, name)
        if checkpoint.is_file():
            state = read_weights_file(checkpoint, "checkpoint")
            config = OmegaConf.create(state["config"]) if state.get("config") else \
                OmegaConf.load(path) if path.is_file() else None
            if config is not None:
                _fill_num_classes(config, state)
                return config
    if not path.is_file():
        raise ConfigError(f"{path} not found: {run_dir} is not a train.py run folder (it needs "
                          ".hydra/config.yaml and checkpoints/).")
    return OmegaConf.load(path)


def load_trained_model(path: str | Path, config: DictConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The model ``config`` describes with the weights of the segexp checkpoint at ``path`` (read
    with ``weights_only=True``), and the checkpoint itself (class names, ...). A class count the
    config leaves null is taken from the checkpoint."""
    from segexp.models import build_model

    state = read_weights_file(path, "checkpoint")
    if not isinstance(state, dict) or "model" not in state:
        raise ConfigError(f"{path} is not a segexp checkpoint (no 'model' entry).")
    _fill_num_classes(config, state)
    model = build_model(config, pretrained=False)  # the checkpoint holds every weight
    load_weights_into(model, state["model"], option="checkpoint", path=path,
                      target="the model of this config",
                      remedy="Use the config the weights were trained with (the run folder's, "
                             "without overrides that change the model).")
    return model, state


def _fill_num_classes(config: DictConfig, state: dict) -> None:
    """``dataset.num_classes`` from a checkpoint's class names, where the config leaves it null."""
    names = state.get("class_names")
    if names and "dataset" in config and config.dataset.get("num_classes", 0) is None:
        with open_dict(config):
            config.dataset.num_classes = len(names)


def _find_normalize(transforms: Any):
    from torchvision.transforms import v2

    if isinstance(transforms, v2.Normalize):
        return transforms
    for child in getattr(transforms, "transforms", []) or []:
        found = _find_normalize(child)
        if found is not None:
            return found
    return None


def _palette(cfg: DictConfig, num_classes: int) -> list[tuple[int, int, int]]:
    """The dataset's palette without needing its files: a ``palette`` in the config, else the
    dataset class's own, else the default colours (what the dataset would use)."""
    colours = cfg.dataset.get("palette") if "dataset" in cfg else None
    if not colours and "dataset" in cfg and cfg.dataset.get("_target_"):
        try:
            import hydra.utils

            colours = getattr(hydra.utils.get_class(cfg.dataset._target_), "palette", None)
        except Exception:  # noqa: BLE001 - a palette is cosmetic; fall back to the default
            colours = None
    colours = [tuple(int(c) for c in colour) for colour in (colours or [])]
    if len(colours) < num_classes:
        colours = default_palette(num_classes)
    return colours


@dataclass
class Segmenter:
    """A trained model with its run's val preprocessing, for RGB ``uint8`` ``HxWx3`` images."""

    model: nn.Module
    config: DictConfig
    device: torch.device
    options: InferenceOptions = field(default_factory=InferenceOptions)
    class_names: list[str] = field(default_factory=list)
    palette: list[tuple[int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model.to(self.device).eval()
        self.transforms = instantiate(self.config.transforms.val)
        normalize = _find_normalize(self.transforms)
        self.mean = tuple(normalize.mean) if normalize is not None else (0.0, 0.0, 0.0)
        self.std = tuple(normalize.std) if normalize is not None else (1.0, 1.0, 1.0)
        if not self.class_names:
            n = self.config.dataset.get("num_classes") or getattr(self.model, "num_classes", 0)
            self.class_names = [str(i) for i in range(int(n or 0))]
        if not self.palette:
            self.palette = _palette(self.config, len(self.class_names))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str | Path = "best", device: str = "auto",
                 **options: Any) -> Segmenter:
        """The run's ``.hydra/config.yaml`` and ``checkpoints/<checkpoint>.pt`` (``best``,
        ``last`` or a file); ``options`` are :class:`InferenceOptions` fields."""
        return cls.from_checkpoint(checkpoint_path(run_dir, checkpoint), load_run_config(run_dir),
                                   device=device, **options)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: DictConfig | dict | str | Path,
                        device: str = "auto", **options: Any) -> Segmenter:
        """A checkpoint file (read with ``weights_only=True``) and the composed config it was
        trained with (a config object, a dict or a YAML file)."""
        if isinstance(config, (str, Path)):
            config = OmegaConf.load(config)
        elif not isinstance(config, DictConfig):
            config = OmegaConf.create(config)
        model, state = load_trained_model(path, config)
        options.setdefault("precision", str(config.get("trainer", {}).get("precision", "32")))
        return cls(model, config, resolve_device(device, option="device"), InferenceOptions(**options),
                   class_names=[str(n) for n in state.get("class_names", [])])

    # -- prediction ---------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB ``uint8`` ``HxWx3`` -> the run's val pipeline (resize, normalise) -> ``1x3xhxw``."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise SegexpError(f"expected an RGB image of shape HxWx3, got shape {image.shape}.")
        if image.dtype != np.uint8:
            raise SegexpError(f"expected a uint8 image (0..255), got dtype {image.dtype}.")
        tensor = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.zeros(image.shape[:2], dtype=torch.uint8))
        tensor, _ = to_model_input(*self.transforms(tensor, mask))
        return tensor.unsqueeze(0).to(self.device)

    @torch.no_grad()
    def predict_logits(self, image: np.ndarray) -> torch.Tensor:
        """``CxHxW`` float logits at the input image's size (bilinear back from the size the val
        pipeline resized to, as MMSeg does). With TTA: log of the averaged probabilities."""
        logits = infer_logits(self.model, self.preprocess(image), self.options)
        if logits.shape[-2:] != image.shape[:2]:
            logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear",
                                   align_corners=False)
        return logits[0]

    def predict(self, image: np.ndarray) -> np.ndarray:
        """``HxW`` class indices (``uint8`` up to 256 classes, else ``int32``)."""
        prediction = self.predict_logits(image).argmax(0).cpu().numpy()
        return prediction.astype(np.uint8 if self.num_classes <= 256 else np.int32)

    def colourise(self, prediction: np.ndarray) -> np.ndarray:
        return colourise(prediction, self.palette)

    def overlay(self, image: np.ndarray, prediction: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        colour = self.colourise(prediction).astype(np.float32)
        return (image.astype(np.float32) * (1 - alpha) + colour * alpha).round().astype(np.uint8)
