"""Loggers receive what the training loop reports. Every run writes ``metrics.jsonl`` in its run
folder (:class:`JsonlLogger`); the ``logger`` config group adds others (CSV, TensorBoard, MLflow,
W&B), one or several: ``logger=[csv,tensorboard]``."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segexp.atomic import write_with


@dataclass
class RunInfo:
    """What a logger needs to know about the run it records."""

    run_dir: Path
    name: str
    config: dict[str, Any]
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    job_num: int | None = None
    # A resumed run: the iteration of its checkpoint. The steps after it are trained, and
    # logged, again; a logger continues the earlier session's record and drops or hides those.
    resumed_from_iter: int | None = None


@dataclass
class VisSample:
    """One validation image for pictures: RGB uint8 image, ground truth and prediction masks."""

    image: np.ndarray
    target: np.ndarray
    prediction: np.ndarray


class Logger:
    """Base class; every hook is optional."""

    def start(self, run: RunInfo) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_validation(self, results: dict[str, Any], step: int, class_names: list[str],
                       palette: list[tuple[int, int, int]], samples: list[VisSample],
                       confusion: np.ndarray | None = None) -> None:
        """``confusion``: the (C, C) count matrix, rows ground truth, columns prediction."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def log_checkpoint(self, path: Path, aliases: list[str]) -> None:
        pass

    def finish(self, failed: bool = False, status: str | None = None) -> None:
        """``status``: the run's status as ``metrics.json`` records it (``completed``, ``failed``,
        ``interrupted``, ``early_stopped``, ``time_limit``); ``failed`` is true for the two
        that ended in an exception."""


def json_safe(value: Any) -> Any:
    """Strict JSON: NaN/inf (an absent class's IoU) become null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"optimizer.lr": 0.001, ...}``; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def flatten_validation(results: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """``{"mIoU": m, "IoU": [...]}`` -> ``{"val/mIoU": m, "val/IoU/<class>": ...}``."""
    flat: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, list):
            flat.update({f"val/{key}/{name}": v for name, v in zip(class_names, value)})
        else:
            flat[f"val/{key}"] = value
    return flat


class JsonlLogger(Logger):
    """One JSON object per line in ``metrics.jsonl``: every value the loop logs, with its step."""

    def start(self, run: RunInfo) -> None:
        self.path = run.run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write({"step": step, **metrics})

    def log_validation(self, results, step, class_names, palette, samples, confusion=None) -> None:
        self._write({"step": step, **flatten_validation(results, class_names)})


class CSVLogger(Logger):
    """``metrics.csv``: one row per logged step, a column per key (columns grow as keys appear)."""

    def start(self, run: RunInfo) -> None:
        self.path = run.run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append({"step": step, **metrics})
        self._flush()

    def log_validation(self, results, step, class_names, palette, samples, confusion=None) -> None:
        self.rows.append({"step": step, **flatten_validation(results, class_names)})
        self._flush()

    def _flush(self) -> None:
        # Append while the columns stay the same; rewrite the file only when a new key appears.
        row = self.rows[-1]
        new_columns = [key for key in row if key not in self.columns]
        if new_columns:
            self.columns += new_columns
            def rewrite(tmp: Path) -> None:  # atomically: a crash keeps the old rows
                with open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=self.columns)
                    writer.writeheader()
                    writer.writerows(self.rows)

            write_with(self.path, rewrite)
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)


def build_loggers(logger_cfg: Any) -> list[Logger]:
    """The loggers the ``logger`` group asks for. Each option sits under its own name
    (``logger.csv``, ``logger.tensorboard``...) so that Hydra's list form,
    ``logger=[csv,tensorboard]``, keeps every choice instead of merging them into one node;
    ``logger.<name>=null`` drops one. A config with ``_target_`` at the top (the layout before
    the names, kept in older checkpoints' configs) is one logger."""
    from omegaconf import DictConfig, OmegaConf

    from segexp.config import instantiate
    from segexp.errors import ConfigError

    if logger_cfg is None:
        return []
    if not isinstance(logger_cfg, (dict, DictConfig)):
        raise ConfigError(f"logger: expected a mapping of logger configs, got {logger_cfg!r}. "
                          "Pick options from conf/logger/, e.g. logger=csv or logger=[csv,tensorboard].")
    if "_target_" in logger_cfg:
        return [instantiate(logger_cfg)]
    loggers = []
    for name, entry in logger_cfg.items():
        if entry is None:
            continue
        if not isinstance(entry, (dict, DictConfig)) or "_target_" not in entry:
            value = OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else entry
            raise ConfigError(f"logger.{name}: not a logger config (no _target_): {value!r}. "
                              "Pick options from conf/logger/, e.g. logger=[csv,tensorboard]; "
                              f"overrides go under the option's name, e.g. logger.{name}.<key>=...")
        loggers.append(instantiate(entry))
    return loggers
