"""The training criterion of mask-classification models (MaskFormer, Mask2Former, EoMT):
Hungarian matching of queries to the classes present in each image, then a class loss on every
query and mask losses on the matched ones (Cheng et al., "Masked-attention Mask Transformer for
Universal Image Segmentation", CVPR 2022; the settings are the paper's).

``MaskClassificationLoss(predictions: MaskPredictions, target (N,H,W) int64) -> scalar``.

Semantic targets: each image's ground truth is one binary mask per class present in its label
map; ``ignore_index`` pixels belong to no mask (they are 0 in every mask, so they count as
"not this class" for every matched query). This is what MMSegmentation's Mask2Former
(``seg_data_to_instance_data``: ``gt_sem_seg == class_id`` for each class but the ignore index),
detectron2's ``MaskFormerSemanticDatasetMapper`` (``classes != ignore_label``, then
``sem_seg_gt == c``) and transformers' ``convert_segmentation_map_to_binary_masks`` all do.

Masks are compared on sampled points, never resized: coordinates are normalised to [0, 1], so
the predicted masks (typically at 1/4 of the input) and the label map (at the input size) are
read at the same places. A binary target mask is read by bilinear interpolation, as
``grid_sample`` reads the float masks in the reference implementations, but straight from the
label map: no one-hot tensor of the image's classes at full resolution is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from segexp.errors import ConfigError
from segexp.losses import IGNORE_INDEX, _as_weights
from segexp.models.mask_classification import MaskPredictions


def point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``maps (B, C, h, w)`` at ``points (B, P, 2)``, (x, y) in [0, 1]
    (``grid_sample``, ``align_corners=False``, zeros outside): ``(B, C, P)``."""
    return F.grid_sample(maps, 2.0 * points.unsqueeze(2) - 1.0, mode="bilinear",
                         align_corners=False).squeeze(3)


def _corner_labels(labels: torch.Tensor, points: torch.Tensor, image_of: torch.Tensor
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The four pixels bilinear interpolation reads at each point, as :func:`point_sample`
    would: ``[(label (B, P), weight (B, P))] * 4``; ``points (B, P, 2)``, in [0, 1], lie on the
    label maps ``labels[image_of]``. Corners outside the image (up to half a pixel beyond the
    border) read a frame of -1 (no class): zero padding for a binary mask."""
    n, height, width = labels.shape
    grid = 2.0 * points - 1.0  # the same arithmetic as grid_sample's unnormalisation
    x = ((grid[..., 0] + 1) * width - 1) / 2  # in [-0.5, width - 0.5]
    y = ((grid[..., 1] + 1) * height - 1) / 2
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    row = width + 2
    framed = F.pad(labels, (1, 1, 1, 1), value=-1).flatten()  # corners -1..width stay inside
    index = (image_of * ((height + 2) * row)).unsqueeze(1) + (y0.long() + 1) * row + x0.long() + 1
    gx, gy = 1 - fx, 1 - fy
    return [(framed[index], gx * gy), (framed[index + 1], fx * gy),
            (framed[index + row], gx * fy), (framed[index + row + 1], fx * fy)]


def sample_class_masks(labels: torch.Tensor, points: torch.Tensor, image_of: torch.Tensor,
                       classes: torch.Tensor) -> torch.Tensor:
    """Values at ``points (B, P, 2)`` (in [0, 1]) of the binary masks ``labels[image_of] == classes`` read
    bilinearly: ``(B, P)`` for ``classes (B,)``, or ``(B, T, P)`` for ``classes (B, T)``."""
    per_row = classes.dim() == 1
    classes = classes.view(classes.shape[0], -1, 1)  # (B, T, 1)
    values = None
    for label, weight in _corner_labels(labels, points, image_of):
        term = torch.where(label.unsqueeze(1) == classes, weight.unsqueeze(1), 0.0)
        values = term if values is None else values + term
    return values.squeeze(1) if per_row else values


def pairwise_mask_costs(logits: torch.Tensor, targets: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid BCE and Dice costs of every prediction against every target, on shared points:
    ``logits (N, Q, P)``, ``targets (N, T, P)`` in [0, 1] -> two ``(N, Q, T)``. The BCE is the
    mean over points of ``softplus(x) - x t`` (= BCE(x, t)), so one matmul covers both terms."""
    points = logits.shape[-1]
    targets_t = targets.transpose(1, 2)
    bce = (F.softplus(logits).sum(-1, keepdim=True) - logits @ targets_t) / points
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs @ targets_t) + 1) / (
        probs.sum(-1).unsqueeze(2) + targets.sum(-1).unsqueeze(1) + 1)
    return bce, dice


class MaskClassificationLoss(nn.Module):
    """Mask2Former's set criterion (its ``SetCriterion`` + ``HungarianMatcher``) for semantic
    segmentation: ``class_weight * CE + mask_weight * BCE + dice_weight * Dice``, summed over the
    last decoder layer and every earlier one in ``predictions.aux`` (deep supervision: each
    layer is matched on its own, with the same weights).

    - Targets: one binary mask per class present in an image (ignored pixels in none of them:
      see the module docstring).
    - Matching, per image and layer: ``scipy.optimize.linear_sum_assignment`` on
      ``class_weight * (-p(class)) + mask_weight * BCE + dice_weight * Dice``, the mask costs
      on ``num_points`` uniform random points shared by every prediction and target.
    - Class loss: cross entropy over all queries, unmatched ones labelled "no object" (the last
      class), weighted ``no_object_weight`` (and per class by ``class_weights`` when given, e.g.
      ``loss.class_weights=auto``; the matcher never uses them).
    - Mask losses, on matched queries only: BCE and Dice on ``num_points`` points per mask
      chosen by uncertainty (PointRend's importance sampling: ``oversample_ratio x num_points``
      uniform candidates, the ``importance_sample_ratio`` share with the logits nearest 0, the
      rest uniform), each summed over masks and divided by the number of target masks in the
      batch (averaged over processes in a distributed run, at least 1).

    Random points are drawn from torch's global generator, in the order of transformers'
    ``Mask2FormerLoss`` (last layer first; per layer the matcher's points image by image, then
    the loss's), so seeding both gives the same points. One host synchronisation per layer (the
    cost matrices go to the CPU together). ``last_values``: the last layer's unweighted class,
    mask and Dice losses after each call, detached, for logging.
    """

    #: what :func:`segexp.engine.experiment.check_loss_fits_model` looks for
    mask_classification = True

    def __init__(self, num_classes: int, no_object_weight: float = 0.1, class_weight: float = 2.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, num_points: int = 12544,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 ignore_index: int = IGNORE_INDEX,
                 class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if num_classes is None or int(num_classes) < 1:
            raise ConfigError(f"loss.num_classes={num_classes}: give the dataset's class count "
                              "(the config's default is ${dataset.num_classes}).")
        for name, value in (("no_object_weight", no_object_weight), ("class_weight", class_weight),
                            ("mask_weight", mask_weight), ("dice_weight", dice_weight)):
            if value < 0:
                raise ConfigError(f"loss.{name}={value} must be >= 0 (Mask2Former: "
                                  "no_object_weight 0.1, class 2, mask 5, dice 5).")
        if class_weight == mask_weight == dice_weight == 0:
            raise ConfigError("loss.class_weight, loss.mask_weight and loss.dice_weight are all 0: "
                              "nothing to match or train on; Mask2Former uses 2, 5 and 5.")
        if int(num_points) < 1 or oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
            raise ConfigError(f"loss.num_points={num_points} must be >= 1, loss.oversample_ratio="
                              f"{oversample_ratio} >= 1 and loss.importance_sample_ratio="
                              f"{importance_sample_ratio} in [0, 1] (Mask2Former: 12544, 3, 0.75).")
        self.num_classes = int(num_classes)
        self.class_weight, self.mask_weight = float(class_weight), float(mask_weight)
        self.dice_weight = float(dice_weight)
        self.num_points = int(num_points)
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.ignore_index = int(ignore_index)
        weight = torch.ones(self.num_classes + 1)
        given = _as_weights(class_weights, "loss.class_weights")
        if given is not None:
            if given.numel() != self.num_classes:
                raise ConfigError(f"loss.class_weights has {given.numel()} values for "
                                  f"{self.num_classes} classes; give one value per class.")
            weight[:-1] = given
        weight[-1] = float(no_object_weight)
        # A buffer so .to(device) moves it; not saved (it comes from the config).
        self.register_buffer("empty_weight", weight, persistent=False)
        self.last_values: dict[str, torch.Tensor] = {}

    # -- targets ------------------------------------------------------------------------------
    def targets(self, labels: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The classes present in each image, ascending: ``(N, T_max)`` padded with -1, and each
        image's count. One host synchronisation."""
        n, k = labels.shape[0], self.num_classes
        # Bin per image: 0..K-1 the classes, K the ignore index, K+1 anything else.
        bins = torch.where((labels >= 0) & (labels < k), labels,
                           torch.where(labels == self.ignore_index, k, k + 1))
        offsets = torch.arange(n, device=labels.device).view(n, 1, 1) * (k + 2)
        counts = torch.bincount((bins + offsets).flatten(), minlength=n * (k + 2)).view(n, k + 2)
        counts = counts.cpu()
        if counts[:, k + 1].any():
            bad = sorted({int(v) for v in labels.unique().cpu()
                          if not (0 <= v < k or v == self.ignore_index)})
            raise ValueError(f"the target holds values {bad[:10]} that are neither a class "
                             f"(0..{k - 1}) nor the ignore index {self.ignore_index}; check the "
                             "dataset's masks and loss.num_classes.")
        present = counts[:, :k] > 0
        sizes = present.sum(1).tolist()
        classes = torch.full((n, max(sizes + [1])), -1, dtype=torch.long)
        for i in range(n):
            found = present[i].nonzero().flatten()
            classes[i, :found.numel()] = found
        return classes.to(labels.device), sizes

    def num_masks(self, sizes: list[int], device: torch.device) -> torch.Tensor:
        """Target masks per process, averaged over processes when torch.distributed runs,
        at least 1: the normaliser of the mask losses."""
        total = torch.tensor(float(sum(sizes)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            total = total / dist.get_world_size()
        return total.clamp_min(1.0)

    # -- matching -----------------------------------------------------------------------------
    @torch.no_grad()
    def match(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
              classes: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, ``(query indices, target indices)`` of the optimal assignment (queries
        ascending; a target index points into ``classes[i]``), ``min(Q, T_i)`` pairs."""
        with torch.autocast(device_type=mask_logits.device.type, enabled=False):
            return self._match(class_logits.float(), mask_logits.float(), labels, classes, sizes)

    def _match(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
               classes: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n, q = class_logits.shape[:2]
        device = mask_logits.device
        # One draw per image, as the reference does (same random stream).
        points = torch.cat([torch.rand(1, self.num_points, 2, device=device) for _ in range(n)])
        pred = point_sample(mask_logits, points)  # (N, Q, P)
        image_of = torch.arange(n, device=device)
        target = sample_class_masks(labels, points, image_of, classes).to(pred.dtype)  # (N, T, P)
        bce, dice = pairwise_mask_costs(pred, target)
        probs = class_logits.softmax(-1)
        cost_class = -probs.gather(2, classes.clamp_min(0).unsqueeze(1).expand(n, q, -1))
        cost = self.class_weight * cost_class + self.mask_weight * bce + self.dice_weight * dice
        # NaN / inf (a diverging model) must not crash the assignment: such pairs go last.
        big = torch.finfo(cost.dtype).max
        cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big).cpu().numpy()
        indices = []
        for i, size in enumerate(sizes):
            rows, cols = linear_sum_assignment(cost[i, :, :size]) if size else (
                np.zeros(0, np.int64), np.zeros(0, np.int64))
            indices.append((torch.as_tensor(rows, dtype=torch.long),
                            torch.as_tensor(cols, dtype=torch.long)))
        return indices

    # -- losses -------------------------------------------------------------------------------
    @torch.no_grad()
    def uncertain_points(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """``(M, num_points, 2)`` points per mask ``(M, h, w)``: PointRend's importance sampling
        with uncertainty ``-|logit|``."""
        m = mask_logits.shape[0]
        device = mask_logits.device
        candidates = torch.rand(m, int(self.num_points * self.oversample_ratio), 2, device=device)
        uncertainty = -point_sample(mask_logits.unsqueeze(1), candidates).squeeze(1).abs()
        chosen = int(self.importance_sample_ratio * self.num_points)
        top = uncertainty.topk(chosen, dim=1, sorted=False).indices  # the set matters, not its order
        points = candidates.gather(1, top.unsqueeze(2).expand(-1, -1, 2))
        if chosen < self.num_points:
            points = torch.cat([points, torch.rand(m, self.num_points - chosen, 2, device=device)],
                               dim=1)
        return points

    def layer_losses(self, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                     labels: torch.Tensor, classes: torch.Tensor, sizes: list[int],
                     num_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class CE, mask BCE, Dice) of one decoder layer, unweighted."""
        n, q = class_logits.shape[:2]
        device = class_logits.device
        indices = self.match(class_logits, mask_logits, labels, classes, sizes)
        image_of = torch.cat([torch.full_like(rows, i) for i, (rows, _) in enumerate(indices)])
        query = torch.cat([rows for rows, _ in indices]).to(device)
        image_of = image_of.to(device)
        matched_class = classes[image_of, torch.cat([cols for _, cols in indices]).to(device)]

        target_class = torch.full((n, q), self.num_classes, dtype=torch.long, device=device)
        target_class[image_of, query] = matched_class
        ce = F.cross_entropy(class_logits.float().transpose(1, 2), target_class,
                             weight=self.empty_weight.float())
        if query.numel() == 0:  # no class in the whole batch: nothing to compare masks with
            zero = mask_logits.sum() * 0.0
            return ce, zero, zero
        masks = mask_logits[image_of, query].float()  # (M, h, w)
        points = self.uncertain_points(masks.detach())
        with torch.no_grad():
            target = sample_class_masks(labels, points, image_of, matched_class).float()
        logits = point_sample(masks.unsqueeze(1), points).squeeze(1)  # (M, P)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
        probs = logits.sigmoid()
        dice = 1 - (2 * (probs * target).sum(1) + 1) / (probs.sum(1) + target.sum(1) + 1)
        return ce, bce.sum() / num_masks, dice.sum() / num_masks

    def forward(self, predictions: MaskPredictions, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(predictions, MaskPredictions):
            raise ConfigError(
                "loss=mask_classification takes the query predictions of a mask-classification "
                f"model (MaskPredictions), but the model returned {type(predictions).__name__}: a "
                "per-pixel model. Use a per-pixel loss (e.g. loss=ce) with this model, or a "
                "mask-classification model (Mask2Former, EoMT) with this loss.")
        if target.dim() != 3 or target.shape[0] != predictions.class_logits.shape[0]:
            raise ValueError(f"{type(self).__name__} takes a target (N,H,W) for "
                             f"{predictions.class_logits.shape[0]} images; got "
                             f"{tuple(target.shape)}.")
        layers = [(predictions.class_logits, predictions.mask_logits), *predictions.aux]
        for class_logits, _ in layers:
            if class_logits.shape[-1] != self.num_classes + 1:
                raise ConfigError(
                    f"the model predicts {class_logits.shape[-1] - 1} classes (+ 'no object') but "
                    f"loss.num_classes={self.num_classes}; leave "
                    "loss.num_classes=${dataset.num_classes} and model.num_classes alike.")
        classes, sizes = self.targets(target)
        num_masks = self.num_masks(sizes, target.device)
        total = None
        # All in float32, even under autocast (as Mask2Former's matcher and point losses): the
        # matching costs differ by less than half precision resolves.
        with torch.autocast(device_type=target.device.type, enabled=False):
            for depth, (class_logits, mask_logits) in enumerate(layers):
                ce, bce, dice = self.layer_losses(class_logits.float(), mask_logits.float(),
                                                  target, classes, sizes, num_masks)
                if depth == 0:
                    self.last_values = {"class": ce.detach(), "mask": bce.detach(),
                                        "dice": dice.detach()}
                layer = self.class_weight * ce + self.mask_weight * bce + self.dice_weight * dice
                total = layer if total is None else total + layer
        return total
