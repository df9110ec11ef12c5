"""The training loop, in plain functions: ``train_step``, ``validate`` and ``fit`` (validation runs
:func:`segexp.inference.evaluate_loader`, the one evaluation loop).

Counting: an *iteration* is one optimizer step (``accumulate_grad_batches`` batches). The loop
stops after ``max_iters`` iterations or ``max_epochs`` epochs; each epoch uses the same number of
whole iterations, so a resumed run restarts on an iteration boundary with nothing half-done.

Distributed (``torchrun``, SLURM): every rank runs these functions on its share of the data;
``run.train_model`` is the DistributedDataParallel wrapper that averages gradients, ``run.model``
the plain module for evaluation and checkpoints. Values that decide what happens next (the
validation metrics, a non-finite loss) are reduced over ranks so all ranks decide alike; only
rank 0 has loggers and writes files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from segexp.data.sampler import ResumableSampler
from segexp.engine import budget, distributed
from segexp.engine.checkpoint import publish_copy, rng_state, save_checkpoint
from segexp.engine.options import TrainerOptions
from segexp.errors import ConfigError, TrainingError, TrainingInterrupted
from segexp.inference import InferenceOptions, evaluate_loader
from segexp.loggers import Logger
from segexp.models.mask_classification import MaskPredictions
from segexp.reports import save_confusion_matrix
from segexp.runtime import autocast
from segexp.visualize import prediction_grid, save_png

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters that a checkpoint stores so a resumed run continues where it stopped."""

    iter: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float = -math.inf
    best_iter: int = -1
    validations_since_best: int = 0
    total_iters: int = 0  # the run's length: the config's, or fixed early in a budget run
    planned: bool = True  # False while a budget run is still measuring its speed (total unknown)
    calibration_iters: int = 0  # a budget run's first iterations, timed to fix its length
    hold_iters: int = 0  # of which the schedule held the lr at its start (repeat: warmup_steps)
    rechecked: bool = False  # a budget run's speed measured again, once (budget.replan_run)
    replanned_at: int = 0  # a budget run re-planned its length at this iteration (0: never) ...
    replanned_from: int = 0  # ... from this count (the schedule: see segexp.engine.budget)
    validation_s: float = 0.0  # a budget run's estimate of one validation's time
    validations: int = budget.VALIDATIONS_PER_RUN  # spread over the run when val_interval is null
    train_time_s: float = 0.0  # in training steps (data loading included), validations excluded
    val_time_s: float = 0.0
    calibration_s: float = 0.0  # estimating a validation's time for trainer.max_time
    budget_used_s: float = 0.0  # wall-clock counted against trainer.max_time (kept on resume)
    stopped_by: str = ""  # why training ended before total_iters: early_stopping | time_limit
    last_results: dict[str, Any] = field(default_factory=dict)
    best_results: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass(frozen=True)
class Plan:
    """How the training data divides into iterations, from the options and the split's size:
    computed once (:func:`plan`) when the run is built."""

    batches_per_epoch: int  # batches each epoch uses (whole iterations only)
    iters_per_epoch: int
    limit: int | None  # the iteration limit the config sets; None: the time budget decides


def plan(options: TrainerOptions, samples_per_replica: int, world_size: int = 1) -> Plan:
    """The :class:`Plan` for a training split of which each process sees
    ``samples_per_replica`` samples. A pure function of its arguments."""
    t = options
    batches = samples_per_replica // t.batch_size
    if t.max_train_batches:
        batches = min(batches, t.max_train_batches)
    batches -= batches % t.accumulate_grad_batches
    if batches == 0:
        raise ConfigError(
            f"the training split has {samples_per_replica * world_size} samples, fewer than one "
            f"iteration needs (trainer.batch_size={t.batch_size} x "
            f"trainer.accumulate_grad_batches={t.accumulate_grad_batches}"
            + (f" x {world_size} processes" if world_size > 1 else "") + "). Lower them.")
    iters_per_epoch = batches // t.accumulate_grad_batches
    if t.max_iters is not None:
        limit = t.max_iters
    elif t.max_epochs is not None:
        limit = t.max_epochs * iters_per_epoch
    else:
        limit = None
    return Plan(batches_per_epoch=batches, iters_per_epoch=iters_per_epoch, limit=limit)


@dataclass
class Run:
    """Everything the loop works with, built once by
    :func:`segexp.engine.experiment.build_run`. Besides the parts, only loop state changes:
    ``state`` (the counters a checkpoint keeps), ``stop_signal`` and ``saved_weights_norm``."""

    model: nn.Module  # the plain module: evaluation, checkpoints, attributes
    train_model: nn.Module  # what training calls: DDP and/or torch.compile wrappers of `model`
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # None only in the benchmarks' runs, which have no schedule
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    sampler: ResumableSampler
    val_loader: DataLoader
    device: torch.device
    options: TrainerOptions
    plan: Plan
    run_dir: Path
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    loggers: list[Logger]
    metric: str = "mIoU"
    ignore_index: int = 255
    config_yaml: str = ""
    dist: distributed.DistInfo = field(default_factory=distributed.DistInfo)
    val_in_train: int = 0  # validation images the training split reads too (experiment.check_held_out)
    state: TrainState = field(default_factory=TrainState)
    stop_signal: str | None = None  # set by a signal handler: stop at the next iteration boundary
    saved_weights_norm: tuple[int, float] | None = None  # (iteration, norm) of the last checkpoint
    # A budget run still measuring its speed: the measurement, and (total, hold) -> the schedule
    # over the length it fixes (segexp.engine.budget.plan_run).
    calibration: budget.Calibration | None = None
    # A budget run that may still re-plan its length once (segexp.engine.budget.replan_run).
    recheck: budget.Recheck | None = None
    scheduler_for: Callable[..., Any] | None = None


# -- one step -----------------------------------------------------------------------------------
def to_device(run: Run, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch on the run's device (asynchronous from pinned memory), images in the
    model's memory format."""
    memory_format = torch.channels_last if run.options.channels_last else torch.contiguous_format
    return (images.to(run.device, non_blocking=True, memory_format=memory_format),
            masks.to(run.device, non_blocking=True))


def train_step(run: Run, images: torch.Tensor, masks: torch.Tensor,
               sync_gradients: bool = True) -> torch.Tensor:
    """Forward and backward for one batch; returns the (unscaled) loss. Gradients accumulate;
    ``sync_gradients=False`` skips DDP's all-reduce on batches that only accumulate."""
    skip_sync = not sync_gradients and hasattr(run.train_model, "no_sync")
    with run.train_model.no_sync() if skip_sync else contextlib.nullcontext():
        with autocast(run.device, run.options.precision):
            output = run.train_model(images, return_aux=True)
            loss = model_loss(run.criterion, run.model, output, masks)
        run.scaler.scale(loss / run.options.accumulate_grad_batches).backward()
    return loss.detach()


def model_loss(criterion: nn.Module, model: nn.Module, output, masks: torch.Tensor) -> torch.Tensor:
    """A mask-classification model's :class:`MaskPredictions` go to its criterion whole (it
    matches queries to classes and supervises every decoder layer itself); a per-pixel model's
    ``(logits, aux_logits)``, to the pixel loss, plus ``model.aux_weight`` x the loss of its
    auxiliary logits when it has an auxiliary head. Shared by the loop and the benchmarks."""
    if isinstance(output, MaskPredictions):
        return criterion(output, masks)
    logits, aux_logits = output
    loss = criterion(logits.float(), masks)
    if aux_logits is not None:
        # An auxiliary module may stack several heads' logits along the batch axis (SETR's
        # three): each slice is compared with the same ground truth.
        stacked = aux_logits.shape[0] // masks.shape[0]
        aux_masks = masks.repeat(stacked, 1, 1) if stacked > 1 else masks
        loss = loss + model.aux_weight * criterion(aux_logits.float(), aux_masks)
    return loss


def optimizer_step(run: Run) -> None:
    if run.options.grad_clip:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.options.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


# -- validation ---------------------------------------------------------------------------------
@dataclass
class Validation:
    """One validation's outcome, over the whole split (all ranks' shares summed)."""

    results: dict[str, Any]  # the metrics (per-class lists included)
    confusion: Any  # the confusion matrix, NumPy
    samples: list  # images drawn with predictions (rank 0)


def evaluate(run: Run) -> Validation:
    """The model over the validation split (:func:`segexp.inference.evaluate_loader`)."""
    t = run.options
    matrix, samples = evaluate_loader(run.model, run.val_loader, len(run.class_names), run.device,
                                      InferenceOptions(precision=t.precision),
                                      run.ignore_index, t.max_val_batches,
                                      t.num_vis_images if run.dist.is_main else 0,
                                      progress=t.progress_bar and run.dist.is_main)
    matrix.all_reduce()  # each rank saw its share of the split: sum to the whole split
    return Validation(matrix.compute(), matrix.mat.cpu().numpy(), samples)


def log_validation(run: Run, v: Validation) -> None:
    """To the loggers, and the prediction picture into the run folder."""
    for logger in run.loggers:
        logger.log_validation(v.results, run.state.iter, run.class_names, run.palette, v.samples,
                              v.confusion)
    if v.samples and run.dist.is_main:
        save_png(prediction_grid(v.samples, run.palette, run.class_names),
                 run.run_dir / "predictions" / f"iter_{run.state.iter:07d}.png")


def track_best(run: Run, v: Validation) -> bool:
    """Best-so-far bookkeeping (and a plateau schedule's step); True when this one is the best."""
    s = run.state
    score = v.results[run.metric]
    improved = score > s.best_metric
    if improved:
        s.best_metric, s.best_iter, s.validations_since_best = score, s.iter, 0
        s.best_results = v.results
    else:
        s.validations_since_best += 1
    s.last_results = v.results
    monitor = getattr(run.scheduler, "monitor", None)
    if monitor:  # ReduceLROnPlateau-style schedulers step on the validation metric
        run.scheduler.step(v.results[monitor])
    return improved


def save_checkpoints(run: Run, v: Validation, improved: bool) -> None:
    """``last.pt`` (after checking the weights), and ``best.pt`` with its confusion matrix when
    this validation is the best."""
    s = run.state
    check_weights(run)  # before last.pt is replaced: never overwrite good weights with diverged ones
    state = checkpoint_state(run)  # on every rank: it gathers their random generators
    last = run.run_dir / "checkpoints" / "last.pt"
    if not run.dist.is_main:
        return
    save_checkpoint(state, last)
    if improved:  # last.pt replaces its file on every save, so a link keeps this version
        publish_copy(last, run.run_dir / "checkpoints" / "best.pt")
        save_confusion_matrix(v.confusion, run.class_names, run.run_dir / "confusion_matrix.png",
                              f"confusion matrix, best validation (iteration {s.iter})")
    log.info(f"[iter {s.iter}] val {run.metric} {100 * v.results[run.metric]:.2f} (best "
             f"{100 * s.best_metric:.2f} at iter {s.best_iter}); saved {last}")


def should_stop_early(run: Run) -> bool:
    patience = run.options.early_stopping_patience
    return bool(patience) and run.state.validations_since_best >= patience


def validate(run: Run) -> bool:
    """Evaluate and log; keep the best, write the checkpoints; True when early stopping says stop.
    Its own time goes to ``val_time_s`` and ``budget_used_s`` (the checkpoint holds it)."""
    started = time.perf_counter()
    v = evaluate(run)
    log_validation(run, v)
    improved = track_best(run, v)
    charge(run.state, time.perf_counter() - started)  # so the checkpoint holds the time so far
    started = time.perf_counter()
    save_checkpoints(run, v, improved)
    charge(run.state, time.perf_counter() - started)
    return should_stop_early(run)


# Weights whose norm grew this much since the last checkpoint have diverged (a finite loss can
# hide it for a few steps); healthy training changes the norm by a small factor over a whole run.
DIVERGED_NORM_GROWTH = 1e3


def check_weights(run: Run) -> None:
    """Refuse to replace ``last.pt`` with weights that hold NaN/inf or whose norm exploded since
    the previous checkpoint; the error says which iteration ``last.pt`` still holds."""
    s = run.state
    params = [p.detach() for p in run.model.parameters()]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.float())
                                                      for p in params])))
    previous = run.saved_weights_norm
    finite = math.isfinite(norm)
    if finite and (previous is None or norm <= previous[1] * DIVERGED_NORM_GROWTH):
        run.saved_weights_norm = (s.iter, norm)
        return
    last = run.run_dir / "checkpoints" / "last.pt"
    kept = (f"{last} keeps iteration {previous[0]} (weight norm {previous[1]:.3g})"
            if previous is not None else "no checkpoint had been written yet")
    what = "hold NaN or infinite values" if not finite else \
        f"have diverged (norm {norm:.3g}, {norm / previous[1]:.0f}x the last checkpoint's)"
    raise TrainingError(f"at iteration {s.iter} the weights {what}; training stopped and {kept}. "
                        "Lower optimizer.lr, set trainer.grad_clip (e.g. 1.0), or check the data.")


def charge(s: TrainState, seconds: float) -> None:
    """Count validation time (it also counts against a time budget)."""
    s.val_time_s += seconds
    s.budget_used_s += seconds


def checkpoint_state(run: Run) -> dict[str, Any]:
    rng = rng_state()
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "state": run.state.state_dict(),
        "rng": rng,
        # Each rank's generators (dropout, drop-path differ per rank), for an exact resume.
        "rng_per_rank": distributed.all_gather_object(rng) if run.dist.enabled else [],
        "class_names": list(run.class_names),
        "config": run.config_yaml,
    }


# -- the loop -----------------------------------------------------------------------------------
class LogWindow:
    """The training loss, images and time since the last train-metric log line; :meth:`flush`
    logs them (the loss averaged over ranks and iterations) and starts the next window."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)  # on the device: no host sync per step
        self.restart()

    def restart(self) -> None:
        self.start, self.seconds, self.images, self.iters = time.perf_counter(), 0.0, 0, 0
        self.loss_sum.zero_()

    def pause(self) -> None:
        """Before a validation, which is not training time."""
        self.seconds += time.perf_counter() - self.start

    def resume(self) -> None:
        self.start = time.perf_counter()

    def add_iteration(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.iters += 1

    def flush(self, run: Run, bar: tqdm) -> None:
        s, t = run.state, run.options
        elapsed = self.seconds + time.perf_counter() - self.start
        distributed.all_reduce_(self.loss_sum, "mean")  # the loss over the global batch
        metrics = {"train/loss": self.loss_sum.item() / max(self.iters, 1),
                   "train/lr": run.optimizer.param_groups[0]["lr"],
                   "train/images_per_s": self.images * run.dist.world_size / max(elapsed, 1e-9),
                   "train/epoch": s.epoch}
        for logger in run.loggers:
            logger.log_metrics(metrics, s.iter)
        if run.dist.is_main and t.progress_bar:
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}",
                            img_s=f"{metrics['train/images_per_s']:.1f}")
        elif run.dist.is_main:  # plain lines for log files and clusters
            total = s.total_iters if s.planned else "?"
            log.info(f"[iter {s.iter}/{total}] loss {metrics['train/loss']:.4f} "
                     f"lr {metrics['train/lr']:.2e} {metrics['train/images_per_s']:.1f} img/s")
        s.train_time_s += elapsed
        self.restart()


class BudgetClock:
    """Wall-clock counted against ``trainer.max_time``: :meth:`charge` adds the time since the
    last charge (or :meth:`restart`) to ``state.budget_used_s``."""

    def __init__(self, state: TrainState) -> None:
        self.state = state
        self.restart()

    def restart(self) -> None:
        self.mark = time.perf_counter()

    def charge(self) -> None:
        now = time.perf_counter()
        self.state.budget_used_s += now - self.mark
        self.mark = now


def budget_overrun(run: Run, clock: BudgetClock) -> bool:
    """Whether the run has passed its budget by more than :func:`budget.overrun_limit` allows
    (the machine slowed down after the speed was measured): then it stops and says so. Rank 0's
    clock decides, so every rank stops at the same iteration."""
    s, t = run.state, run.options
    clock.charge()
    if not distributed.broadcast_object(s.budget_used_s > budget.overrun_limit(t.budget_s)):
        return False
    s.stopped_by = "time_limit"
    log.warning(f"[iter {s.iter}/{s.total_iters}] the time budget (trainer.max_time={t.max_time}) "
                f"is overrun: {budget.format_duration(s.budget_used_s)} used; stopping here, "
                "before the schedule ends (the machine ran slower than measured).")
    return True


def fit(run: Run) -> TrainState:
    """Train for ``run.state.total_iters`` iterations, unless early stopping triggers or the
    time budget is overrun (see :mod:`segexp.engine.budget`)."""
    t, s, p = run.options, run.state, run.plan
    val_every = validation_period(run)
    calibration = None if s.planned else run.calibration
    if calibration is not None:
        calibration.first_iter = s.iter
        calibration.restart()
    recheck = run.recheck
    if recheck is not None and s.planned:
        recheck.mark(s)
    clock = BudgetClock(s)
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    # A device-side record of the first non-finite loss: no host sync on every step.
    bad_step = torch.full((), -1, dtype=torch.long, device=run.device)
    window = LogWindow(run.device)
    bar = tqdm(total=s.total_iters if s.planned else None, initial=s.iter, desc="train", dynamic_ncols=True,
               disable=not (t.progress_bar and run.dist.is_main))
    stop = s.iter >= s.total_iters
    while not stop:
        run.sampler.set_epoch(s.epoch, start=s.batch_in_epoch * t.batch_size)
        for images, masks in run.train_loader:
            images, masks = to_device(run, images, masks)
            if hasattr(run.model, "set_progress"):  # a model whose training follows the
                run.model.set_progress(s.iter, s.total_iters)  # schedule (EoMT's mask annealing)
            last_of_step = (s.batch_in_epoch + 1) % t.accumulate_grad_batches == 0
            loss = train_step(run, images, masks, sync_gradients=last_of_step)
            s.batch_in_epoch += 1
            window.images += len(images)
            if s.batch_in_epoch % t.accumulate_grad_batches:
                continue
            bad_step = torch.where(torch.isfinite(loss) | (bad_step >= 0), bad_step,
                                   torch.full_like(bad_step, s.iter + 1))
            optimizer_step(run)
            s.iter += 1
            window.add_iteration(loss)
            bar.update(1)
            if run.scheduler.interval == "iter":  # a plateau schedule only warms up here
                run.scheduler.step()
            epoch_done = s.batch_in_epoch >= p.batches_per_epoch
            if epoch_done:
                s.epoch, s.batch_in_epoch = s.epoch + 1, 0
                if run.scheduler.interval == "epoch":
                    run.scheduler.step()
            if calibration is not None and calibration.iteration_done(run):
                clock.charge()
                budget.plan_run(run, calibration)  # the run's length is known from here
                clock.restart()
                if recheck is not None:
                    recheck.mark(s)
                calibration, val_every = None, validation_period(run)
                bar.total = s.total_iters
                bar.refresh()
            last_iter = s.iter >= s.total_iters
            at_log_step = s.iter % t.log_interval == 0
            if not last_iter and stop_requested(run, at_log_step):
                check_finite(run, bad_step)
                clock.charge()
                save_interrupted(run)
            if at_log_step and recheck is not None and s.planned and not last_iter:
                clock.charge()
                if recheck.due(s, t.budget_s):
                    if budget.replan_run(run, recheck):
                        val_every = validation_period(run)
                        bar.total = s.total_iters
                        bar.refresh()
                        last_iter = s.iter >= s.total_iters
                    if s.rechecked:
                        recheck = run.recheck = None
            if at_log_step and t.budget_s is not None and not last_iter:
                last_iter = budget_overrun(run, clock)
            if at_log_step or last_iter or epoch_done:
                check_finite(run, bad_step)
                window.flush(run, bar)
            due = (s.epoch % val_every == 0 and epoch_done) if t.by_epoch else \
                (s.iter % val_every == 0)
            if due or last_iter:
                check_finite(run, bad_step)
                clock.charge()  # the training time so far, so the checkpoint holds it
                window.pause()
                stop = validate(run)  # charges its own time
                if stop:
                    s.stopped_by = "early_stopping"
                window.resume()
                clock.restart()
                if recheck is not None:
                    recheck.validations += 1
                if calibration is not None:  # a validation is not a training step
                    calibration.restart()
            if stop or last_iter or epoch_done:
                stop = stop or last_iter
                break
    bar.close()
    return s


def validation_period(run: Run) -> int:
    """Validate every this many iterations (epochs with max_epochs): ``trainer.val_interval``, or
    ``state.validations`` spread over the run (none before a budget run's length is known)."""
    t, s, p = run.options, run.state, run.plan
    units = -(-s.total_iters // p.iters_per_epoch) if t.by_epoch else s.total_iters
    return budget.validation_every(t.val_interval, units, s.validations)


def stop_requested(run: Run, at_log_step: bool) -> bool:
    """Whether a stop signal arrived. In a distributed run every rank must stop at the same
    iteration, so the ranks agree (one all-reduce) at log steps only; a lone process checks
    after every iteration."""
    if not run.dist.enabled:
        return run.stop_signal is not None
    if not at_log_step:
        return False
    flag = torch.tensor(float(run.stop_signal is not None), device=run.device)
    return bool(distributed.all_reduce_(flag, "max").item() > 0)


def save_interrupted(run: Run) -> None:
    """Write ``last.pt`` at this iteration boundary (a resume continues exactly from it) and stop."""
    state = checkpoint_state(run)
    last = run.run_dir / "checkpoints" / "last.pt"
    if run.dist.is_main:
        save_checkpoint(state, last)
    raise TrainingInterrupted(
        f"{run.stop_signal or 'a stop signal'} received: training stopped after iteration "
        f"{run.state.iter} and saved {last}. Continue with: python train.py "
        f"hydra.run.dir={run.run_dir} resume=true")


def check_finite(run: Run, bad_step: torch.Tensor) -> None:
    # Any rank's non-finite loss stops every rank (one alone would leave the others waiting).
    step = int(distributed.all_reduce_(bad_step.clone(), "max").item())
    if step >= 0:
        last = run.run_dir / "checkpoints" / "last.pt"
        kept = f"The last good checkpoint is {last}." if last.exists() else \
            "No checkpoint had been written yet."
        raise TrainingError(
            f"the training loss became NaN or infinite at iteration {step} (epoch "
            f"{run.state.epoch}); training stopped. {kept} Lower optimizer.lr, set "
            "trainer.grad_clip (e.g. 1.0), or check the data and loss options.")
