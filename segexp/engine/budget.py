"""A training budget in wall-clock time (``trainer.max_time``).

The run is still scheduled by iterations, so it stays reproducible: before training, a few
throw-away steps measure the time per iteration (and a few validation batches the time per
validation), the iteration count that fills the budget is computed once, recorded in the
checkpoints and the summary, and the model, optimizer and random state are put back exactly as
they were. The learning-rate schedule then runs over that count and reaches its floor when the
time is up; ``trainer.max_iters=<recorded count>`` repeats the run exactly, and a resumed run
keeps the recorded count and the time already spent.

What counts against the budget: everything from the start of the run's set-up to the end of the
last validation, validations included (a user who says ``20m`` expects the run to be done after
20 minutes; validations are part of that). So that they take little of it, a budget run with
``trainer.val_interval=null`` validates at most :data:`VALIDATIONS_PER_RUN` times and only as
often as fits in :data:`VALIDATION_SHARE` of the budget (the final validation always happens).
Not counted: the cost measurement (GFLOPs / FPS) and the pictures written after training, a few
seconds. If the machine slows down so much that the run passes its budget by more than
:func:`overrun_limit` allows, training stops there, validates and says so.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from dataclasses import dataclass

import torch

from segexp.engine import distributed
from segexp.engine.checkpoint import rng_state, set_rng_state
from segexp.errors import ConfigError

log = logging.getLogger(__name__)

# Stop hard once the budget is passed by this fraction, and at least OVERRUN_MIN_S (the estimate
# was badly off: the machine slowed down; short budgets have noisy fixed costs).
OVERRUN_GRACE = 0.10
OVERRUN_MIN_S = 30.0


def overrun_limit(budget_s: float) -> float:
    """Seconds after which a run with this budget stops, whatever its plan."""
    return budget_s + max(OVERRUN_GRACE * budget_s, OVERRUN_MIN_S)
# Calibration: untimed warm-up steps (first-call costs: kernels, loader workers), then timed steps
# until this fraction of the budget is spent, at least MIN_TIMED_STEPS and at most MAX_TIMED_STEPS.
WARMUP_STEPS = 2
CALIBRATION_FRACTION = 0.02
MIN_TIMED_STEPS = 3
MAX_TIMED_STEPS = 100
VAL_CALIBRATION_BATCHES = 2
# trainer.val_interval=null: this many validations spread over the run (the last at its end);
# under a time budget, only as many as fit in VALIDATION_SHARE of it (at least the final one):
# a validation is time not spent training, and on a slow machine or a short budget four of them
# would cost a tenth of it or more.
VALIDATIONS_PER_RUN = 4
VALIDATION_SHARE = 0.05

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(d|h|min|m|s)")


def parse_duration(value, option: str = "trainer.max_time") -> float | None:
    """Seconds from ``20m``, ``90s``, ``2h``, ``1d2h``, ``1h30m``, ``HH:MM:SS`` or a number of
    seconds; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        seconds = None
        if re.fullmatch(r"\d+(\.\d*)?", text):
            seconds = float(text)
        elif re.fullmatch(r"(\d+:){1,3}\d+(\.\d*)?", text):  # [[DD:]HH:]MM:SS
            parts = [float(p) for p in text.split(":")]
            seconds = sum(p * f for p, f in zip(reversed(parts), (1, 60, 3600, 86400)))
        elif text and _PART.sub("", text) == "":
            seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))
        if seconds is None:
            raise ConfigError(f"{option}={value!r} is not a duration: use e.g. 20m, 90s, 2h, "
                              "1d2h, 1h30m, 00:20:00 or a number of seconds.")
    if not seconds > 0 or math.isinf(seconds):
        raise ConfigError(f"{option}={value!r} must be a positive duration (e.g. 20m).")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def validations_for_budget(budget_s: float, val_s: float) -> int:
    """How many validations a budget run spreads (``trainer.val_interval=null``): as many as fit
    in :data:`VALIDATION_SHARE` of the budget, at least 1 (the final one), at most
    :data:`VALIDATIONS_PER_RUN`."""
    if val_s <= 0:
        return VALIDATIONS_PER_RUN
    return max(1, min(VALIDATIONS_PER_RUN, int(VALIDATION_SHARE * budget_s / val_s)))


def validation_every(val_interval: int | None, units: int, count: int = VALIDATIONS_PER_RUN) -> int:
    """Validate every this many iterations (or epochs) in a run of ``units`` of them:
    ``trainer.val_interval``, or with null ``count`` validations evenly spread."""
    if val_interval is not None:
        return max(1, int(val_interval))
    return max(1, math.ceil(units / max(1, count)))


def validations_in(iters: int, val_every: int | None, count: int = VALIDATIONS_PER_RUN) -> int:
    """Validations a run of ``iters`` iterations does: every ``val_every`` (None: ``count``
    spread as :func:`validation_every`) and always at the end."""
    val_every = validation_every(val_every, iters, count)
    return iters // val_every + (1 if iters % val_every else 0)


def fit_iterations(remaining_s: float, iter_s: float, val_s: float, val_every: int | None,
                   cap: int | None = None, count: int = VALIDATIONS_PER_RUN) -> int:
    """The largest iteration count whose training and validations fit in ``remaining_s``
    (at least 1, at most ``cap``); ``val_every=None``: ``count`` of them, spread."""

    def cost(n: int) -> float:
        return n * iter_s + validations_in(n, val_every, count) * val_s

    per_iter = iter_s + (val_s / val_every if val_every else 0.0)
    spread = count * val_s if val_every is None else 0.0
    n = max(1, int((remaining_s - spread) / per_iter)) if per_iter > 0 else (cap or 1)
    if cap is not None:
        n = min(n, cap)
    while n > 1 and cost(n) > remaining_s:
        n -= 1
    while (cap is None or n < cap) and cost(n + 1) <= remaining_s:
        n += 1
    return max(1, n)


def _validation_seconds(run) -> float:
    """One validation's time, from one pass over ``1 + VAL_CALIBRATION_BATCHES`` batches: the
    time to the end of the first (loader start-up and warm-up included), then the steady time
    per image of the others times the images left. Each batch's end is stamped as it happens, so
    no two noisy timings are subtracted."""
    from segexp.inference import InferenceOptions, evaluate_loader

    t = run.options
    full = len(run.val_loader) if t.max_val_batches is None else min(t.max_val_batches,
                                                                     len(run.val_loader))
    images = min(full * t.val_batch_size, len(run.val_loader.sampler))
    stamps: list[float] = []
    start = time.perf_counter()
    evaluate_loader(run.model, run.val_loader, len(run.class_names), run.device,
                    InferenceOptions(precision=str(t.precision)), run.ignore_index,
                    min(full, 1 + VAL_CALIBRATION_BATCHES),
                    on_prediction=lambda *_: stamps.append(time.perf_counter()))
    if not stamps:
        return time.perf_counter() - start
    first = min(t.val_batch_size, len(stamps))  # images of the first batch
    if len(stamps) == first:  # one batch in all
        return (stamps[-1] - start) * images / len(stamps)
    per_image = (stamps[-1] - stamps[first - 1]) / (len(stamps) - first)
    return stamps[first - 1] - start + per_image * max(images - first, 0)


@dataclass
class Calibration:
    iter_s: float
    val_s: float
    timed_steps: int
    seconds: float  # spent calibrating (warm-up and timed steps, validation batches)


def calibrate(run, budget_s: float, cap: int | None = None) -> Calibration:
    """Time a few real training steps and validation batches, then restore the model, optimizer,
    scaler and random state exactly: the run that follows is the one ``max_iters`` would give.
    ``cap``: the run's iteration limit, if any (no point timing more steps than it allows)."""
    from segexp.engine.trainer import optimizer_step, to_device, train_step

    start = time.perf_counter()
    saved = {"model": copy.deepcopy(run.model.state_dict()),
             "optimizer": copy.deepcopy(run.optimizer.state_dict()),
             "scaler": copy.deepcopy(run.scaler.state_dict()), "rng": rng_state()}
    t = run.options
    accumulate = t.accumulate_grad_batches
    steps, timed, timed_s, step_start = 0, 0, 0.0, None
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    done = False
    epoch = 0
    while not done:
        run.sampler.set_epoch(epoch)
        batches = 0
        for images, masks in run.train_loader:
            if step_start is None:
                step_start = time.perf_counter()
            images, masks = to_device(run, images, masks)
            batches += 1
            train_step(run, images, masks, sync_gradients=batches % accumulate == 0)
            if batches % accumulate:
                continue
            optimizer_step(run)
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            now = time.perf_counter()
            steps += 1
            if steps > WARMUP_STEPS:
                timed += 1
                timed_s += now - step_start
            step_start = now
            enough = timed >= MIN_TIMED_STEPS and timed_s >= CALIBRATION_FRACTION * budget_s
            # Every rank must run the same number of steps (DDP): rank 0 decides.
            most = MAX_TIMED_STEPS if cap is None else max(1, min(MAX_TIMED_STEPS, cap))
            done = bool(distributed.broadcast_object(enough or timed >= most))
            if done:
                break
        epoch += 1
    iter_s = timed_s / timed
    val_s = _validation_seconds(run)
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scaler.load_state_dict(saved["scaler"])
    run.optimizer.zero_grad(set_to_none=True)
    set_rng_state(saved["rng"])
    return Calibration(iter_s=iter_s, val_s=val_s, timed_steps=timed,
                       seconds=time.perf_counter() - start)
