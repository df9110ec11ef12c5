"""A training budget in wall-clock time (trainer.max_time): parsing, the iteration count that fills
it, the schedule reaching its floor, exact repetition with the recorded count, resume, DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segexp.engine import budget
from segexp.engine import trainer as trainer_module
from segexp.engine.experiment import run_training
from segexp.errors import ConfigError
from segexp.weights_io import read_weights_file
from tests.conftest import ROOT, compose_config, free_port, last_weights, launcher_free_env, tiny_config

TIMED = ["trainer.max_time=4s", "trainer.log_interval=5", "trainer.measure_speed=false"]
REPLAN_AT, EARLY_REPLAN_AT = budget.REPLAN_AT, budget.EARLY_REPLAN_AT


@pytest.fixture(autouse=True)
def first_plan_only(monkeypatch):
    """These runs' tiny steps on the real clock vary in speed by more than the re-plan's
    tolerance: they keep their first plan, so each test takes one path. The re-plan's tests
    set the real threshold back and drive the clock themselves."""
    monkeypatch.setattr(budget, "REPLAN_AT", float("inf"))
    monkeypatch.setattr(budget, "EARLY_REPLAN_AT", float("inf"))


@pytest.mark.parametrize("text, seconds", [
    ("20m", 1200), ("90s", 90), ("2h", 7200), ("1d2h", 93600), ("1h30m", 5400), ("45", 45),
    (30, 30), (2.5, 2.5), ("00:20:00", 1200), ("1:00:00:00", 86400), ("20min", 1200),
    ("0.5m", 30)])
def test_durations_parse(text, seconds):
    assert budget.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["20 minutes", "abc", "-5m", "0", "m", "5x"])
def test_bad_durations_name_the_option(text):
    with pytest.raises(ConfigError, match="trainer.max_time"):
        budget.parse_duration(text)


def test_iteration_count_fills_the_budget_with_its_validations():
    # 100 s at 1 s per iteration, a 5 s validation every 10 iterations and at the end:
    # 66 iterations + 7 validations = 101 s is too much, 66 + ... -> the largest that fits.
    n = budget.fit_iterations(100.0, 1.0, 5.0, val_every=10)
    assert n + 5 * budget.validations_in(n, 10) <= 100
    assert (n + 1) + 5 * budget.validations_in(n + 1, 10) > 100
    assert budget.fit_iterations(100.0, 1.0, 5.0, val_every=10, cap=20) == 20
    assert budget.fit_iterations(1.0, 5.0, 5.0, val_every=10) == 1  # never zero
    # val_interval=null: a fixed number of validations spread over the run.
    n = budget.fit_iterations(100.0, 1.0, 5.0, val_every=None)
    assert n == 100 - 5 * budget.VALIDATIONS_PER_RUN
    assert budget.validation_every(None, n) * (budget.VALIDATIONS_PER_RUN - 1) < n
    # ... as many as fit in 5 % of the budget: here 1 (the final validation) of 5 s each.
    assert budget.fit_iterations(100.0, 1.0, 5.0, val_every=None, count=1) == 95
    assert budget.validations_in(95, None, count=1) == 1


@pytest.mark.parametrize("budget_s, val_s, count", [
    (1200, 71, 1),     # 20 minutes, a slow validation: only the final one (60 s of room)
    (1200, 25, 2),     # 60 s of room: two of 25 s
    (7200, 30, 4),     # 2 hours: all four (360 s of room), never more
    (60, 100, 1),      # a validation longer than the budget: the final one still happens
    (600, 0.0, 4),     # nothing measured (no validation batches): the usual four
])
def test_validations_take_at_most_a_twentieth_of_a_budget(budget_s, val_s, count):
    assert budget.validations_for_budget(budget_s, val_s) == count


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_timed_run_records_its_count_and_ends_at_the_schedule_floor(tmp_path):
    timed = tmp_path / "timed"
    run_training(tiny_config(*TIMED, "trainer.log_interval=1"), timed)
    summary = _summary(timed)
    n, w = summary["planned_iters"], summary["budget"]["calibration_iters"]
    assert summary["status"] == "completed" and summary["iters"] == n >= 1
    assert summary["images_seen"] == 2 * n  # batch 2
    # The speed was measured on the run's own first iterations (no throw-away steps): they fill
    # 2 % of the budget, after 2 untimed ones; only a validation's time was estimated apart.
    assert budget.WARMUP_STEPS + budget.MIN_TIMED_STEPS <= w < n
    assert summary["budget"]["seconds"] == 4 and 0 < summary["budget"]["calibration_s"] < 2
    assert summary["budget"]["used_s"] >= summary["budget"]["calibration_s"]
    assert summary["val_time_s"] > 0
    lines = [json.loads(line) for line in (timed / "metrics.jsonl").read_text().splitlines()]
    lrs = {line["step"]: line["train/lr"] for line in lines if "train/lr" in line}
    cfg = tiny_config(*TIMED)
    # The lr is held at its start while the speed is measured (it could not depend on a count
    # not yet known), then poly decays to its floor (min_lr_ratio) exactly at the last iteration.
    assert [lrs[i] for i in range(1, w)] == [cfg.optimizer.lr] * (w - 1)
    assert lrs[w + 1] < cfg.optimizer.lr
    assert lrs[n] == pytest.approx(cfg.optimizer.lr * cfg.scheduler.min_lr_ratio)
    assert lines[-1]["step"] == n

    # The recorded overrides repeat the run exactly.
    repeat_line = summary["budget"]["repeat"]
    assert repeat_line == (f"trainer.max_time=null trainer.max_iters={n} "
                           f"scheduler.warmup_steps={w} scheduler.warmup_start_factor=1")
    repeat = tmp_path / "repeat"
    run_training(tiny_config(*TIMED, "trainer.log_interval=1", *repeat_line.split()), repeat)
    a, b = last_weights(timed), last_weights(repeat)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    assert _summary(repeat)["final"]["mIoU"] == pytest.approx(summary["final"]["mIoU"], abs=1e-3)
    repeated = {json.loads(line)["step"]: json.loads(line)["train/lr"]
                for line in (repeat / "metrics.jsonl").read_text().splitlines() if "train/lr" in line}
    assert repeated == pytest.approx(lrs, rel=1e-12)


def test_a_configured_warmup_is_where_the_speed_is_measured(tmp_path):
    """With a warmup of its own, the schedule is not changed: the measurement ends inside it,
    and the count alone repeats the run."""
    overrides = [*TIMED, "trainer.max_time=60s", "trainer.max_iters=12", "scheduler.warmup_steps=6"]
    run_training(tiny_config(*overrides), tmp_path / "timed")
    summary = _summary(tmp_path / "timed")
    assert summary["budget"]["calibration_iters"] == 6  # 2 % of 60 s takes more than 6 tiny steps
    assert summary["planned_iters"] == 12  # the cap
    assert summary["budget"]["repeat"] == "trainer.max_time=null trainer.max_iters=12"
    run_training(tiny_config(*overrides, *summary["budget"]["repeat"].split()), tmp_path / "repeat")
    a, b = last_weights(tmp_path / "timed"), last_weights(tmp_path / "repeat")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resumed_timed_run_keeps_its_count_and_the_time_spent(tmp_path, monkeypatch):
    # A cap keeps the count small and known; the budget still plans and is charged.
    overrides = [*TIMED, "trainer.max_time=60s", "trainer.max_iters=6", "trainer.val_interval=2"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_training(tiny_config(*overrides), straight)
    assert _summary(straight)["planned_iters"] == 6

    real_step = trainer_module.optimizer_step

    def crashing_step(run):  # the whole capped run measures its speed (2 % of 60 s is more
        if run.state.iter == 5:  # than 6 tiny steps); crash after iteration 5 was logged but
            # not checkpointed: the resumed run measures again from iteration 4 and plans at 6
            raise KeyboardInterrupt("simulated crash")
        real_step(run)

    monkeypatch.setattr(trainer_module, "optimizer_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(*overrides), broken)
    saved = read_weights_file(broken / "checkpoints" / "last.pt")["state"]
    assert saved["iter"] == 4 and saved["total_iters"] == 6 and saved["budget_used_s"] > 0
    monkeypatch.setattr(trainer_module, "optimizer_step", real_step)

    run_training(tiny_config(*overrides, "resume=true"), broken)
    steps = [json.loads(line)["step"] for line in (broken / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == sorted(set(steps)) and 5 in steps  # iteration 5 logged once, not twice
    summary = _summary(broken)
    assert summary["iters"] == summary["planned_iters"] == 6
    assert summary["budget"]["used_s"] > saved["budget_used_s"]  # the first part still counts
    a, b = last_weights(straight), last_weights(broken)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_run_resumed_after_planning_continues_its_schedule_exactly(tmp_path, monkeypatch):
    """Each step takes 1 s on the run's clock (the real one plus an offset: a loaded machine's
    speed must not decide how many iterations a tiny budget gets, nor skip the crash point)."""
    overrides = [*TIMED, "trainer.max_time=30s", "trainer.val_interval=2", "trainer.log_interval=1"]
    real_clock, offset = budget.time.perf_counter, [0.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: real_clock() + offset[0])
    real_step = trainer_module.optimizer_step
    crash_at = []

    def crashing_step(run):  # crash 3 iterations after the count was fixed
        s = run.state
        if s.planned and not crash_at and s.iter >= s.calibration_iters + 3 and s.iter % 2 == 1:
            crash_at.append(s.iter)
            raise KeyboardInterrupt("simulated crash")
        real_step(run)
        offset[0] += 1.0

    monkeypatch.setattr(trainer_module, "optimizer_step", crashing_step)
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(*overrides), broken)
    saved = read_weights_file(broken / "checkpoints" / "last.pt")["state"]
    assert saved["planned"] and saved["iter"] == crash_at[0] - 1 and saved["total_iters"] > saved["iter"]
    run_training(tiny_config(*overrides, "resume=true"), broken)
    summary = _summary(broken)
    assert summary["iters"] == summary["planned_iters"] == saved["total_iters"]
    assert summary["budget"]["used_s"] > saved["budget_used_s"]
    # The resumed run ends with the weights of one run of the recorded overrides.
    repeat = tmp_path / "repeat"
    run_training(tiny_config(*overrides, *summary["budget"]["repeat"].split()), repeat)
    a, b = last_weights(repeat), last_weights(broken)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_two_stage_warmup_without_a_first_stage_is_refused_under_a_budget(tmp_path):
    with pytest.raises(ConfigError, match="scheduler.backbone_warmup_steps needs scheduler.warmup_steps"):
        run_training(tiny_config(*TIMED, "scheduler.backbone_warmup_steps=5"), tmp_path)


@pytest.mark.parametrize("when", ["after planning", "while measuring"])
def test_an_overrun_budget_stops_training_and_says_so(tmp_path, monkeypatch, when):
    # The machine "slows down": every step then takes far longer than the budget allows.
    real_step = trainer_module.optimizer_step

    def slow_step(run):
        real_step(run)
        if run.state.iter > 0 and (run.state.planned or when == "while measuring"):
            run.state.budget_used_s += 10.0

    monkeypatch.setattr(trainer_module, "optimizer_step", slow_step)
    run_dir = tmp_path / "run"
    run_training(tiny_config(*TIMED, "trainer.max_time=30s", "trainer.log_interval=1"), run_dir)
    summary = _summary(run_dir)
    assert summary["status"] == "time_limit"
    if when == "after planning":
        assert summary["iters"] < summary["planned_iters"]
    else:  # stopped before its length was known
        assert summary["planned_iters"] is None and "repeat" not in summary["budget"]
    assert summary["final"]["mIoU"] is not None  # the final validation still happened


def test_time_budget_and_iteration_limit_whichever_comes_first(tmp_path):
    cfg = compose_config("trainer.max_time=20m")
    assert cfg.trainer.max_iters is None and cfg.trainer.val_interval is None
    cfg = compose_config("trainer.max_time=20m", "trainer.max_iters=3")
    assert cfg.trainer.max_iters == 3
    assert compose_config().trainer.max_iters == 400  # untimed default
    run_training(tiny_config("trainer.max_time=10m", "trainer.max_iters=3",
                             "trainer.measure_speed=false"), tmp_path)
    assert _summary(tmp_path)["iters"] == 3


def test_no_limit_at_all_says_how_to_set_one(tmp_path):
    with pytest.raises(ConfigError, match="trainer.max_time"):
        run_training(tiny_config("trainer.max_iters=null"), tmp_path)


def test_distributed_ranks_stop_at_rank_0s_count(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
         str(free_port()), str(ROOT / "train.py"), "trainer=debug", "dataset.image_size=32",
         "trainer.max_iters=null", "trainer.max_time=6s", "trainer.batch_size=1",
         "trainer.measure_speed=false", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path, env=launcher_free_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]  # a disagreement would hang DDP, not pass
    summary = _summary(tmp_path)
    assert summary["world_size"] == 2 and summary["iters"] == summary["planned_iters"] >= 1
    assert read_weights_file(tmp_path / "checkpoints" / "last.pt")["state"]["iter"] == summary["iters"]


def test_validation_time_estimate_is_the_start_up_plus_the_steady_time_per_image(monkeypatch):
    """A validation of 20 images in batches of 4 whose model takes 40 ms a batch after a first
    batch of 300 ms (start-up): the estimate from 3 batches is 0.3 + 4 x 0.04 s, not the first
    batch's time times five. The clock is the model's own (no sleeps: a loaded machine's timing
    must not decide the test)."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, TensorDataset

    clock = [0.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])

    class Timed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            clock[0] += 0.3 if self.calls == 0 else 0.04
            self.calls += 1
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    data = TensorDataset(torch.zeros(20, 3, 4, 4), torch.zeros(20, 4, 4, dtype=torch.long))
    loader = DataLoader(data, batch_size=4)
    options = SimpleNamespace(max_val_batches=None, val_batch_size=4, precision="32")
    model = Timed()
    run = SimpleNamespace(options=options, val_loader=loader, model=model, class_names=["a", "b"],
                          device=torch.device("cpu"), ignore_index=255)
    assert budget._validation_seconds(run) == pytest.approx(0.3 + 4 * 0.04)
    assert model.calls == 3  # one pass of 1 + VAL_CALIBRATION_BATCHES batches
    options.max_val_batches = 2  # a capped validation: two batches' worth
    model.calls = 0
    assert budget._validation_seconds(run) == pytest.approx(0.3 + 0.04)


def _measure(durations, budget_s, monkeypatch, last_iter=None):
    """Feed a Calibration iterations of the given durations (seconds); returns it and the
    iteration at which it said the measurement is complete."""
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    calibration = budget.Calibration(budget_s, last_iter=last_iter, hold=True, rebuild=True)
    run = SimpleNamespace(device=torch.device("cpu"), state=SimpleNamespace(iter=0))
    calibration.restart()
    for i, seconds in enumerate(durations, start=1):
        clock[0] += seconds
        run.state.iter = i
        if calibration.iteration_done(run):
            return calibration, i
    raise AssertionError("the measurement never ended")


def test_the_speed_is_measured_on_steady_iterations(monkeypatch):
    # Steady 1 s iterations: 2 untimed, then 8 timed fill 2 % of a 400 s budget.
    calibration, ended = _measure([5.0, 3.0] + [1.0] * 100, 400, monkeypatch)
    assert ended == budget.WARMUP_STEPS + 8 and calibration.iter_s == pytest.approx(1.0)
    # A machine still warming up (2 s iterations easing to 1 s over 20 of them): measured on until
    # it is steady, and the estimate is the steady speed, not the warm-up's.
    ramp = [2.0 - i / 20 for i in range(20)] + [1.0] * 200
    calibration, ended = _measure(ramp, 400, monkeypatch)
    assert ended > budget.WARMUP_STEPS + 8
    assert calibration.iter_s == pytest.approx(1.0, rel=0.1)
    # ... but not beyond a tenth of the budget, nor past the iteration it must end at.
    calibration, ended = _measure([2.0 * 0.98 ** i for i in range(400)], 400, monkeypatch)
    assert 0.1 * 400 <= sum(calibration.durations) <= 0.1 * 400 + 2.0
    _, ended = _measure(ramp, 400, monkeypatch, last_iter=9)
    assert ended == 9


# Long simulated steps: the real time a loaded machine adds to each tiny step stays far below the
# early check's 10 % tolerance.
STEP_S, BUDGET_S = 20.0, 2400.0


@pytest.mark.parametrize("speed", [1.5, 0.6, 1.05, 1.0], ids=["slower", "faster", "a little slower",
                                                             "steady"])
def test_a_run_whose_speed_changes_replans_once_and_ends_on_its_budget(tmp_path, monkeypatch, speed):
    """Each step takes STEP_S on the run's clock while the speed is measured, then ``speed`` times
    that (another job started beside it, or ended, or was starting while the speed was measured):
    the run measures again, takes the count that fills the budget, and the lr schedule's rest
    ends there at its floor; a count off by a third at 10 % of the budget, one off by 5 % at
    40 %. The recorded overrides repeat the run exactly; a steady run keeps its plan."""
    monkeypatch.setattr(budget, "REPLAN_AT", REPLAN_AT)
    monkeypatch.setattr(budget, "EARLY_REPLAN_AT", EARLY_REPLAN_AT)
    real_clock, offset = budget.time.perf_counter, [0.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: real_clock() + offset[0])
    real_replan, replanned_when = budget.replan_run, []

    def replan_run(run, recheck):
        changed = real_replan(run, recheck)
        if changed:
            replanned_when.append(run.state.budget_used_s)
        return changed

    monkeypatch.setattr(budget, "replan_run", replan_run)
    real_step = trainer_module.optimizer_step

    def timed_step(run):
        real_step(run)
        offset[0] += STEP_S * (speed if run.state.planned else 1.0)

    monkeypatch.setattr(trainer_module, "optimizer_step", timed_step)
    overrides = [*TIMED, f"trainer.max_time={BUDGET_S}s", "trainer.log_interval=1"]
    timed = tmp_path / "timed"
    run_training(tiny_config(*overrides), timed)
    summary = _summary(timed)
    n, used = summary["planned_iters"], summary["budget"]["used_s"]
    assert summary["status"] == "completed" and summary["iters"] == n
    assert 0.95 * BUDGET_S <= used <= BUDGET_S + STEP_S  # within a step of the budget
    replanned = "replanned_at" in summary["budget"]
    assert replanned == (speed != 1.0)
    lines = [json.loads(line) for line in (timed / "metrics.jsonl").read_text().splitlines()]
    lrs = {line["step"]: line["train/lr"] for line in lines if "train/lr" in line}
    cfg = tiny_config(*overrides)
    assert lrs[n] == pytest.approx(cfg.optimizer.lr * cfg.scheduler.min_lr_ratio)  # the floor
    if replanned:
        at, first = summary["budget"]["replanned_at"], summary["budget"]["replanned_from"]
        assert summary["budget"]["calibration_iters"] + budget.REPLAN_MIN_STEPS <= at < n
        assert (n < first) == (speed > 1)
        steps = [lrs[i] for i in sorted(lrs)]
        assert steps == sorted(steps, reverse=True)  # no jump where it re-planned
        assert summary["budget"]["repeat"].endswith(
            f"scheduler.replanned_at={at} scheduler.replanned_from={first}")
        (when,) = replanned_when  # once
        if speed == 1.05:
            assert REPLAN_AT * BUDGET_S <= when < (REPLAN_AT + 0.05) * BUDGET_S
        else:  # at the early check (its REPLAN_MIN_STEPS after the plan may take it past 10 %)
            assert EARLY_REPLAN_AT * BUDGET_S <= when < REPLAN_AT * BUDGET_S
    monkeypatch.undo()
    repeat = tmp_path / "repeat"
    run_training(tiny_config(*overrides, *summary["budget"]["repeat"].split()), repeat)
    repeated = {json.loads(line)["step"]: json.loads(line)["train/lr"]
                for line in (repeat / "metrics.jsonl").read_text().splitlines() if "train/lr" in line}
    assert repeated == pytest.approx(lrs, rel=1e-12)
    a, b = last_weights(timed), last_weights(repeat)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_no_replan_inside_the_configured_warmup(monkeypatch):
    """A long warmup of the config's own may outlast 40 % of a short budget: the re-plan waits
    until it ends (the stretched rest of a schedule begins after the warmup)."""
    from types import SimpleNamespace

    monkeypatch.setattr(budget, "REPLAN_AT", REPLAN_AT)
    monkeypatch.setattr(budget, "EARLY_REPLAN_AT", EARLY_REPLAN_AT)
    recheck = budget.Recheck(after=100)
    recheck.mark(SimpleNamespace(iter=10, budget_used_s=5.0, val_time_s=0.0))
    state = SimpleNamespace(iter=60, budget_used_s=0.5 * 100, val_time_s=0.0)
    assert not recheck.due(state, budget_s=100.0)  # half the budget used, still warming up
    state.iter = 100
    assert recheck.due(state, budget_s=100.0)
    state.budget_used_s = 0.3 * 100
    assert recheck.due(state, budget_s=100.0)  # the early check (a gross misjudgement only)
    assert recheck.tolerance(state, budget_s=100.0) == budget.EARLY_REPLAN_TOLERANCE
    recheck.early_checked = True
    assert not recheck.due(state, budget_s=100.0)  # then not again before 40 % of the budget
    state.budget_used_s = 0.4 * 100
    assert recheck.due(state, budget_s=100.0)
    assert recheck.tolerance(state, budget_s=100.0) == budget.REPLAN_TOLERANCE


def test_which_runs_replan():
    from omegaconf import OmegaConf

    plain, eomt = torch.nn.Identity(), torch.nn.Identity()
    eomt.set_progress = lambda iteration, total: None  # training that follows the run's length

    def schedule(**kw):
        return OmegaConf.create({"name": "poly", "interval": "iter", "backbone_warmup_steps": 0, **kw})

    assert budget.can_replan(schedule(), plain)
    assert budget.can_replan(schedule(name="step"), plain)
    assert not budget.can_replan(schedule(), eomt)
    assert not budget.can_replan(schedule(name="plateau"), plain)
    assert not budget.can_replan(schedule(interval="epoch"), plain)
    assert not budget.can_replan(schedule(backbone_warmup_steps=5), plain)
