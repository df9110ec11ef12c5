"""W&B logging, read back from the offline run files (no network, no account)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segexp.engine import trainer as trainer_module
from segexp.engine.experiment import run_training
from segexp.loggers.wandb_offline import find_run_file, read_history, read_records, read_summary
from tests.conftest import tiny_config, train_py
from tests.loggers.conftest import crash_after_iteration_3


@pytest.fixture
def no_wandb_account(tmp_path, monkeypatch):
    """A home without credentials, so the logger must fall back to offline by itself."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_SILENT="true")
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))
    return env


def _run_record(path: Path):
    return next(r.run for r in read_records(path) if r.WhichOneof("record_type") == "run")


def test_multirun_jobs_log_metrics_overlays_group_and_tags(tmp_path, no_wandb_account):
    sweep = tmp_path / "sweep"
    out = train_py("-m", "model=fcn,unet", "trainer=debug", "logger=wandb",
                   f"hydra.sweep.dir={sweep}", env=no_wandb_account)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "logging offline" in out.stdout
    job_dirs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert len(job_dirs) == 2
    groups = set()
    for job_dir, model in zip(job_dirs, ("fcn", "unet")):
        run_file = find_run_file(job_dir)
        history = read_history(run_file)
        assert any("train/loss" in row for row in history)
        val_rows = [row for row in history if "val/mIoU" in row]
        assert val_rows and 0.0 <= val_rows[-1]["val/mIoU"] <= 1.0
        overlay = val_rows[-1]
        assert overlay["val/per_class/_type"] == "table-file" and overlay["val/per_class/nrows"] == 6
        files = run_file.parent / "files"
        (masks,) = overlay["val/predictions/all_masks"]
        for role in ("prediction", "ground_truth"):
            values = np.unique(np.array(Image.open(files / masks[role]["path"])))
            assert values.size and set(values.tolist()) <= set(range(6)) | {255}, role
        assert (files / overlay["val/predictions/filenames"][0]).is_file()
        assert overlay["val/confusion_matrix/_type"] == "image-file"
        confusion = Image.open(files / overlay["val/confusion_matrix/path"])
        assert confusion.size == (overlay["val/confusion_matrix/width"],
                                  overlay["val/confusion_matrix/height"])
        summary = read_summary(run_file)
        assert "best/mIoU" in summary and summary["params"] > 0
        assert summary["gflops"] > 0 and summary["fps"] > 0
        assert summary["val_images_in_training"] == 0  # synthetic splits are disjoint
        run = _run_record(run_file)
        groups.add(run.run_group)
        tags = set(run.tags)
        assert {f"model:{model}", "backbone:resnet18", "dataset:synthetic"} <= tags
        kinds = [r.WhichOneof("record_type") for r in read_records(run_file)]
        assert "artifact" in kinds  # best.pt uploaded as a model artifact
        exits = [r.exit for r in read_records(run_file) if r.WhichOneof("record_type") == "exit"]
        assert exits and exits[-1].exit_code == 0
    assert len(groups) == 1 and groups.pop().startswith("sweep-")


def test_failed_job_still_finishes_its_wandb_run(tmp_path, monkeypatch, no_wandb_account):
    def broken_validation(run):
        raise RuntimeError("validation exploded")

    monkeypatch.setattr(trainer_module, "validate", broken_validation)
    cfg = tiny_config("trainer.max_iters=2", "trainer.val_interval=2", "logger=wandb")
    with pytest.raises(RuntimeError, match="validation exploded"):
        run_training(cfg, tmp_path)
    # run.finish() has handed the exit record to W&B's service; teardown waits until the service
    # has written everything and stopped, so the file is complete on any machine, under any load.
    import wandb

    wandb.teardown()
    run_file = find_run_file(tmp_path)
    exits = [r.exit for r in read_records(run_file) if r.WhichOneof("record_type") == "exit"]
    assert exits and exits[-1].exit_code == 1


def test_unreachable_server_falls_back_to_offline(tmp_path, no_wandb_account, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    cfg = tiny_config("trainer.max_iters=1", "trainer.val_interval=1", "logger=wandb",
                      "logger.wandb.init_timeout=5")
    run_training(cfg, tmp_path)
    assert "cannot reach the server" in capsys.readouterr().out
    assert any("val/mIoU" in row for row in read_history(find_run_file(tmp_path)))


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch, no_wandb_account):
    import wandb

    overrides = ["trainer.val_interval=2", "trainer.log_interval=1", "trainer.measure_speed=false",
                 "logger=wandb"]
    crash_after_iteration_3(monkeypatch, tiny_config(*overrides, "trainer.max_iters=4"), tmp_path)
    first = json.loads((tmp_path / "wandb_run.json").read_text())["id"]
    run_training(tiny_config(*overrides, "resume=true", "trainer.max_iters=4"), tmp_path)
    wandb.teardown()  # every record written

    run_files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2  # one file per session (offline), both for the same W&B run
    assert {_run_record(f).run_id for f in run_files} == {first}
    assert json.loads((tmp_path / "wandb_run.json").read_text())["id"] == first
    (resumed,) = [f for f in run_files if "resumed_from_iter" in read_summary(f)]
    assert read_summary(resumed)["resumed_from_iter"] == 2
    steps = [row["trainer/iter"] for row in read_history(resumed) if "train/loss" in row]
    assert steps == [3, 4]  # the resumed session logs from the checkpoint's next iteration

    # Another project: the run folder's record does not apply, a new W&B run starts.
    run_training(tiny_config(*overrides, "resume=true", "trainer.max_iters=5",
                             "logger.wandb.project=elsewhere"), tmp_path)
    wandb.teardown()
    assert json.loads((tmp_path / "wandb_run.json").read_text())["id"] != first
