"""TensorBoard and MLflow logging, one or several loggers at once, read back from what they wrote
(event files, a local MLflow store): no server, no network."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segexp.engine import trainer as trainer_module
from segexp.engine.experiment import run_training
from segexp.errors import ConfigError, TrainingInterrupted
from segexp.loggers import CSVLogger, Logger, MLflowLogger, TensorBoardLogger, WandbLogger, build_loggers
from tests.conftest import TINY_SYNTHETIC, TINY_UNET, compose_config, tiny_config, train_py
from tests.loggers.conftest import crash_after_iteration_3


# One SQLite store for the whole module: creating its tables takes MLflow several seconds.
@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def mlflow_run(store: str, run_dir: Path):
    """The one MLflow run that recorded ``run_dir`` (tag ``run_dir``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("segexp")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.run_dir = '{run_dir.resolve()}'")
    assert len(runs) == 1
    return client, runs[0]


def test_logger_group_takes_one_or_several_options():
    def built(*overrides):
        return [type(logger) for logger in build_loggers(compose_config(*overrides).get("logger"))]

    assert built("logger=none") == [] and built("logger=[]") == []
    assert built("logger=csv") == [CSVLogger]
    assert built("logger=[csv,tensorboard]") == [CSVLogger, TensorBoardLogger]
    assert built("logger=[tensorboard,mlflow,wandb]") == [TensorBoardLogger, MLflowLogger,
                                                         WandbLogger]
    # Each option keeps its own settings under its name; logger.<name>=null drops one.
    cfg = compose_config("logger=[csv,wandb]", "logger.wandb.mode=offline")
    assert cfg.logger.wandb.mode == "offline" and set(cfg.logger) == {"csv", "wandb"}
    assert built("logger=[csv,tensorboard]", "logger.csv=null") == [TensorBoardLogger]
    # A config saved before the options had names (one logger at the top) still builds.
    assert [type(x) for x in build_loggers({"_target_": "segexp.loggers.Logger"})] == [Logger]
    with pytest.raises(ConfigError, match=r"logger\.mode: not a logger config"):
        build_loggers({"mode": "offline"})


def test_mlflow_store_and_names(monkeypatch, tmp_path):
    from segexp.loggers.mlflow_logger import local_artifact_root, mlflow_key, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    default = resolve_tracking_uri(None)
    assert default == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    assert local_artifact_root(default) == str(tmp_path / "outputs" / "mlruns")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"  # the environment's store
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"  # the option wins
    assert local_artifact_root("http://127.0.0.1:5000") is None  # a server keeps its own
    # Class names become metric names: MLflow refuses some characters.
    assert mlflow_key("val/IoU/traffic light") == "val/IoU/traffic light"
    assert mlflow_key("val/IoU/person(s);ok") == "val/IoU/person_s__ok"


def test_csv_tensorboard_and_mlflow_together_through_train_py(tmp_path, mlflow_store):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir = tmp_path / "run"
    out = train_py("trainer=debug", *TINY_UNET, *TINY_SYNTHETIC,
                   "logger=[csv,tensorboard,mlflow]", f"logger.mlflow.tracking_uri={mlflow_store}",
                   f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["train/loss"] for row in logged if "train/loss" in row}
    assert sorted(losses) == [1, 2]
    (val,) = [row for row in logged if "val/mIoU" in row]

    # CSV: one row per logged step.
    assert "train/loss" in (run_dir / "metrics.csv").read_text().splitlines()[0]

    # TensorBoard: curves with their steps, per-class IoU, the prediction picture, HParams.
    events = EventAccumulator(str(run_dir / "tensorboard"),
                              size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tb_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(tb_loss) == [1, 2]
    for step, loss in losses.items():
        assert tb_loss[step] == pytest.approx(loss, rel=1e-6)
    (miou,) = events.Scalars("val/mIoU")
    assert miou.step == 2 and miou.value == pytest.approx(val["val/mIoU"], rel=1e-6)
    (background,) = events.Scalars("val/IoU/background")
    assert background.value == pytest.approx(val["val/IoU/background"], rel=1e-6)
    absent = [key for key, value in val.items() if key.startswith("val/IoU/") and value is None]
    assert all(key not in events.Tags()["scalars"] for key in absent)  # NaN IoU: no point
    (picture,) = events.Images("val/predictions")
    expected = Image.open(run_dir / "predictions" / "iter_0000002.png")
    assert picture.step == 2 and (picture.width, picture.height) == expected.size
    assert events.Images("val/confusion_matrix")
    hparams = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["trainer.max_iters"].number_value == 2
    assert start.hparams["model._target_"].string_value == "segexp.models.Segmentor"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        hparams["_hparams_/experiment"]).experiment
    assert "best/mIoU" in [m.name.tag for m in experiment.metric_infos]
    (best,) = events.Scalars("best/mIoU")
    assert best.value == pytest.approx(summary["best"]["mIoU"], rel=1e-6)

    # MLflow: params, metric history with steps, tags, artifacts, status.
    client, run = mlflow_run(mlflow_store, run_dir)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert run.info.run_name == "unet_unet_synthetic"  # the run's name, as in its folder
    assert run.data.params["trainer.max_iters"] == "2"
    assert run.data.params["model._target_"] == "segexp.models.Segmentor"
    assert {("model", "unet"), ("backbone", "unet"), ("dataset", "synthetic")} <= set(
        run.data.tags.items())
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(history) == [1, 2]
    for step, loss in losses.items():
        assert history[step] == pytest.approx(loss, rel=1e-6)
    assert run.data.metrics["val/IoU/background"] == pytest.approx(val["val/IoU/background"],
                                                                  rel=1e-6)
    assert run.data.metrics["best/mIoU"] == pytest.approx(summary["best"]["mIoU"], rel=1e-6)
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    assert filecmp.cmp(artifacts / "checkpoints" / "best.pt", run_dir / "checkpoints" / "best.pt",
                       shallow=False)
    torch.load(artifacts / "checkpoints" / "best.pt", weights_only=True, map_location="cpu")
    config = yaml.safe_load((artifacts / "config.yaml").read_text())
    assert config["trainer"]["max_iters"] == 2 and config["model"]["num_classes"] == 6
    assert json.loads((artifacts / "metrics.json").read_text())["status"] == "completed"
    # The default artifact place of a SQLite store: mlruns/ beside the database.
    assert Path(mlflow_store[len("sqlite:///"):]).parent.joinpath("mlruns").is_dir()


@pytest.mark.parametrize("error, status, mlflow_status", [
    (RuntimeError("validation exploded"), "failed", "FAILED"),
    (TrainingInterrupted("SIGTERM received"), "interrupted", "KILLED"),
])
def test_mlflow_run_ends_as_the_run_did(tmp_path, monkeypatch, mlflow_store, error, status,
                                        mlflow_status):
    def broken_validation(run):
        raise error

    monkeypatch.setattr(trainer_module, "validate", broken_validation)
    cfg = tiny_config("trainer.max_iters=1", "trainer.val_interval=1", "trainer.device=cpu",
                      "logger=[mlflow,tensorboard]", f"logger.mlflow.tracking_uri={mlflow_store}")
    with pytest.raises(type(error)):
        run_training(cfg, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == status
    client, run = mlflow_run(mlflow_store, tmp_path)
    assert run.info.status == mlflow_status and run.data.tags["status"] == status
    assert run.data.params["trainer.max_iters"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]
    recorded = json.loads(Path(client.download_artifacts(
        run.info.run_id, "metrics.json", str(tmp_path / "artifacts"))).read_text())
    assert recorded["status"] == status and str(error) in recorded["error"]
    assert not client.list_artifacts(run.info.run_id, "checkpoints")  # no best.pt was written
    # TensorBoard's files are closed too: the loss of iteration 1 is readable.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1]
    assert np.isfinite(events.Scalars("train/loss")[0].value)


def test_a_resumed_run_continues_its_mlflow_run_and_tensorboard_hides_the_repeated_steps(
        tmp_path, monkeypatch, mlflow_store):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = ["trainer.val_interval=2", "trainer.log_interval=1", "trainer.device=cpu",
                 "trainer.measure_speed=false", "logger=[mlflow,tensorboard]",
                 f"logger.mlflow.tracking_uri={mlflow_store}"]
    crash_after_iteration_3(monkeypatch, tiny_config(*overrides, "trainer.max_iters=4"), tmp_path)
    first = json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"]
    run_training(tiny_config(*overrides, "resume=true", "trainer.max_iters=5"), tmp_path)

    client, run = mlflow_run(mlflow_store, tmp_path)  # one MLflow run for the run folder
    assert run.info.run_id == first and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_iter"] == "2" and run.data.tags["status"] == "completed"
    assert run.data.params["trainer.max_iters"] == "4"  # MLflow keeps a param's first value
    assert run.data.tags["resumed_with.trainer.max_iters"] == "5"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5] and steps.count(3) == 2  # 3 was trained twice
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    # TensorBoard shows each step once: the crashed session's step 3 is purged.
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert [e.step for e in events.Scalars("val/mIoU")] == [2, 4, 5]


def test_metrics_csv_keeps_its_rows_when_a_rewrite_for_a_new_column_fails(tmp_path, monkeypatch):
    """A new key rewrites metrics.csv with the wider header: atomically, so a failure (a full disk,
    a signal) in the middle leaves the rows written so far, not a truncated file."""
    import csv

    from segexp.loggers.base import RunInfo

    logger = CSVLogger()
    logger.start(RunInfo(run_dir=tmp_path, name="run", config={}))
    for step in (1, 2):
        logger.log_metrics({"train/loss": 1.0 / step}, step)
    before = (tmp_path / "metrics.csv").read_text()
    assert before.splitlines() == ["step,train/loss", "1,1.0", "2,0.5"]

    def full_disk(self, rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", full_disk)
    with pytest.raises(OSError):
        logger.log_metrics({"train/loss": 0.25, "train/lr": 1e-3}, 3)
    assert (tmp_path / "metrics.csv").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left
