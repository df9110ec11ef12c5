"""TensorBoard logging: curves, per-class IoU, prediction pictures and an HParams entry, as event
files in ``<run folder>/tensorboard/`` (view with ``tensorboard --logdir outputs``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from segexp.loggers.base import Logger, RunInfo, VisSample, flatten_config


def _number(value: Any) -> float | None:
    """A scalar TensorBoard can plot, or None (text, lists, an absent class's NaN IoU)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def hparam_value(value: Any) -> int | float | str:
    """The HParams plugin takes numbers and strings; anything else (None, lists, booleans, which
    it would turn into 0/1) is shown as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return value if isinstance(value, str) else str(value)


class TensorBoardLogger(Logger):
    def __init__(self, subdir: str = "tensorboard", log_images: bool = True,
                 log_confusion: bool = True, flush_secs: int = 30) -> None:
        self.subdir = subdir
        self.log_images, self.log_confusion = log_images, log_confusion
        self.flush_secs = flush_secs
        self.writer = None

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run.run_dir) / self.subdir
        # Resumed: TensorBoard hides what the earlier session wrote for the repeated steps.
        purge = None if run.resumed_from_iter is None else run.resumed_from_iter + 1
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self.flush_secs,
                                    purge_step=purge)
        self.config = flatten_config(run.config)
        tags = ", ".join(run.tags)
        self.writer.add_text("run", f"{run.name}" + (f" ({tags})" if tags else "")
                             + (f", group {run.group}" if run.group else ""))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            if (number := _number(value)) is not None:
                self.writer.add_scalar(key, number, step)

    def log_validation(self, results: dict[str, Any], step: int, class_names: list[str],
                       palette: list[tuple[int, int, int]], samples: list[VisSample],
                       confusion: np.ndarray | None = None) -> None:
        from segexp.reports import confusion_matrix_image
        from segexp.visualize import prediction_grid

        for key, value in results.items():
            if isinstance(value, list):  # per class: one curve each, under val/<metric>/<class>
                for name, v in zip(class_names, value):
                    if (number := _number(v)) is not None:
                        self.writer.add_scalar(f"val/{key}/{name}", number, step)
            elif (number := _number(value)) is not None:
                self.writer.add_scalar(f"val/{key}", number, step)
        if self.log_images and samples:
            # The picture predictions/iter_*.png holds: image | ground truth | prediction rows.
            self.writer.add_image("val/predictions", prediction_grid(samples, palette, class_names),
                                  step, dataformats="HWC")
        if self.log_confusion and confusion is not None:
            self.writer.add_image("val/confusion_matrix", confusion_matrix_image(
                confusion, class_names, f"confusion matrix, iteration {step}"), step,
                dataformats="HWC")
        self.writer.flush()

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The run's config as hyperparameters, its best scores as the HParams metrics."""
        from torch.utils.tensorboard.summary import hparams

        metrics = {key: number for key, value in summary.items()
                   if key.startswith("best/") and key != "best/iter"
                   and (number := _number(value)) is not None}
        step = int(summary.get("best/iter") or 0)
        exp, ssi, sei = hparams({k: hparam_value(v) for k, v in self.config.items()}, metrics)
        # Written into this run's own event file (SummaryWriter.add_hparams would open a
        # sub-folder per call, shown in TensorBoard as a second run).
        for proto in (exp, ssi, sei):
            self.writer.file_writer.add_summary(proto, step)
        for key, number in metrics.items():
            self.writer.add_scalar(key, number, step)
        for key, value in summary.items():
            if not key.startswith("best/") and (number := _number(value)) is not None:
                self.writer.add_scalar(f"summary/{key}", number, step)

    def finish(self, failed: bool = False, status: str | None = None) -> None:
        if self.writer is not None:
            self.writer.add_text("status", status or ("failed" if failed else "completed"))
            self.writer.close()
            self.writer = None
