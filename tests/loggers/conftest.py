"""Helpers of the logger tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from segexp.engine import trainer as trainer_module
from segexp.engine.experiment import run_training


def crash_after_iteration_3(monkeypatch, cfg, run_dir: Path) -> None:
    """Train ``cfg`` into ``run_dir`` and crash in iteration 4 (KeyboardInterrupt): iteration 3
    was logged, but with validations every 2 iterations ``last.pt`` holds iteration 2, so a
    resume trains and logs iteration 3 again."""
    real_step = trainer_module.optimizer_step

    def crashing_step(run):
        if run.state.iter == 3:
            raise KeyboardInterrupt("simulated crash")
        real_step(run)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "optimizer_step", crashing_step)
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg, run_dir)
