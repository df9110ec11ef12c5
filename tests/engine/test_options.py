"""The trainer's options: read once into a frozen, typed object; wrong values named before any work;
and the engine driven without Hydra's runtime (a notebook, another launcher)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from segexp.config import compose_train_config
from segexp.engine.experiment import run_training
from segexp.engine.options import TrainerOptions
from segexp.engine.trainer import plan
from segexp.errors import ConfigError
from tests.conftest import compose_config


def test_the_default_trainer_reads_into_typed_options():
    options = TrainerOptions.from_config(compose_config().trainer)
    assert options.max_iters == 400 and options.max_time is None and options.budget_s is None
    assert options.precision == "auto" and isinstance(options.stop_signals, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.batch_size = 4  # type: ignore[misc]
    timed = TrainerOptions.from_config(compose_config("trainer.max_time=1h30m").trainer)
    assert timed.budget_s == 5400 and timed.max_iters is None  # the budget decides the length


@pytest.mark.parametrize("override, message", [
    ("trainer.batch_size=0", r"trainer.batch_size=0: use an integer >= 1"),
    ("trainer.precision=fp8", r"trainer.precision=fp8: use auto, \"32\", \"bf16\" or \"16\""),
    ("trainer.channels_last=maybe", r"trainer.channels_last='maybe': use auto, true or false"),
    ("trainer.grad_clip=-1", r"trainer.grad_clip=-1: use a positive maximum gradient norm"),
    ("trainer.max_time=soon", r"trainer.max_time='soon' is not a duration"),
    ("trainer.log_interval=2.5", r"trainer.log_interval=2.5: use an integer >= 1"),
    ("+trainer.max_iter=10", r"trainer.max_iter is not a trainer option.*max_iters"),
    ("trainer.max_epochs=3", r"set one of trainer.max_iters and trainer.max_epochs"),
    ("trainer.max_iters=null", r"set how long to train"),
])
def test_a_wrong_option_is_named_before_any_work(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        TrainerOptions.from_config(compose_config(override).trainer)
    with pytest.raises(ConfigError, match=message):  # and training refuses it before building
        run_training(compose_config(override, "dataset.train_length=4"), tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing written


def test_plan_is_a_pure_function_of_the_options_and_the_split():
    options = TrainerOptions(batch_size=4, accumulate_grad_batches=2, max_epochs=3)
    first = plan(options, samples_per_replica=37)
    assert first == plan(options, samples_per_replica=37)
    # 37 // 4 = 9 batches, trimmed to whole iterations of 2 batches: 8 batches, 4 iterations.
    assert (first.batches_per_epoch, first.iters_per_epoch, first.limit) == (8, 4, 12)
    capped = plan(dataclasses.replace(options, max_train_batches=3), samples_per_replica=37)
    assert (capped.batches_per_epoch, capped.iters_per_epoch) == (2, 1)
    assert plan(TrainerOptions(max_time="5m"), samples_per_replica=64).limit is None
    with pytest.raises(ConfigError, match=r"fewer than one iteration needs.*x 2 processes"):
        plan(TrainerOptions(batch_size=8, max_iters=1), samples_per_replica=3, world_size=2)


def test_the_engine_runs_without_hydras_runtime(tmp_path):
    """A notebook: compose the config, clear Hydra's runtime, train. The run name was resolved
    while composing; tags, messages and the resume rule need no Hydra state."""
    cfg, dataset = compose_train_config(["trainer=debug", "dataset.train_length=4",
                                         "dataset.val_length=2", "head.decoder_channels=[8,8,8]"])
    assert dataset == "synthetic" and cfg.name == "unet_resnet18_synthetic"
    HydraConfig.instance().cfg = None  # nothing left to read: the engine must not need it
    assert not HydraConfig.initialized()
    best = run_training(cfg, tmp_path)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["best"]["mIoU"] == pytest.approx(best)
    # A resume from code continues with the config it is given (no command line to read).
    with open_dict(cfg):
        cfg.resume = True
        cfg.trainer.max_iters = 3
        cfg.trainer.val_interval = 3
    run_training(cfg, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["iters"] == 3
