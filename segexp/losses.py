"""Segmentation losses: ``loss(logits (N,C,H,W), target (N,H,W) int64) -> scalar``.

Pixels whose target is ``ignore_index`` (255) count nowhere. A batch in which every pixel is
ignored gives a loss of exactly 0 that still has a gradient (of zeros), never NaN, so a training
step on such a batch is a harmless no-op. Dice and focal terms are computed in float32 even under
autocast (softmax of half-precision logits loses too much).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segexp.errors import ConfigError

IGNORE_INDEX = 255


def _check_shapes(logits: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0] \
            or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"{name} takes logits (N,C,H,W) and target (N,H,W) of the same N, H, W; "
                         f"got logits {tuple(logits.shape)} and target {tuple(target.shape)}. "
                         "Resize the logits to the mask size before the loss.")


def _as_weights(values, option: str) -> torch.Tensor | None:
    """A YAML list (ListConfig) of per-class numbers -> float tensor, checked."""
    if values is None:
        return None
    try:
        weights = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{option}={values!r} must be a list of numbers, one per class "
                          "(or null for none).") from err
    if weights.numel() == 0 or bool((weights < 0).any()):
        raise ConfigError(f"{option}={values!r} must be a non-empty list of non-negative numbers, "
                          "one per class.")
    return weights


def _check_num_classes(weights: torch.Tensor | None, num_classes: int, option: str) -> None:
    if weights is not None and weights.numel() != num_classes:
        raise ConfigError(f"{option} has {weights.numel()} values but the model predicts "
                          f"{num_classes} classes; give one value per class.")


class CrossEntropyLoss(nn.Module):
    """Pixel-wise cross entropy, mean over non-ignored pixels (weighted by ``class_weights``,
    like ``F.cross_entropy``)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX,
                 class_weights: Sequence[float] | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing={label_smoothing} must be in [0, 1); "
                              "0 disables smoothing, 0.1 is a common value.")
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        # A buffer, so .to(device) moves it with the model; not saved (it comes from the config).
        self.register_buffer("class_weights", _as_weights(class_weights, "loss.class_weights"),
                             persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target, type(self).__name__)
        weight = self.class_weights
        _check_num_classes(weight, logits.shape[1], "loss.class_weights")
        if weight is not None:
            weight = weight.to(logits.dtype)
        total = F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index,
                                reduction="sum", label_smoothing=self.label_smoothing)
        # Same denominator as reduction="mean" but 0/0 -> 0 (all ignored) without a host sync.
        valid = target != self.ignore_index
        if weight is None:
            denom = valid.sum().to(total.dtype)
        else:
            denom = (weight[torch.where(valid, target, 0)] * valid).sum().to(total.dtype)
        return total / torch.where(denom > 0, denom, torch.ones_like(denom))


class DiceLoss(nn.Module):
    """Soft multi-class Dice loss, ``1 - mean_c (2*I_c + smooth) / (P_c + T_c + smooth)``.

    ``I_c``, ``P_c`` and ``T_c`` are the soft intersection, softmax mass and target pixel count of
    class ``c`` over non-ignored pixels, summed over the whole batch (or per image with
    ``per_image=True``). The mean runs only over classes *present* in the target or in the argmax
    prediction, the presence rule of mIoU: a class absent from both would score ~1 and dilute the
    loss of the classes that matter. False-positive mass on absent classes is still penalised,
    since it is missing from the true classes' intersections. No class present (all pixels
    ignored) gives 0.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, smooth: float = 1.0,
                 per_image: bool = False) -> None:
        super().__init__()
        if smooth < 0:
            raise ConfigError(f"loss.smooth={smooth} must be >= 0 (1.0 is usual).")
        self.ignore_index = int(ignore_index)
        self.smooth = float(smooth)
        self.per_image = bool(per_image)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target, type(self).__name__)
        n, c = logits.shape[:2]
        probs = logits.float().softmax(dim=1)
        valid = target != self.ignore_index
        safe = torch.where(valid, target, 0).unsqueeze(1)  # (N,1,H,W)
        validf = valid.unsqueeze(1).float()
        # Per-(image, class) sums by scatter_add: no (N,C,H,W) one-hot tensor is built.
        p_true = (probs.gather(1, safe) * validf).flatten(1)  # prob of the true class
        inter = probs.new_zeros(n, c).scatter_add_(1, safe.flatten(1), p_true)
        t_count = probs.new_zeros(n, c).scatter_add_(1, safe.flatten(1), validf.flatten(1))
        p_mass = (probs * validf).sum(dim=(2, 3))
        pred = logits.detach().argmax(dim=1, keepdim=True)
        pred_count = probs.new_zeros(n, c).scatter_add_(1, pred.flatten(1), validf.flatten(1))
        if not self.per_image:
            inter, t_count, p_mass, pred_count = (x.sum(0, keepdim=True)
                                                  for x in (inter, t_count, p_mass, pred_count))
        dice = (2 * inter + self.smooth) / (p_mass + t_count + self.smooth).clamp_min(1e-12)
        present = ((t_count > 0) | (pred_count > 0)).float()
        return ((1 - dice) * present).sum() / present.sum().clamp_min(1.0)


class FocalLoss(nn.Module):
    """Multi-class focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` (Lin et al. 2017), mean over
    non-ignored pixels.

    ``alpha``: ``None`` (1), one number (a global scale, as the paper's 0.25) or a list of per-class
    weights picked by the target class. The mean divides by the pixel count, not by the sum of
    ``alpha_t``, so with per-class alpha it differs from weighted cross entropy by a constant
    factor; ``gamma=0`` and no alpha is exactly cross entropy.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None,
                 ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"loss.gamma={gamma} must be >= 0 (0 is cross entropy, 2 is usual).")
        self.gamma = float(gamma)
        self.ignore_index = int(ignore_index)
        if alpha is None or isinstance(alpha, (int, float)):
            self.scalar_alpha = 1.0 if alpha is None else float(alpha)
            if self.scalar_alpha <= 0:
                raise ConfigError(f"loss.alpha={alpha} must be > 0, a list per class, or null.")
            alpha_t = None
        else:
            self.scalar_alpha = 1.0
            alpha_t = _as_weights(alpha, "loss.alpha")
        self.register_buffer("alpha", alpha_t, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target, type(self).__name__)
        _check_num_classes(self.alpha, logits.shape[1], "loss.alpha")
        valid = target != self.ignore_index
        safe = torch.where(valid, target, 0)
        logpt = F.log_softmax(logits.float(), dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = -logpt
        if self.gamma != 0:  # pow(x, 0) would still be evaluated; skip it for plain CE
            loss = (1 - logpt.exp()).clamp_min(0).pow(self.gamma) * loss
        if self.alpha is not None:
            loss = self.alpha.to(loss.dtype)[safe] * loss
        loss = (loss * valid).sum() * self.scalar_alpha
        return loss / valid.sum().clamp_min(1)


class CombinedLoss(nn.Module):
    """Weighted sum of losses, e.g. cross entropy + Dice.

    ``losses``: a mapping name -> loss, or a list (named ``"0"``, ``"1"``, ...); ``weights``: a
    mapping with the same names or a list in the same order (default: all 1). After each call,
    ``last_values`` holds each term's detached, unweighted value for logging.
    """

    def __init__(self, losses: Mapping[str, nn.Module] | Sequence[nn.Module],
                 weights: Mapping[str, float] | Sequence[float] | None = None) -> None:
        super().__init__()
        if isinstance(losses, Mapping):
            named = {str(k): v for k, v in losses.items()}
        else:
            named = {str(i): v for i, v in enumerate(losses)}
        if not named:
            raise ConfigError("loss.losses is empty: give at least one loss to combine.")
        for key, module in named.items():
            if not isinstance(module, nn.Module):
                raise ConfigError(f"loss.losses.{key} is {module!r}, not a loss module; give it a "
                                  "_target_ such as segexp.losses.CrossEntropyLoss.")
        if weights is None:
            weights = {k: 1.0 for k in named}
        elif isinstance(weights, Mapping):
            weights = {str(k): v for k, v in weights.items()}
        else:
            weights = list(weights)
            if len(weights) != len(named):
                raise ConfigError(f"loss.weights has {len(weights)} values for {len(named)} losses "
                                  f"({', '.join(named)}); give one weight per loss.")
            weights = dict(zip(named, weights, strict=True))
        if set(weights) != set(named):
            raise ConfigError(f"loss.weights names {sorted(weights)} but loss.losses names "
                              f"{sorted(named)}; use the same names in both.")
        self.losses = nn.ModuleDict(named)
        self.weights = {k: float(weights[k]) for k in named}
        self.last_values: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = None
        values = {}
        for name, loss_fn in self.losses.items():
            value = loss_fn(logits, target)
            values[name] = value.detach()
            term = self.weights[name] * value
            total = term if total is None else total + term
        self.last_values = values
        return total
