"""A real SIGTERM (kill, a container stop, SLURM pre-emption) mid-training: the iteration finishes,
last.pt holds it, the run is marked interrupted, the process exits non-zero, and resume=true
continues to the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segexp.weights_io import read_weights_file
from tests.conftest import ROOT, TINY_UNET

RUN = ["trainer=debug", *TINY_UNET, "dataset.image_size=32",
       "dataset.train_length=32", "trainer.max_iters=30", "trainer.val_interval=1000",
       "trainer.log_interval=2", "trainer.measure_speed=false", "trainer.num_vis_images=0"]


def _train(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, *extra,
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_saves_the_iteration_and_resume_continues_exactly(tmp_path):
    straight = _train(tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-2000:]

    broken = tmp_path / "broken"
    process = _train(broken)
    log = broken / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (log.exists() and '"train/loss"' in log.read_text()):  # training has started
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-2000:]
    assert "SIGTERM received" in stderr and "resume=true" in stderr
    saved = read_weights_file(broken / "checkpoints" / "last.pt")["state"]
    assert 0 < saved["iter"] < 30
    summary = json.loads((broken / "metrics.json").read_text())
    assert summary["status"] == "interrupted" and summary["iters"] == saved["iter"]
    assert (broken / ".hydra" / "config.yaml").is_file()

    resumed = _train(broken, "resume=true")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    a = read_weights_file(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = read_weights_file(broken / "checkpoints" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_unknown_stop_signal_is_named(tmp_path):
    from segexp.engine.experiment import run_training
    from segexp.errors import ConfigError
    from tests.conftest import compose_config

    with pytest.raises(ConfigError, match=r"trainer.stop_signals holds 'SIGFOO'"):
        run_training(compose_config(*RUN, "trainer.stop_signals=[SIGFOO]"), tmp_path)


class _SubmititTask:
    """What the submitit launcher submits: a callable that can resubmit itself."""

    def __call__(self) -> None:
        pass

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


class _Cluster:
    """The cluster side of submitit's job environment: records the requeue instead of calling
    scontrol."""

    global_rank = 0

    def __init__(self) -> None:
        self.requeued: list[int] = []

    def _requeue(self, countdown: int) -> None:
        self.requeued.append(countdown)


def test_submitit_job_saves_requeues_and_resumes_by_itself(tmp_path, monkeypatch):
    """SLURM's SIGUSR2 before the time limit, caught by submitit's real signal handler: the run
    saves its iteration first, then submitit requeues it; the requeued job (same command, same
    folder, SLURM_RESTART_COUNT=1) continues from last.pt without being told to."""
    import os

    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import JobPaths
    from submitit.helpers import DelayedSubmission

    import segexp.engine.trainer as trainer
    from segexp.engine.experiment import run_training
    from tests.conftest import compose_config

    cluster = _Cluster()
    delayed = DelayedSubmission(_SubmititTask())
    delayed.set_timeout(60, 2)
    (tmp_path / "submitit").mkdir()  # the job's folder, where submitit keeps the resubmission
    handler = SignalHandler(cluster, JobPaths(tmp_path / "submitit", job_id="7"), delayed)
    previous = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    real_step, steps = trainer.train_step, []

    def step(run, *args, **kwargs):
        steps.append(1)
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGUSR2)
        return real_step(run, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step)
    run_dir = tmp_path / "run"
    try:
        with pytest.raises(SystemExit):  # submitit ends the process once it has requeued
            run_training(compose_config(*RUN), run_dir)
        assert cluster.requeued == [2]  # requeued; a pre-emption leaves the time-out count
        assert (tmp_path / "submitit" / "7_submitted.pkl").is_file()  # what the job reruns
        assert signal.getsignal(signal.SIGUSR2) == handler.checkpoint_and_try_requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)
    saved = read_weights_file(run_dir / "checkpoints" / "last.pt")["state"]
    assert saved["iter"] == 4
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"

    monkeypatch.setattr(trainer, "train_step", real_step)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run_training(compose_config(*RUN), run_dir)  # resume=false, as the first command said
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["iters"] == 30
    assert len(steps) == 4  # the requeued job did not start over
