"""Segmentation losses: ``loss(logits (N,C,H,W), target (N,H,W) int64) -> scalar``.

Pixels whose target is ``ignore_index`` (255) count nowhere. A batch in which every pixel is
ignored gives a loss of exactly 0 that still has a gradient (of zeros), never NaN, so a training
step on such a batch is a harmless no-op. Dice, focal and Lovász terms are computed in float32
even under autocast (softmax of half-precision logits loses too much).

For thin and rare classes: cross entropy's ``ohem`` option (online hard example mining),
:class:`LovaszSoftmaxLoss` (a surrogate of the IoU itself), and ``class_weights: auto``, which
:func:`resolve_auto_class_weights` turns into weights from the training masks' class
frequencies before the loss is built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from segexp.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
# ``class_weights`` values computed from the training masks (segexp.data.scan.class_weights).
AUTO_WEIGHTS = ("auto", "median", "inverse", "enet")


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
    if isinstance(values, str) and values in AUTO_WEIGHTS:
        raise ConfigError(f"{option}={values} is computed from the training set's masks before the "
                          "loss is built (train.py does this); here nothing resolved it. Call "
                          "segexp.losses.resolve_auto_class_weights on the loss config first, or "
                          "give a list of numbers, one per class.")
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


def _ohem_options(ohem: Mapping | None) -> tuple[float | None, int] | None:
    """``loss.ohem`` -> (thresh, min_kept), checked; None when OHEM is off."""
    if ohem is None:
        return None
    if not isinstance(ohem, Mapping) or set(ohem) - {"thresh", "min_kept"}:
        raise ConfigError(f"loss.ohem={ohem!r} must be null or a mapping with thresh and min_kept, "
                          "e.g. {thresh: 0.7, min_kept: 100000} (see conf/loss/ohem.yaml).")
    thresh = ohem.get("thresh", 0.7)
    min_kept = ohem.get("min_kept", 100000)
    if thresh is not None and not (isinstance(thresh, (int, float)) and 0 < thresh <= 1):
        raise ConfigError(f"loss.ohem.thresh={thresh} must be a probability in (0, 1] (0.7 is "
                          "usual) or null to keep only the min_kept highest losses.")
    if isinstance(min_kept, bool) or not isinstance(min_kept, int) or min_kept < 1:
        raise ConfigError(f"loss.ohem.min_kept={min_kept} must be a whole number >= 1 (pixels per "
                          "image; MMSegmentation uses 100000 on 512x1024 crops).")
    return (None if thresh is None else float(thresh)), int(min_kept)


@torch.no_grad()
def hard_pixel_mask(logits: torch.Tensor, target: torch.Tensor, pixel_losses: torch.Tensor,
                    thresh: float | None, min_kept: int,
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The pixels online hard example mining keeps, as MMSegmentation's ``OHEMPixelSampler``:
    a bool ``(N,H,W)`` mask, False wherever the target is ``ignore_index``.

    The selection runs over the whole batch, with a budget of ``min_kept`` pixels per image
    (``min_kept * N``). With ``thresh``, hardness is the softmax probability of the true class:
    every pixel below ``thresh`` is kept, and so are the ``min_kept * N`` lowest-probability
    pixels however confident they are. With ``thresh=None`` the ``min_kept * N`` pixels of highest
    ``pixel_losses`` are kept. With fewer valid pixels than the budget all are kept (MMSeg's index
    ``min(budget, n - 1)`` drops the single easiest pixel there; a budget is a minimum, so it is
    kept here). Ties at the budget's edge are broken arbitrarily. No host synchronisation.
    """
    valid = target != ignore_index
    budget = min_kept * target.shape[0]
    p_true = None
    if thresh is None:
        hardness = pixel_losses.float()
    else:
        safe = torch.where(valid, target, 0).unsqueeze(1)
        p_true = logits.float().softmax(dim=1).gather(1, safe).squeeze(1)
        hardness = -p_true
    if budget >= valid.numel():
        hardest = valid
    else:
        ranked = torch.where(valid, hardness, float("-inf")).flatten()
        chosen = ranked.topk(budget, sorted=False).indices  # ignored pixels rank last
        hardest = torch.zeros_like(ranked, dtype=torch.bool).index_fill_(0, chosen, True)
        hardest = hardest.view_as(valid) & valid
    if p_true is None:
        return hardest
    return hardest | (valid & (p_true < thresh))


class CrossEntropyLoss(nn.Module):
    """Pixel-wise cross entropy, mean over non-ignored pixels (weighted by ``class_weights``,
    like ``F.cross_entropy``).

    ``ohem``: online hard example mining (MMSegmentation's ``OHEMPixelSampler``, Shrivastava et
    al. 2016), ``{thresh: 0.7, min_kept: 100000}``: only the pixels :func:`hard_pixel_mask` keeps
    contribute. The denominator stays that of plain cross entropy (the valid pixels' summed
    class weights), so a kept pixel's gradient is what it would be without OHEM and the easy
    pixels' gradients are dropped, so the learning rate needs no retuning. MMSeg does the same
    (its sampler zeroes the easy pixels' weights; ``avg_non_ignore=True`` divides by the valid
    pixel count, which is this denominator without class weights); mean-over-kept variants
    would scale every gradient up by the inverse of the kept fraction.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX,
                 class_weights: Sequence[float] | None = None,
                 label_smoothing: float = 0.0, ohem: Mapping | None = None) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing={label_smoothing} must be in [0, 1); "
                              "0 disables smoothing, 0.1 is a common value.")
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.ohem = _ohem_options(ohem)
        self._warned_keeps_all = False
        # A buffer, so .to(device) moves it with the model; not saved (it comes from the config).
        self.register_buffer("class_weights", _as_weights(class_weights, "loss.class_weights"),
                             persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target, type(self).__name__)
        weight = self.class_weights
        _check_num_classes(weight, logits.shape[1], "loss.class_weights")
        if weight is not None:
            weight = weight.to(logits.dtype)
        if self.ohem is None:
            total = F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index,
                                    reduction="sum", label_smoothing=self.label_smoothing)
        else:
            pixel = F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index,
                                    reduction="none", label_smoothing=self.label_smoothing)
            thresh, min_kept = self.ohem
            self._warn_if_keeps_all(min_kept, target)
            keep = hard_pixel_mask(logits.detach(), target, pixel.detach(), thresh, min_kept,
                                   self.ignore_index)
            total = (pixel * keep).sum()
        # Same denominator as reduction="mean" but 0/0 -> 0 (all ignored) without a host sync.
        valid = target != self.ignore_index
        if weight is None:
            denom = valid.sum().to(total.dtype)
        else:
            denom = (weight[torch.where(valid, target, 0)] * valid).sum().to(total.dtype)
        return total / torch.where(denom > 0, denom, torch.ones_like(denom))

    def _warn_if_keeps_all(self, min_kept: int, target: torch.Tensor) -> None:
        pixels = target.shape[1] * target.shape[2]
        if min_kept >= pixels and not self._warned_keeps_all:
            self._warned_keeps_all = True
            log.warning(f"loss.ohem.min_kept={min_kept} is not below the {pixels} pixels of each "
                        f"{target.shape[1]}x{target.shape[2]} image, so OHEM keeps every pixel "
                        "(plain cross entropy). Lower it, e.g. to a fifth of the crop "
                        f"(loss.ohem.min_kept={max(1, pixels // 5)}); MMSegmentation's 100000 is "
                        "for 512x1024 crops.")


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


LOVASZ_CHUNK_ELEMENTS = 1 << 24  # (class x pixel) errors sorted at once: bounds the temporaries


def lovasz_jaccard_gradient(fg_sorted: torch.Tensor) -> torch.Tensor:
    """Rows of the Lovász extension's gradient of the Jaccard loss ``1 - |I| / |U|`` with
    respect to errors sorted in decreasing order (Berman et al. 2018, Alg. 1).

    ``fg_sorted``: bool ``(R, P)``, whether each sorted pixel belongs to the row's class. Entry
    ``i`` is ``Delta(first i+1 pixels mispredicted) - Delta(first i)``; written in closed form
    (``1/U_i`` for a class pixel, ``I_i / (U_i (U_i - 1))`` otherwise) rather than as the
    difference of two nearly equal Jaccard values, which loses most float32 digits once a row
    holds millions of pixels.
    """
    fg_cum = fg_sorted.int().cumsum(dim=1)  # exact counts, whatever the size
    position = torch.arange(1, fg_sorted.shape[1] + 1, device=fg_sorted.device)
    gts = fg_cum[:, -1:]
    intersection = (gts - fg_cum).float()
    union = (gts + position - fg_cum).float()  # |class pixels| + |others among the first i+1|
    grad = torch.where(fg_sorted, 1.0 / union, intersection / (union * (union - 1)).clamp_min(1))
    grad[:, 0] = 1.0 - intersection[:, 0] / union[:, 0]  # Delta of the empty set is 0
    return grad


class LovaszSoftmaxLoss(nn.Module):
    """Lovász-Softmax loss (Berman, Rannen Triki & Blaschko, CVPR 2018): a convex surrogate of
    ``1 - IoU`` per class, on softmax probabilities, averaged over classes.

    For class ``c`` the pixel errors are ``1 - p_c`` on its pixels and ``p_c`` elsewhere; sorted
    in decreasing order, they are weighted by the gradient of the Jaccard loss's Lovász extension
    (:func:`lovasz_jaccard_gradient`). With hard 0/1 probabilities the loss is exactly
    ``1 - IoU_c``. ``classes``: ``present`` (the classes in the target, the reference default),
    ``all``, or a list of class indices. ``per_image``: the loss of each image, averaged over the
    images, instead of over the whole batch. Ignored pixels count nowhere; an image (or batch)
    whose pixels are all ignored counts nowhere.

    Finding the present classes costs one host synchronisation per call; sorting the errors of
    every absent class instead would cost far more on datasets with many classes.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, classes: str | Sequence[int] = "present",
                 per_image: bool = False) -> None:
        super().__init__()
        if isinstance(classes, str):
            if classes not in ("present", "all"):
                raise ConfigError(f"loss.classes={classes!r} must be 'present', 'all' or a list "
                                  "of class indices.")
            self.classes: str | list[int] = classes
        else:
            try:
                self.classes = sorted({int(c) for c in classes})
            except (TypeError, ValueError) as err:
                raise ConfigError(f"loss.classes={classes!r} must be 'present', 'all' or a list "
                                  "of class indices.") from err
            if not self.classes or self.classes[0] < 0:
                raise ConfigError(f"loss.classes={classes!r}: give at least one class index >= 0.")
        self.ignore_index = int(ignore_index)
        self.per_image = bool(per_image)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target, type(self).__name__)
        n, c = logits.shape[:2]
        if isinstance(self.classes, list) and self.classes[-1] >= c:
            raise ConfigError(f"loss.classes names class {self.classes[-1]} but the model predicts "
                              f"{c} classes (0..{c - 1}).")
        groups = n if self.per_image else 1
        probs = logits.float().softmax(dim=1).permute(0, 2, 3, 1).reshape(groups, -1, c)
        valid = (target != self.ignore_index).reshape(groups, -1)
        labels = torch.where(valid, target.reshape(groups, -1), 0)
        class_pixels = torch.zeros(groups, c, dtype=torch.long, device=labels.device)
        class_pixels.scatter_add_(1, labels, valid.long())
        if self.classes == "present":
            chosen = class_pixels > 0
        else:
            chosen = valid.any(dim=1, keepdim=True).expand(groups, c).clone()
            if isinstance(self.classes, list):
                listed = torch.zeros(c, dtype=torch.bool, device=chosen.device)
                listed[self.classes] = True
                chosen &= listed
        group_of, class_of = chosen.nonzero(as_tuple=True)
        total = probs.sum() * 0.0  # stays 0, with a gradient, when nothing is chosen
        if group_of.numel() == 0:
            return total
        row_losses = []
        rows_per_chunk = max(1, LOVASZ_CHUNK_ELEMENTS // probs.shape[1])
        for start in range(0, group_of.numel(), rows_per_chunk):
            g, k = group_of[start:start + rows_per_chunk], class_of[start:start + rows_per_chunk]
            fg = (labels[g] == k[:, None]) & valid[g]
            p = probs[g, :, k]  # (rows, pixels)
            # Ignored pixels get error 0: they sort last, where every term is 0 whatever its
            # weight, and receive no gradient.
            errors = torch.where(valid[g], (fg.float() - p).abs(), 0.0)
            errors_sorted, order = errors.sort(dim=1, descending=True)
            with torch.no_grad():
                grad = lovasz_jaccard_gradient(fg.gather(1, order))
            row_losses.append((errors_sorted * grad).sum(dim=1))
        losses = torch.cat(row_losses)
        per_group = torch.zeros(groups, device=losses.device).index_add_(0, group_of, losses)
        counted = torch.bincount(group_of, minlength=groups)
        per_group = per_group / counted.clamp_min(1)
        return total + per_group.sum() / (counted > 0).sum()


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


# -- class_weights: auto ------------------------------------------------------------------------
def _weight_requests(node, path: str):
    """(option path, the mapping holding it, value) of every ``class_weights`` given as a method
    name in a loss config (nested losses included)."""
    if isinstance(node, dict):
        value = node.get("class_weights")
        if isinstance(value, str):
            if value not in AUTO_WEIGHTS:
                raise ConfigError(f"{path}.class_weights={value!r} must be a list of numbers (one "
                                  f"per class), null, or one of {', '.join(AUTO_WEIGHTS)} to compute "
                                  "them from the training masks.")
            yield f"{path}.class_weights", node, value
        for key, child in node.items():
            yield from _weight_requests(child, f"{path}.{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _weight_requests(child, f"{path}.{i}")


def resolve_auto_class_weights(loss_cfg, train_set, cache_dir: str | Path | None,
                               progress: bool = True):
    """``loss_cfg`` with every ``class_weights: auto`` (or ``median``, ``inverse``, ``enet``),
    at any depth (``loss.losses.ce.class_weights`` of a combined loss too), replaced by weights
    from the class pixel frequencies of ``train_set``'s masks: see
    :func:`segexp.data.scan.class_weights` (``auto`` is median frequency balancing). The masks are
    scanned once and the scan cached in ``cache_dir`` (None: not cached). Logs one INFO line of
    weights per option. Returns ``loss_cfg`` itself when no option asks for computed weights.

    Classes absent from the split weigh 0 (with a warning); masks holding values that are neither
    a class nor the ignore index raise :class:`~segexp.errors.DataError` here, before training.
    """
    container = OmegaConf.to_container(loss_cfg, resolve=True)
    requests = list(_weight_requests(container, "loss"))
    if not requests:
        return loss_cfg
    from segexp.data.scan import AUTO_METHOD, base_dataset, class_weights, scan_masks

    dataset = base_dataset(train_set)
    scan = scan_masks(dataset, cache_dir=cache_dir, progress=progress)
    scan.check_values(dataset.split)
    absent = scan.absent_classes()
    if absent:
        log.warning(f"{len(absent)} class(es) never occur in the {scan.num_images} "
                    f"{dataset.split} masks: {', '.join(absent)}; their class weight is 0.")
    for option, node, value in requests:
        method = AUTO_METHOD if value == "auto" else value
        weights = [float(w) for w in class_weights(scan, method)]
        node["class_weights"] = weights
        log.info(f"{option}={value}: {method} frequency weights from the {scan.num_images} "
                 f"{dataset.split} masks: "
                 + ", ".join(f"{name} {w:.4g}" for name, w in zip(scan.class_names, weights,
                                                                  strict=True)))
    return OmegaConf.create(container)
