"""Segmentation metrics from one accumulated confusion matrix (rows ground truth, cols prediction).

Definitions (as MMSegmentation's ``IoUMetric``, with a presence rule for the means):

* IoU_c = TP / (TP + FP + FN), Dice_c = 2TP / (2TP + FP + FN): NaN for a class absent from both
  ground truth and prediction; such classes do not enter mIoU / mDice. A class that is only
  predicted has IoU 0 and *does* count.
* Acc_c = TP / (TP + FN) (recall): NaN for a class absent from the ground truth; mAcc is the mean
  over classes present in the ground truth.
* aAcc = correctly classified pixels / all counted pixels.

Pixels whose target is ``ignore_index`` are not counted at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from segexp.errors import DataError


class ConfusionMatrix:
    """Accumulates a ``(C, C)`` int64 confusion matrix ``mat`` with ``torch.bincount``.

    ``mat`` lives on ``device`` if given, otherwise on the device of the first batch passed to
    :meth:`update` (the model's device), so accumulation needs no transfers. It is a plain tensor:
    in distributed evaluation call :meth:`all_reduce` (or ``dist.all_reduce(cm.mat)``) before
    :meth:`compute`; :meth:`merge` adds another matrix.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1.")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self._fixed_device = device is not None
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64,
                               device=device)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` class indices ``(N,H,W)`` or logits ``(N,C,H,W)``; ``target``
        ``(N,H,W)``."""
        if pred.dim() == target.dim() + 1:
            if pred.shape[1] != self.num_classes:
                raise ValueError(f"logits have {pred.shape[1]} channels but the confusion matrix "
                                 f"has {self.num_classes} classes.")
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                             "differ in shape; resize the logits to the mask size first.")
        if self._fixed_device:
            pred, target = pred.to(self.mat.device), target.to(self.mat.device)
        elif self.mat.device != target.device:
            self.mat = self.mat.to(target.device)
            pred = pred.to(target.device)
        valid = target != self.ignore_index
        t = target[valid].long()
        p = pred[valid].long()
        if t.numel() == 0:
            return
        c = self.num_classes
        # One host sync for a clear message instead of a wrong matrix or a device-side assert.
        tmin, tmax, pmin, pmax = torch.stack([t.min(), t.max(), p.min(), p.max()]).tolist()
        if tmin < 0 or tmax >= c or pmin < 0 or pmax >= c:
            raise DataError(f"labels must lie in [0, {c - 1}] or be ignore_index="
                            f"{self.ignore_index}; found target values in [{tmin}, {tmax}] and "
                            f"predictions in [{pmin}, {pmax}]. Check the dataset's num_classes "
                            "and its label mapping.")
        self.mat += torch.bincount(t * c + p, minlength=c * c).view(c, c)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class confusion matrix into a "
                             f"{self.num_classes}-class one.")
        self.mat += other.mat.to(self.mat.device)
        return self

    def all_reduce(self) -> None:
        """Sum ``mat`` over all processes (no-op outside ``torch.distributed``)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    # Per-class values as float64 CPU tensors (the matrix is small).
    def _counts(self):
        mat = self.mat.detach().to("cpu", torch.float64)
        tp = mat.diag()
        return mat, tp, mat.sum(0) - tp, mat.sum(1) - tp  # mat, TP, FP, FN

    @staticmethod
    def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.nan))

    def iou(self) -> torch.Tensor:
        _, tp, fp, fn = self._counts()
        return self._ratio(tp, tp + fp + fn)

    def accuracy(self) -> torch.Tensor:
        _, tp, _, fn = self._counts()
        return self._ratio(tp, tp + fn)

    def dice(self) -> torch.Tensor:
        _, tp, fp, fn = self._counts()
        return self._ratio(2 * tp, 2 * tp + fp + fn)

    def pixel_accuracy(self) -> float:
        mat, tp, _, _ = self._counts()
        total = mat.sum()
        return float(tp.sum() / total) if total > 0 else math.nan

    def compute(self) -> dict:
        """``{"mIoU", "aAcc", "mAcc", "mDice"}`` as fractions in [0, 1] (NaN when nothing was
        counted) and per-class lists ``"IoU"``, ``"Acc"``, ``"Dice"`` (NaN for absent classes)."""
        iou, acc, dice = self.iou(), self.accuracy(), self.dice()
        return {
            "mIoU": _nanmean(iou),
            "aAcc": self.pixel_accuracy(),
            "mAcc": _nanmean(acc),
            "mDice": _nanmean(dice),
            "IoU": [float(v) for v in iou],
            "Acc": [float(v) for v in acc],
            "Dice": [float(v) for v in dice],
        }


def _nanmean(values: torch.Tensor) -> float:
    present = ~values.isnan()
    return float(values[present].mean()) if bool(present.any()) else math.nan


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def format_table(results: dict, class_names: Sequence[str] | None = None) -> str:
    """Plain-text per-class table (IoU, Acc, Dice in percent; "-" for absent classes) with a
    mean row and aAcc, from :meth:`ConfusionMatrix.compute`'s result."""
    n = len(results["IoU"])
    names = [str(c) for c in class_names] if class_names is not None else []
    if class_names is not None and len(names) != n:
        raise ValueError(f"{len(names)} class names for {n} classes in the results.")
    names = names or [f"class_{i}" for i in range(n)]
    rows = [(names[i], _pct(results["IoU"][i]), _pct(results["Acc"][i]), _pct(results["Dice"][i]))
            for i in range(n)]
    summary = ("mean", _pct(results["mIoU"]), _pct(results["mAcc"]), _pct(results["mDice"]))
    header = ("Class", "IoU", "Acc", "Dice")
    width = max(len(r[0]) for r in [header, summary, *rows])
    cols = [max([6, *(len(r[j]) for r in rows)]) for j in range(1, 4)]

    def line(row) -> str:
        values = [v.rjust(w) for v, w in zip(row[1:], cols, strict=True)]
        return "  ".join([row[0].ljust(width), *values])

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(r) for r in rows), rule, line(summary),
                      f"aAcc: {_pct(results['aAcc'])}"])
