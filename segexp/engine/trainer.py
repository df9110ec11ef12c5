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
    total_iters: int = 0  # the run's length, fixed before training (from the budget or the config)
    train_time_s: float = 0.0  # in training steps (data loading included), validations excluded
    val_time_s: float = 0.0
    calibration_s: float = 0.0  # measuring the speed for trainer.max_time
    budget_used_s: float = 0.0  # wall-clock counted against trainer.max_time (kept on resume)
    stopped_by: str = ""  # why training ended before total_iters: early_stopping | time_limit
    last_results: dict[str, Any] = field(default_factory=dict)
    best_results: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class Run:
    """Everything the loop works with, built by :func:`segexp.engine.experiment.build_run`."""

    model: nn.Module  # the plain module: evaluation, checkpoints, attributes
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    sampler: ResumableSampler
    val_loader: DataLoader
    device: torch.device
    trainer: Any  # the `trainer` config node
    run_dir: Path
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    loggers: list[Logger]
    metric: str = "mIoU"
    ignore_index: int = 255
    state: TrainState = field(default_factory=TrainState)
    config_yaml: str = ""
    budget_s: float | None = None  # trainer.max_time in seconds
    stop_signal: str | None = None  # set by a signal handler: stop at the next iteration boundary
    saved_weights_norm: tuple[int, float] | None = None  # (iteration, norm) of the last checkpoint
    train_model: nn.Module | None = None  # what training calls: DDP and/or torch.compile wrappers
    dist: distributed.DistInfo = field(default_factory=distributed.DistInfo)

    def __post_init__(self) -> None:
        if self.train_model is None:
            self.train_model = self.model


# -- one step -----------------------------------------------------------------------------------
def to_device(run: Run, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch on the run's device (asynchronous from pinned memory), images in the
    model's memory format."""
    memory_format = torch.channels_last if run.trainer.get("channels_last") else torch.contiguous_format
    return (images.to(run.device, non_blocking=True, memory_format=memory_format),
            masks.to(run.device, non_blocking=True))


def train_step(run: Run, images: torch.Tensor, masks: torch.Tensor,
               sync_gradients: bool = True) -> torch.Tensor:
    """Forward and backward for one batch; returns the (unscaled) loss. Gradients accumulate;
    ``sync_gradients=False`` skips DDP's all-reduce on batches that only accumulate."""
    skip_sync = not sync_gradients and hasattr(run.train_model, "no_sync")
    with run.train_model.no_sync() if skip_sync else contextlib.nullcontext():
        return _forward_backward(run, images, masks)


def _forward_backward(run: Run, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    with autocast(run.device, run.trainer.precision):
        loss = model_loss(run.criterion, run.model, run.train_model(images, return_aux=True), masks)
    run.scaler.scale(loss / run.trainer.accumulate_grad_batches).backward()
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
    if run.trainer.grad_clip:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.trainer.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


# -- evaluation ---------------------------------------------------------------------------------
def validate(run: Run) -> bool:
    """Evaluate, log, write checkpoints and a prediction picture. Returns True to stop early.
    Its own time goes to ``val_time_s`` and ``budget_used_s``."""
    t, s = run.trainer, run.state
    started = time.perf_counter()
    matrix, samples = evaluate_loader(run.model, run.val_loader, len(run.class_names), run.device,
                                      InferenceOptions(precision=str(t.precision)),
                                      run.ignore_index, t.max_val_batches,
                                      t.num_vis_images if run.dist.is_main else 0,
                                      progress=t.progress_bar and run.dist.is_main)
    matrix.all_reduce()  # each rank saw its share of the split: sum to the whole split
    results = matrix.compute()
    confusion = matrix.mat.cpu().numpy()
    for logger in run.loggers:
        logger.log_validation(results, s.iter, run.class_names, run.palette, samples, confusion)
    if samples and run.dist.is_main:
        save_png(prediction_grid(samples, run.palette, run.class_names),
                 run.run_dir / "predictions" / f"iter_{s.iter:07d}.png")
    score = results[run.metric]
    improved = score > s.best_metric
    if improved:
        s.best_metric, s.best_iter, s.validations_since_best = score, s.iter, 0
        s.best_results = results
    else:
        s.validations_since_best += 1
    s.last_results = results
    monitor = getattr(run.scheduler, "monitor", None)
    if monitor:  # ReduceLROnPlateau-style schedulers step on the validation metric
        run.scheduler.step(results[monitor])
    charge(s, time.perf_counter() - started)  # so the checkpoint holds the time so far
    started = time.perf_counter()
    check_weights(run)  # before last.pt is replaced: never overwrite good weights with diverged ones
    state = checkpoint_state(run)  # on every rank: it gathers their random generators
    last = run.run_dir / "checkpoints" / "last.pt"
    if run.dist.is_main:
        save_checkpoint(state, last)
        if improved:  # last.pt replaces its file on every save, so a link keeps this version
            publish_copy(last, run.run_dir / "checkpoints" / "best.pt")
            save_confusion_matrix(confusion, run.class_names, run.run_dir / "confusion_matrix.png",
                                  f"confusion matrix, best validation (iteration {s.iter})")
    if run.dist.is_main:
        log.info(f"[iter {s.iter}] val {run.metric} {100 * score:.2f} (best "
                 f"{100 * s.best_metric:.2f} at iter {s.best_iter}); saved {last}")
    charge(s, time.perf_counter() - started)
    patience = t.early_stopping_patience
    return bool(patience) and s.validations_since_best >= patience


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
def plan(run: Run) -> tuple[int, int | None]:
    """(batches used per epoch, the iteration limit the config sets) from the trainer config and
    the data. The limit is ``None`` for a time budget (``trainer.max_time``) with no iteration
    or epoch cap: the budget then decides (:mod:`segexp.engine.budget`)."""
    t = run.trainer
    batches = run.sampler.samples_per_replica // t.batch_size
    if t.max_train_batches:
        batches = min(batches, t.max_train_batches)
    batches -= batches % t.accumulate_grad_batches
    if batches == 0:
        raise ConfigError(
            f"the training split has {len(run.train_loader.dataset)} samples, fewer than one "
            f"iteration needs (trainer.batch_size={t.batch_size} x "
            f"trainer.accumulate_grad_batches={t.accumulate_grad_batches}"
            + (f" x {run.dist.world_size} processes" if run.dist.enabled else "") + "). Lower them.")
    timed = t.get("max_time") is not None
    if t.max_iters is not None and t.max_epochs is not None:
        raise ConfigError("set one of trainer.max_iters and trainer.max_epochs, not both "
                          f"(got max_iters={t.max_iters}, max_epochs={t.max_epochs}).")
    if t.max_iters is None and t.max_epochs is None and not timed:
        raise ConfigError("set how long to train: trainer.max_time (e.g. 20m), "
                          "trainer.max_iters or trainer.max_epochs.")
    iters_per_epoch = batches // t.accumulate_grad_batches
    if t.max_iters is not None:
        limit = int(t.max_iters)
    elif t.max_epochs is not None:
        limit = int(t.max_epochs) * iters_per_epoch
    else:
        limit = None
    return batches, limit


def fit(run: Run) -> TrainState:
    """Train for ``run.state.total_iters`` iterations, unless early stopping triggers or the
    time budget is overrun (see :mod:`segexp.engine.budget`)."""
    t, s = run.trainer, run.state
    batches_per_epoch, _ = plan(run)
    total_iters = s.total_iters
    by_epoch = t.max_epochs is not None
    iters_per_epoch = batches_per_epoch // t.accumulate_grad_batches
    val_every = budget.validation_every(
        t.val_interval, -(-total_iters // iters_per_epoch) if by_epoch else total_iters)
    # Wall-clock counted against trainer.max_time: what earlier segments used, plus this one's.
    budget_mark = time.perf_counter()

    def charge_budget() -> None:
        nonlocal budget_mark
        now = time.perf_counter()
        s.budget_used_s += now - budget_mark
        budget_mark = now

    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    # A device-side record of the first non-finite loss: no host sync on every step.
    bad_step = torch.full((), -1, dtype=torch.long, device=run.device)
    loss_sum = torch.zeros((), device=run.device)
    window_start, window_images, window_iters = time.perf_counter(), 0, 0
    bar = tqdm(total=total_iters, initial=s.iter, desc="train", dynamic_ncols=True,
               disable=not (t.progress_bar and run.dist.is_main))
    stop = s.iter >= total_iters
    while not stop:
        run.sampler.set_epoch(s.epoch, start=s.batch_in_epoch * t.batch_size)
        for images, masks in run.train_loader:
            images, masks = to_device(run, images, masks)
            if hasattr(run.model, "set_progress"):  # a model whose training follows the
                run.model.set_progress(s.iter, total_iters)  # schedule (EoMT's mask annealing)
            last_of_step = (s.batch_in_epoch + 1) % t.accumulate_grad_batches == 0
            loss = train_step(run, images, masks, sync_gradients=last_of_step)
            s.batch_in_epoch += 1
            window_images += len(images)
            if s.batch_in_epoch % t.accumulate_grad_batches:
                continue
            bad_step = torch.where(torch.isfinite(loss) | (bad_step >= 0), bad_step,
                                   torch.full_like(bad_step, s.iter + 1))
            optimizer_step(run)
            s.iter += 1
            loss_sum += loss
            window_iters += 1
            bar.update(1)
            if run.scheduler.interval == "iter":  # a plateau schedule only warms up here
                run.scheduler.step()
            epoch_done = s.batch_in_epoch >= batches_per_epoch
            if epoch_done:
                s.epoch, s.batch_in_epoch = s.epoch + 1, 0
                if run.scheduler.interval == "epoch":
                    run.scheduler.step()
            last_iter = s.iter >= total_iters
            if not last_iter and stop_requested(run, s.iter % t.log_interval == 0):
                check_finite(run, bad_step)
                charge_budget()
                save_interrupted(run)
            if s.iter % t.log_interval == 0 and run.budget_s is not None and not last_iter:
                charge_budget()
                # The estimate was far off (the machine slowed down): stop at the limit. Rank 0's
                # clock decides, so every rank stops at the same iteration.
                if distributed.broadcast_object(s.budget_used_s > budget.overrun_limit(run.budget_s)):
                    last_iter, s.stopped_by = True, "time_limit"
                    log.warning(f"[iter {s.iter}/{total_iters}] the time budget "
                                f"(trainer.max_time={t.max_time}) is overrun: "
                                f"{budget.format_duration(s.budget_used_s)} used; stopping here, "
                                "before the schedule ends (the machine ran slower than measured).")
            if s.iter % t.log_interval == 0 or last_iter or epoch_done:
                check_finite(run, bad_step)
                elapsed = time.perf_counter() - window_start
                distributed.all_reduce_(loss_sum, "mean")  # the loss over the global batch
                metrics = {"train/loss": loss_sum.item() / window_iters,
                           "train/lr": run.optimizer.param_groups[0]["lr"],
                           "train/images_per_s": window_images * run.dist.world_size
                           / max(elapsed, 1e-9),
                           "train/epoch": s.epoch}
                for logger in run.loggers:
                    logger.log_metrics(metrics, s.iter)
                if run.dist.is_main and t.progress_bar:
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}",
                                    lr=f"{metrics['train/lr']:.2e}",
                                    img_s=f"{metrics['train/images_per_s']:.1f}")
                elif run.dist.is_main:  # plain lines for log files and clusters
                    log.info(f"[iter {s.iter}/{total_iters}] loss {metrics['train/loss']:.4f} "
                             f"lr {metrics['train/lr']:.2e} {metrics['train/images_per_s']:.1f} img/s")
                s.train_time_s += elapsed
                loss_sum.zero_()
                window_start, window_images, window_iters = time.perf_counter(), 0, 0
            due = (s.epoch % val_every == 0 and epoch_done) if by_epoch else \
                (s.iter % val_every == 0)
            if due or last_iter:
                check_finite(run, bad_step)
                charge_budget()  # the training time so far, so the checkpoint holds it
                stop = validate(run)  # charges its own time
                if stop:
                    s.stopped_by = "early_stopping"
                window_start = budget_mark = time.perf_counter()  # validation is not training
            if stop or last_iter or epoch_done:
                stop = stop or last_iter
                break
    bar.close()
    return s


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
