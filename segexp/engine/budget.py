"""A training budget in wall-clock time (``trainer.max_time``).

The run is still scheduled by iterations, so it stays reproducible. Its first iterations are real
training steps, timed as they run (data loading, logging and all): once they fill
:data:`CALIBRATION_FRACTION` of the budget (at least :data:`MIN_TIMED_STEPS` after
:data:`WARMUP_STEPS` untimed ones; longer while they still get faster), one validation's time is
estimated from a few batches, and the
iteration count that fills the rest of the budget is fixed, recorded in the checkpoints and the
summary; the learning-rate schedule then runs over it and reaches its floor when the time is up.
So that nothing those first iterations did depends on the count not yet known, their learning
rate must not depend on it: they run inside the config's warmup (ending there at the latest), or
inside the first epoch for a schedule stepped per epoch, or else the schedule *holds* the lr at
its start for them (``scheduler.warmup_steps=<W> scheduler.warmup_start_factor=1``: a warmup that
starts at the full lr), then decays over the rest. The log line and ``metrics.json``
(``budget.repeat``) give the overrides that repeat the run exactly, e.g. ``trainer.max_time=null
trainer.max_iters=1119 scheduler.warmup_steps=23 scheduler.warmup_start_factor=1``. A resumed run
keeps the recorded count and the time already spent (a run stopped before its count was fixed
measures again where it resumed).

The speed can change after it was measured (another job starts beside the run, or was starting
while the speed was measured): once :data:`REPLAN_AT` of the budget is used, it is measured again
on the iterations since the plan and, where the count that fills the budget has moved by more
than :data:`REPLAN_TOLERANCE`, the run takes the new count once (:func:`replan_run`): the lr
schedule so far is unchanged and its rest is stretched or compressed evenly to end there
(``scheduler.replanned_at`` / ``replanned_from``, which ``budget.repeat`` then names too). A
gross misjudgement (more than :data:`EARLY_REPLAN_TOLERANCE`) is corrected earlier, at
:data:`EARLY_REPLAN_AT` of the budget, before the lr has decayed as for the wrong length; that is
then the run's one re-plan. Iteration-stepped poly, cosine and step schedules re-plan; others, and
EoMT (:func:`can_replan`), keep the first plan.

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

import logging
import math
import re
import time
from dataclasses import dataclass, field

import torch

from segexp.engine import distributed
from segexp.errors import ConfigError

log = logging.getLogger(__name__)

# Stop hard once the budget is passed by this fraction, and at least OVERRUN_MIN_S (the estimate
# was badly off: the machine slowed down; short budgets have noisy fixed costs).
OVERRUN_GRACE = 0.10
OVERRUN_MIN_S = 30.0


def overrun_limit(budget_s: float) -> float:
    """Seconds after which a run with this budget stops, whatever its plan."""
    return budget_s + max(OVERRUN_GRACE * budget_s, OVERRUN_MIN_S)
# Calibration: untimed warm-up iterations (first-call costs: kernels, loader workers), then timed
# ones until this fraction of the budget is spent, at least MIN_TIMED_STEPS, at most MAX_TIMED_STEPS.
WARMUP_STEPS = 2
CALIBRATION_FRACTION = 0.02
MIN_TIMED_STEPS = 6  # enough to compare their earlier and later halves
MAX_TIMED_STEPS = 200
# While the later half of the timed iterations runs faster than the earlier half by more than
# this, the machine is still warming up (measured: a run started beside another one went from 6.9
# to 9.7 images/s over its first 100 iterations and planned for 893 s of its 1200): measure on, up
# to MAX_CALIBRATION_FRACTION of the budget. The estimate is the later half's mean.
SPEEDUP_TOLERANCE = 0.03
MAX_CALIBRATION_FRACTION = 0.10
VAL_CALIBRATION_BATCHES = 2
# The machine's speed can change after it was measured (another job started beside the run): once
# REPLAN_AT of the budget is used, the speed since the plan is measured again and, where the
# count that fills the budget differs by more than REPLAN_TOLERANCE of the iterations left, the
# run takes it (measured: a run started beside another averaged 3.0 s per iteration where its
# first ones took 2.84, and used 1253 s of a 1200 s budget without a re-plan).
REPLAN_AT = 0.4
REPLAN_TOLERANCE = 0.02
# A count off by more than EARLY_REPLAN_TOLERANCE is corrected already at EARLY_REPLAN_AT of the
# budget (measured: a run whose first 8 iterations shared its core with another run's start-up
# took 4.65 s each, then 3.02: it planned 244 iterations, and by its re-plan to 354 at 40 % its lr
# had decayed as for 244).
EARLY_REPLAN_AT = 0.1
EARLY_REPLAN_TOLERANCE = 0.1
REPLAN_MIN_STEPS = 2 * MIN_TIMED_STEPS
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


def validations_in(iters: int, val_every: int | None, count: int = VALIDATIONS_PER_RUN,
                   start: int = 0) -> int:
    """Validations a run of ``iters`` iterations does after iteration ``start``: every
    ``val_every`` (None: ``count`` spread as :func:`validation_every`) and always at the end."""
    val_every = validation_every(val_every, iters, count)
    return iters // val_every - start // val_every + (1 if iters % val_every else 0)


def fit_iterations(remaining_s: float, iter_s: float, val_s: float, val_every: int | None,
                   cap: int | None = None, count: int = VALIDATIONS_PER_RUN, start: int = 0) -> int:
    """The largest number of iterations after ``start`` whose training and validations fit in
    ``remaining_s`` (at least 1, at most ``cap``); ``val_every=None``: ``count`` of them, spread
    over the whole run."""

    def cost(n: int) -> float:
        return n * iter_s + validations_in(start + n, val_every, count, start) * val_s

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


# The run's length while it is not yet known: a schedule built over this many iterations holds
# its start for any run (a run under an iteration cap uses the cap).
UNKNOWN_LENGTH = 10**9


@dataclass
class Calibration:
    """The speed measurement on a budget run's first iterations (see the module's docstring).
    ``last_iter``: the iteration it must end at, at the latest (the end of the config's warmup
    or of the first epoch, or the run's cap); ``hold``: the schedule holds its start meanwhile;
    ``rebuild``: the schedule depends on the run's length (not a plateau one), so it is built
    again over the count once it is known."""

    budget_s: float
    last_iter: int | None
    hold: bool
    rebuild: bool
    first_iter: int = 0  # where timing began (a resumed run measures again)
    durations: list[float] = field(default_factory=list)  # of the timed iterations
    mark: float | None = None

    def restart(self) -> None:
        """After a validation or other work that is not a training step."""
        self.mark = time.perf_counter()

    def iteration_done(self, run) -> bool:
        """Time the iteration just finished; True when the measurement is complete (rank 0
        decides for every rank: all must plan at the same iteration)."""
        if run.device.type == "cuda":  # the steps run asynchronously: time what they took
            torch.cuda.synchronize(run.device)
        now = time.perf_counter()
        done_here = run.state.iter - self.first_iter
        span = None if self.last_iter is None else self.last_iter - self.first_iter
        untimed = WARMUP_STEPS if span is None else min(WARMUP_STEPS, max(span - 1, 0))
        if done_here > untimed and self.mark is not None:
            self.durations.append(now - self.mark)
        self.mark = now
        timed, seconds = len(self.durations), sum(self.durations)
        enough = timed >= MIN_TIMED_STEPS and seconds >= CALIBRATION_FRACTION * self.budget_s
        if enough and self.warming_up() and seconds < MAX_CALIBRATION_FRACTION * self.budget_s:
            enough = False
        at_end = self.last_iter is not None and run.state.iter >= self.last_iter
        return bool(distributed.broadcast_object(enough or at_end or timed >= MAX_TIMED_STEPS))

    def warming_up(self) -> bool:
        """Whether the later half of the timed iterations ran clearly faster than the earlier."""
        d = self.durations
        if len(d) < MIN_TIMED_STEPS:
            return False
        half = len(d) // 2
        return sum(d[half:]) / (len(d) - half) < (1 - SPEEDUP_TOLERANCE) * sum(d[:half]) / half

    @property
    def iter_s(self) -> float:
        """Seconds per iteration: the later half's mean once there are enough (a warm-up that
        lasted into the timed iterations does not count), else all of them."""
        d = self.durations
        if len(d) >= MIN_TIMED_STEPS:
            d = d[len(d) // 2:]
        return sum(d) / max(len(d), 1)


def repeat_overrides(state, by_epoch: bool = False) -> str:
    """The overrides that repeat a planned budget run exactly."""
    line = f"trainer.max_time=null trainer.max_iters={state.total_iters}"
    if by_epoch:
        line += " trainer.max_epochs=null"
    if state.hold_iters:
        line += f" scheduler.warmup_steps={state.hold_iters} scheduler.warmup_start_factor=1"
    if state.replanned_at:
        line += (f" scheduler.replanned_at={state.replanned_at} "
                 f"scheduler.replanned_from={state.replanned_from}")
    return line


def can_replan(scheduler_cfg, model) -> bool:
    """Whether a budget run with this schedule and model re-plans (:class:`Recheck`): a schedule
    stepped per iteration whose rest can be stretched (poly, cosine, step; not EoMT's two-stage
    warmup), and a model whose training does not follow the run's length itself (EoMT's mask
    annealing would jump, and its repeat would differ). Others keep their first plan (the
    overrun stop guards)."""
    return (str(scheduler_cfg.get("name")) in ("poly", "cosine", "step")
            and str(scheduler_cfg.get("interval", "iter")) == "iter"
            and not int(scheduler_cfg.get("backbone_warmup_steps") or 0)
            and not hasattr(model, "set_progress"))


def _validation_every_iters(run) -> int | None:
    """``trainer.val_interval`` in iterations (None: validations spread over the run)."""
    t = run.options
    if t.val_interval is None:
        return None
    return t.val_interval * (run.plan.iters_per_epoch if t.by_epoch else 1)


@dataclass
class Recheck:
    """The one re-plan of a budget run: once :data:`EARLY_REPLAN_AT` and again once
    :data:`REPLAN_AT` of the budget is used, the speed is measured on the iterations since the
    plan (or since a resume) and the count refitted to the time left (:func:`replan_run`), at
    most once (``state.rechecked`` then)."""

    after: int = 0  # the config's warmup: the schedule's rest begins there, so no re-plan before
    iter: int = 0  # where this measurement began
    used_s: float = 0.0  # budget used then
    val_time_s: float = 0.0  # validation time then
    validations: int = 0  # done since
    early_checked: bool = False

    def mark(self, state) -> None:
        self.iter, self.used_s, self.val_time_s = state.iter, state.budget_used_s, state.val_time_s
        self.validations = 0

    def due(self, state, budget_s: float) -> bool:
        """Rank 0 decides for every rank (all must re-plan at the same iteration)."""
        at = REPLAN_AT if self.early_checked else EARLY_REPLAN_AT
        ready = (state.budget_used_s >= at * budget_s and state.iter >= self.after
                 and state.iter - self.iter >= REPLAN_MIN_STEPS)
        return bool(distributed.broadcast_object(ready))

    def tolerance(self, state, budget_s: float) -> float:
        """How far the count may move before this check re-plans (the early check: only a
        gross misjudgement)."""
        return REPLAN_TOLERANCE if state.budget_used_s >= REPLAN_AT * budget_s \
            else EARLY_REPLAN_TOLERANCE

    def speeds(self, state) -> tuple[float, float]:
        """Seconds per training iteration and per validation, measured since :meth:`mark` (a
        validation's: the plan's estimate until one has run)."""
        val_s = state.val_time_s - self.val_time_s
        iter_s = (state.budget_used_s - self.used_s - val_s) / max(state.iter - self.iter, 1)
        return iter_s, (val_s / self.validations if self.validations else state.validation_s)


def replan_run(run, recheck: Recheck) -> bool:
    """Refit the run's length to the time left, at the speed measured since ``recheck``'s mark;
    where it differs from the plan by more than :data:`REPLAN_TOLERANCE` of the iterations
    left, the schedule's rest is stretched (or compressed) to end there and the re-plan
    recorded for the repeat. True when the length changed."""
    s, t, p = run.state, run.options, run.plan
    tolerance = recheck.tolerance(s, t.budget_s)
    iter_s, val_s = recheck.speeds(s)
    val_every = _validation_every_iters(run)
    left = None if p.limit is None else p.limit - s.iter
    count = s.iter + fit_iterations(t.budget_s - s.budget_used_s, iter_s, val_s, val_every,
                                    cap=left, count=s.validations, start=s.iter)
    count = int(distributed.broadcast_object(count))
    planned_left = s.total_iters - s.iter
    if abs(count - s.total_iters) <= tolerance * planned_left:
        recheck.early_checked = True
        s.rechecked = tolerance == REPLAN_TOLERANCE  # the last check: no more
        if s.rechecked:
            log.info(f"[iter {s.iter}/{s.total_iters}] time budget: {iter_s:.3g} s per iteration "
                     f"since iteration {recheck.iter}, as planned; keeping the count.")
        return False
    s.rechecked = True
    s.replanned_at, s.replanned_from, s.total_iters = s.iter, s.total_iters, count
    run.scheduler = run.scheduler_for(s.total_iters, s.hold_iters, (s.replanned_at, s.replanned_from))
    for _ in range(s.iter):  # closed-form factors: the learning rates so far, unchanged
        run.scheduler.step()
    how = "compressed" if count < s.replanned_from else "stretched"
    log.info(f"[iter {s.iter}] time budget re-planned: {iter_s:.3g} s per iteration since iteration "
             f"{recheck.iter} ({format_duration(s.budget_used_s)} of "
             f"{format_duration(t.budget_s)} used), so {s.total_iters} iterations instead of "
             f"{s.replanned_from}; the rest of the lr schedule {how} to end there. To repeat "
             f"this run exactly: {repeat_overrides(s, t.by_epoch)}.")
    return True


def plan_run(run, calibration: Calibration) -> None:
    """Fix the run's length from ``calibration`` (at the iteration it ended): one validation's
    time estimated, the count that fills the rest of the budget recorded, the schedule rebuilt
    over it and brought to this iteration (the same learning rates so far), logged."""
    s, t, p = run.state, run.options, run.plan
    started = time.perf_counter()
    val_s = _validation_seconds(run)
    run.model.train()
    spent = time.perf_counter() - started
    s.calibration_s += spent
    s.budget_used_s += spent
    val_every = _validation_every_iters(run)
    if val_every is None:
        s.validations = validations_for_budget(t.budget_s, val_s)
    left = None if p.limit is None else p.limit - s.iter
    count = s.iter
    if left is None or left > 0:
        count += fit_iterations(t.budget_s - s.budget_used_s, calibration.iter_s, val_s, val_every,
                                cap=left, count=s.validations, start=s.iter)
    s.validation_s = val_s
    s.total_iters = int(distributed.broadcast_object(count))  # rank 0 decides for every rank
    s.planned, s.calibration_iters = True, s.iter
    # (a cap reached while measuring: the hold stops one short of the end, as it did meanwhile)
    s.hold_iters = min(s.iter, s.total_iters - 1) if calibration.hold else 0
    if calibration.rebuild:
        steps = s.iter if run.scheduler.interval == "iter" else s.epoch
        run.scheduler = run.scheduler_for(s.total_iters, s.hold_iters)
        for _ in range(steps):  # closed-form factors: the learning rates the repeat run has
            run.scheduler.step()
    if s.total_iters == s.iter and p.limit != s.iter and t.budget_s - s.budget_used_s < calibration.iter_s:
        log.warning(f"trainer.max_time={t.max_time} leaves no time for training after set-up and "
                    f"speed measurement ({format_duration(s.budget_used_s)}); stopping after "
                    f"{s.iter} iteration(s). Give a longer budget.")
    images = s.total_iters * t.batch_size * t.accumulate_grad_batches * run.dist.world_size
    log.info(f"Time budget {format_duration(t.budget_s)}: {calibration.iter_s:.3g} s per iteration "
             f"(measured on iterations {calibration.first_iter + 1}-{s.iter}), about "
             f"{format_duration(val_s)} per validation; training for {s.total_iters} iterations "
             f"({images} images)"
             + (f", {s.validations} validation(s) spread over them" if val_every is None else "")
             + (", capped by trainer.max_iters / max_epochs" if p.limit == s.total_iters else "")
             + (f"; the lr held at its start for the first {s.hold_iters}" if s.hold_iters else "")
             + f". To repeat this run exactly: {repeat_overrides(s, t.by_epoch)}.")
