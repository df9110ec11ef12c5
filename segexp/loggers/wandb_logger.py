"""Weights & Biases logging: config, curves, per-class IoU tables, prediction overlays, best
checkpoint artifact. Falls back to offline mode when there is no API key or no network."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from segexp.atomic import write_json
from segexp.loggers.base import Logger, RunInfo, VisSample

# The W&B run a run folder logs to (id, project, entity): a resume continues that run.
RUN_ID_FILE = "wandb_run.json"


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        return bool(read_netrc_auth(host=host))
    except Exception:  # an unreadable netrc means no key, not a crash
        return False


class WandbLogger(Logger):
    def __init__(self, project: str = "segexp", entity: str | None = None, mode: str = "online",
                 group: str | None = None, tags: list[str] | None = None,
                 log_checkpoint: bool = True, init_timeout: float = 60.0) -> None:
        self.project, self.entity = project, entity
        self.mode = os.environ.get("WANDB_MODE") or mode  # the environment wins, as in wandb
        self.group, self.extra_tags = group, list(tags or [])
        self.upload_checkpoint = log_checkpoint
        self.init_timeout = init_timeout
        self.run = None

    def start(self, run: RunInfo) -> None:
        import wandb

        mode = self.mode
        if mode == "online" and not _has_api_key():
            print("wandb: no API key found (WANDB_API_KEY or `wandb login`); logging offline - "
                  f"sync later with `wandb sync {run.run_dir}/wandb/offline-run-*`.")
            mode = "offline"
        kwargs = dict(project=self.project, entity=self.entity, name=run.name,
                      group=self.group or run.group, tags=sorted(set(run.tags + self.extra_tags)),
                      config=run.config, dir=str(run.run_dir), job_type="train")
        earlier = self._resumable_run(run) if run.resumed_from_iter is not None else None
        if earlier is not None:  # a resume continues the earlier session's W&B run
            kwargs.update(id=earlier, resume="allow")
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(
                reinit="finish_previous", init_timeout=self.init_timeout, console="off"), **kwargs)
        except Exception as err:  # key present but server unreachable
            if mode != "online":
                raise
            print(f"wandb: cannot reach the server ({type(err).__name__}); logging offline - "
                  f"sync later with `wandb sync {run.run_dir}/wandb/offline-run-*`.")
            self.run = wandb.init(mode="offline", settings=wandb.Settings(
                reinit="finish_previous", console="off"), **kwargs)
        write_json(Path(run.run_dir) / RUN_ID_FILE,
                   {"id": self.run.id, "project": self.project, "entity": self.entity})
        if run.resumed_from_iter is not None:
            # The steps after the checkpoint are logged again: W&B's own step keeps counting,
            # and the curves' x axis (trainer/iter) shows where the resume went back to.
            self.run.summary["resumed_from_iter"] = run.resumed_from_iter
        # Validation curves use the training iteration as their x axis.
        self.run.define_metric("val/*", step_metric="trainer/iter")
        self.run.define_metric("train/*", step_metric="trainer/iter")

    def _resumable_run(self, run: RunInfo) -> str | None:
        """The W&B run id the earlier session of this run folder recorded, if it logged to the
        same project (another project or entity: a new run there)."""
        try:
            record = json.loads((Path(run.run_dir) / RUN_ID_FILE).read_text())
        except (OSError, ValueError):
            return None
        if (record.get("project"), record.get("entity")) != (self.project, self.entity):
            return None
        return record.get("id") or None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "trainer/iter": step})

    def log_validation(self, results: dict[str, Any], step: int, class_names: list[str],
                       palette: list[tuple[int, int, int]], samples: list[VisSample],
                       confusion: np.ndarray | None = None) -> None:
        import wandb

        from segexp.reports import confusion_matrix_image

        record: dict[str, Any] = {"trainer/iter": step}
        record.update({f"val/{k}": v for k, v in results.items() if not isinstance(v, list)})
        columns = ["class"] + [k for k, v in results.items() if isinstance(v, list)]
        rows = [[name] + [results[key][i] for key in columns[1:]]
                for i, name in enumerate(class_names)]
        record["val/per_class"] = wandb.Table(columns=columns, data=rows)
        labels = {i: name for i, name in enumerate(class_names)}
        record["val/predictions"] = [
            wandb.Image(s.image, caption=f"val image {i}", masks={
                "prediction": {"mask_data": s.prediction, "class_labels": labels},
                "ground_truth": {"mask_data": s.target, "class_labels": labels}})
            for i, s in enumerate(samples)]
        if confusion is not None:
            record["val/confusion_matrix"] = wandb.Image(
                confusion_matrix_image(confusion, class_names, f"confusion matrix, iteration {step}"),
                caption=f"rows: ground truth, columns: prediction (iteration {step})")
        self.run.log(record)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for key, value in summary.items():
            self.run.summary[key] = value

    def log_checkpoint(self, path: Path, aliases: list[str]) -> None:
        if not self.upload_checkpoint:
            return
        import wandb

        artifact = wandb.Artifact(f"{self.run.id}-model", type="model",
                                  metadata={"file": Path(path).name})
        artifact.add_file(str(path))
        self.run.log_artifact(artifact, aliases=aliases)

    def finish(self, failed: bool = False, status: str | None = None) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
