"""Pictures of one run, drawn from its own logs (``metrics.jsonl``, ``metrics.json``), and the
confusion-matrix picture drawn at each validation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from segexp.atomic import write_with

plt.switch_backend("Agg")  # files only: no display needed


def read_metrics_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a killed run
            continue
    return rows


def plot_learning_curves(run_dir: Path) -> Path | None:
    """Training loss and validation mIoU / aAcc against the iteration."""
    rows = read_metrics_log(run_dir)
    train = [(r["step"], r["train/loss"]) for r in rows if r.get("train/loss") is not None]
    val = [(r["step"], r.get("val/mIoU"), r.get("val/aAcc")) for r in rows if "val/mIoU" in r]
    if not train and not val:
        return None
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        ax_loss.plot(*zip(*train), color="tab:red")
    ax_loss.set(title="training loss", xlabel="iteration", ylabel="loss")
    if val:
        steps = [v[0] for v in val]
        ax_val.plot(steps, [100 * (v[1] or 0) for v in val], marker="o", label="mIoU")
        ax_val.plot(steps, [100 * (v[2] or 0) for v in val], marker="s", label="aAcc")
        ax_val.legend()
    ax_val.set(title="validation", xlabel="iteration", ylabel="%")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "learning_curves.png"
    write_with(out, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return out


def plot_per_class_iou(run_dir: Path) -> Path | None:
    """Per-class IoU of the best validation, one bar per class (absent classes marked)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    per_class = json.loads(path.read_text()).get("best_per_class") or {}
    if not per_class:
        return None
    names = list(per_class)
    ious = [per_class[n].get("IoU") for n in names]
    values = [100 * v if v is not None and not math.isnan(v) else 0.0 for v in ious]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 3.8))
    bars = ax.bar(range(len(names)), values, color="tab:blue")
    for bar, v in zip(bars, ious):
        if v is None:  # absent from the ground truth and the prediction
            bar.set_color("lightgrey")
    ax.set_xticks(range(len(names)), names, rotation=60 if len(names) > 8 else 0, ha="right"
                  if len(names) > 8 else "center", fontsize=8)
    ax.set(ylabel="IoU (%)", ylim=(0, 100), title="per-class IoU (best validation)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "per_class_iou.png"
    write_with(out, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return out


def confusion_matrix_figure(matrix, class_names: list[str], title: str = "confusion matrix"):
    """Row-normalised confusion matrix (each ground-truth row sums to 100 %), so rare classes are
    as readable as common ones; cells are annotated while the classes are few enough to read."""
    counts = np.asarray(matrix, dtype=np.float64)
    rows = counts.sum(1, keepdims=True)
    percent = np.divide(100 * counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(class_names)
    side = min(24.0, max(4.5, 0.32 * n + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the ground-truth class")
    if n <= 60:  # beyond that tick labels overlap; the colours still show the structure
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if percent[i, j] >= 0.5:
                    ax.text(j, i, f"{percent[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if percent[i, j] > 60 else "black")
    ax.set(xlabel="prediction", ylabel="ground truth", title=title)
    fig.tight_layout()
    return fig


def confusion_matrix_image(matrix, class_names: list[str], title: str = "confusion matrix") -> np.ndarray:
    """The figure as an RGB uint8 array (for W&B)."""
    fig = confusion_matrix_figure(matrix, class_names, title)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def save_confusion_matrix(matrix, class_names: list[str], path: Path, title: str) -> Path:
    """The picture at ``path`` (a PNG) and the raw counts beside it as CSV (rows: ground truth)."""
    path = Path(path)
    counts = np.asarray(matrix, dtype=np.int64)
    rows = [["ground_truth\\prediction", *class_names]]
    rows += [[name, *row] for name, row in zip(class_names, counts.tolist())]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)

    write_with(path.with_suffix(".csv"), write_csv)
    fig = confusion_matrix_figure(counts, class_names, title)
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return path


def write_run_pictures(run_dir: Path) -> list[Path]:
    return [p for p in (plot_learning_curves(run_dir), plot_per_class_iou(run_dir)) if p]
