"""MLflow logging: the flattened config as params, every logged value as a metric with its step,
model / backbone / dataset tags, the resolved config and ``best.pt`` as artifacts, and a run
status that follows ``metrics.json`` (completed -> FINISHED, failed -> FAILED, interrupted ->
KILLED).

The default store is ``outputs/mlflow.db`` (SQLite) with artifacts in ``outputs/mlruns/``, beside
the run folders: MLflow 3 refuses new ``file:`` stores unless ``MLFLOW_ALLOW_FILE_STORE=true``
(its file backend is in maintenance mode) and its own default is ``sqlite:///mlflow.db`` in the
current folder. ``MLFLOW_TRACKING_URI``, or ``logger.mlflow.tracking_uri``, points elsewhere
(a server, another database). Uses :class:`mlflow.tracking.MlflowClient` only, so no MLflow run
stays "active" in the process between the jobs of an in-process sweep.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from segexp.atomic import write_json
from segexp.loggers.base import Logger, RunInfo, VisSample, flatten_config, flatten_validation

DEFAULT_STORE = "outputs/mlflow.db"
# metrics.json's status -> MLflow's RunStatus; early stops and time limits are normal ends.
RUN_STATUS = {"failed": "FAILED", "interrupted": "KILLED"}
# In the run folder: which MLflow run records it, so that a resume continues that one.
RUN_ID_FILE = "mlflow_run.json"
# MLflow's limits on one log_batch call.
MAX_PARAMS_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_PARAM_LENGTH = 100, 1000, 6000


def mlflow_key(key: str) -> str:
    """MLflow names allow letters, digits, ``_ - . / :`` and spaces: class names such as
    ``traffic light`` pass, others (``person(s)``) get ``_`` for each other character."""
    return re.sub(r"[^\w\-./: ]", "_", key)


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``outputs/mlflow.db`` (absolute, so
    runs started from one folder share one store)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    return f"sqlite:///{Path(DEFAULT_STORE).resolve()}"


def local_artifact_root(uri: str) -> str | None:
    """Artifacts of a local SQLite store go to ``mlruns/`` beside the database file (MLflow would
    put them in ``./mlruns`` of whatever folder the run started from)."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlruns")
    return None


class MLflowLogger(Logger):
    def __init__(self, tracking_uri: str | None = None, experiment_name: str = "segexp",
                 artifact_location: str | None = None, tags: dict[str, str] | None = None,
                 log_checkpoint: bool = True) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.artifact_location = artifact_location
        self.extra_tags = dict(tags or {})
        self.upload_checkpoint = log_checkpoint
        self.client = None
        self.run_id: str | None = None

    def start(self, run: RunInfo) -> None:
        from mlflow.tracking import MlflowClient

        uri = resolve_tracking_uri(self.tracking_uri)
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            experiment_id = self.client.create_experiment(
                self.experiment_name,
                artifact_location=self.artifact_location or local_artifact_root(uri))
        else:
            experiment_id = experiment.experiment_id
        # "model:upernet" -> tag model=upernet; the run folder, sweep group and job number too.
        tags = dict(tag.split(":", 1) if ":" in tag else (tag, "") for tag in run.tags)
        self.run_dir = Path(run.run_dir)
        tags["run_dir"] = str(self.run_dir.resolve())
        if run.group:
            tags["group"] = run.group
        if run.job_num is not None:
            tags["job_num"] = str(run.job_num)
        tags.update({str(k): str(v) for k, v in self.extra_tags.items()})
        self.run_id = self._resumable_run(uri) if run.resumed_from_iter is not None else None
        if self.run_id is None:
            self.run_id = self.client.create_run(experiment_id, run_name=run.name,
                                                 tags=tags).info.run_id
            write_json(self.run_dir / RUN_ID_FILE, {"tracking_uri": uri, "run_id": self.run_id})
            self._log_params(flatten_config(run.config))
            self.client.log_dict(self.run_id, run.config, "config.yaml")
            return
        # A resume continues the earlier session's MLflow run. Its params stay (MLflow refuses
        # to change one: a longer trainer.max_iters is a tag); the repeated steps' metrics are
        # logged again, and MLflow's history keeps both values of each.
        self.client.update_run(self.run_id, status="RUNNING")
        self.client.set_tag(self.run_id, "resumed_from_iter", str(run.resumed_from_iter))
        existing = self.client.get_run(self.run_id).data.params
        for key, value in flatten_config(run.config).items():
            text = str(value)[:MAX_PARAM_LENGTH]
            if existing.get(mlflow_key(key), text) != text:
                self.client.set_tag(self.run_id, f"resumed_with.{mlflow_key(key)}", text)

    def _resumable_run(self, uri: str) -> str | None:
        """The run id the earlier session of this run folder recorded, if it is in this store."""
        path = self.run_dir / RUN_ID_FILE
        try:
            record = json.loads(path.read_text())
            if record.get("tracking_uri") != uri:
                return None
            return self.client.get_run(record["run_id"]).info.run_id
        except Exception:  # no file, another store, a deleted run: start a new MLflow run
            return None

    def _log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(mlflow_key(key), str(value)[:MAX_PARAM_LENGTH])
                  for key, value in config.items()]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])

    def _log_values(self, values: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(key), float(value), now, int(step))
                   for key, value in values.items()
                   if isinstance(value, (int, float, np.integer, np.floating))
                   and not isinstance(value, bool) and math.isfinite(float(value))]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log_values(metrics, step)

    def log_validation(self, results: dict[str, Any], step: int, class_names: list[str],
                       palette: list[tuple[int, int, int]], samples: list[VisSample],
                       confusion: np.ndarray | None = None) -> None:
        # Per-class values as val/IoU/<class>, as in metrics.jsonl; an absent class's NaN is left out.
        self._log_values(flatten_validation(results, class_names), step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._log_values({k: v for k, v in summary.items() if k != "best/iter"},
                         int(summary.get("best/iter") or 0))
        text = {k: v for k, v in summary.items() if isinstance(v, str)}
        for key, value in text.items():  # e.g. the pretrained weights' source
            self.client.set_tag(self.run_id, mlflow_key(key), value[:MAX_PARAM_LENGTH])

    def log_checkpoint(self, path: Path, aliases: list[str]) -> None:
        if self.upload_checkpoint:
            self.client.log_artifact(self.run_id, str(path), "checkpoints")
            self.client.set_tag(self.run_id, "checkpoint", f"checkpoints/{Path(path).name} "
                                f"({', '.join(aliases)})")

    def finish(self, failed: bool = False, status: str | None = None) -> None:
        if self.client is None or self.run_id is None:
            return
        status = status or ("failed" if failed else "completed")
        summary = self.run_dir / "metrics.json"  # the run's record, with the error if it failed
        if summary.is_file():
            self.client.log_artifact(self.run_id, str(summary))
        self.client.set_tag(self.run_id, "status", status)
        self.client.set_terminated(self.run_id, RUN_STATUS.get(status, "FINISHED"))
        self.run_id = None
