"""Turns a composed config into a run: builds data, model, optimiser and loggers, resumes if
asked, trains, and writes the run folder's summary. ``train.py`` is a thin wrapper around
:func:`run_training`."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from segexp.atomic import write_json, write_text
from segexp.config import instantiate, model_label
from segexp.data.base import pad_collate
from segexp.data.overlap import validation_images_in_training
from segexp.data.sampler import ContiguousShardSampler, ResumableSampler
from segexp.data.scan import base_dataset, scan_masks
from segexp.engine import budget, distributed
from segexp.engine.checkpoint import resolve_resume, set_rng_state
from segexp.engine.launch import Launch
from segexp.engine.options import TrainerOptions
from segexp.engine.trainer import Plan, Run, TrainState, fit, plan
from segexp.errors import ConfigError, DataError, TrainingInterrupted
from segexp.loggers import JsonlLogger, RunInfo, build_loggers
from segexp.loggers.base import json_safe
from segexp.losses import resolve_auto_class_weights
from segexp.metrics import format_table
from segexp.models import build_model
from segexp.models.mask_classification import is_mask_classification
from segexp.profiling import count_gflops, count_params, measure_fps
from segexp.reports import write_run_pictures
from segexp.runtime import (
    autocast,
    quiet_worker_init,
    resolve_device,
    seed_everything,
)
from segexp.weights_io import load_weights_into, read_weights_file

log = logging.getLogger(__name__)


def wrap_for_training(model: torch.nn.Module, t: TrainerOptions, device: torch.device,
                      dist: distributed.DistInfo) -> torch.nn.Module:
    """What the training step calls: DistributedDataParallel across processes, then
    ``torch.compile`` if asked. Evaluation and checkpoints keep using the plain module."""
    train_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=t.find_unused_parameters)
    if t.compile:
        mode = None if t.compile is True else str(t.compile)
        train_model = torch.compile(train_model, mode=mode, backend=t.compile_backend)
    return train_model


def build_datasets(cfg: DictConfig):
    """The train and val sets. A dataset that infers its class count (``dataset.num_classes:
    null``, e.g. ``dataset=folder`` without class names) writes it into ``cfg.dataset``, so the
    val set and the model (``model.num_classes: ${dataset.num_classes}``) are built with it."""
    train_set = instantiate(cfg.dataset, split="train", transforms=instantiate(cfg.transforms.train))
    if cfg.dataset.get("num_classes", 0) is None:
        with open_dict(cfg):
            cfg.dataset.num_classes = train_set.num_classes
    if cfg.transforms.get("mix"):  # CutMix / ClassMix: pairs of augmented training samples
        train_set = instantiate(cfg.transforms.mix)(train_set)
    val_set = instantiate(cfg.dataset, split="val", transforms=instantiate(cfg.transforms.val))
    for split, dataset in (("train", train_set), ("val", val_set)):
        if len(dataset) == 0:
            raise DataError(f"the {split} split of dataset '{type(dataset).__name__}' is empty "
                            f"(dataset.root={cfg.dataset.get('root')}). Check the folder layout.")
    return train_set, val_set


SCALAR_METRICS = ("mIoU", "aAcc", "mAcc", "mDice")


def check_compatible(cfg: DictConfig, options: TrainerOptions, model, dataset) -> None:
    """Mismatches that would otherwise surface as shape errors deep in training."""
    if cfg.metric not in SCALAR_METRICS:
        raise ConfigError(f"metric={cfg.metric} is not a validation metric; choose one of "
                          f"{', '.join(SCALAR_METRICS)}.")
    # BatchNorm after global pooling (PSP / ASPP image-pool branches) sees one value per channel
    # and cannot train on a batch of one; other BatchNorms average over pixels and can.
    pools_to_one_pixel = any(isinstance(m, torch.nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
                             for m in model.modules())
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if options.batch_size < 2 and has_batchnorm and pools_to_one_pixel:
        raise ConfigError("trainer.batch_size=1: the model has BatchNorm layers after global "
                          "pooling (PSP / ASPP branches), which cannot train on a batch of one. Use "
                          "trainer.batch_size>=2, or trainer.accumulate_grad_batches to save memory.")
    if model.num_classes != dataset.num_classes:
        raise ConfigError(
            f"the model predicts {model.num_classes} classes (model.num_classes) but the dataset "
            f"has {dataset.num_classes} ({', '.join(dataset.class_names)}). Leave "
            "model.num_classes=${dataset.num_classes} or set both to the same value.")
    crop = cfg.dataset.get("crop_size")
    divisor = model.size_divisor
    if crop is not None and any(int(side) % divisor for side in crop):
        raise ConfigError(
            f"dataset.crop_size={list(crop)} is not a multiple of {divisor}, which backbone "
            f"'{cfg.backbone.get('name', cfg.backbone._target_)}' needs. Use e.g. "
            f"dataset.crop_size=[{_round(crop[0], divisor)},{_round(crop[1], divisor)}].")


def _loss_name(cfg: DictConfig, launch: Launch) -> str:
    choice = launch.choice("loss")
    return f"loss={choice}" if choice else f"loss._target_={cfg.loss.get('_target_')}"


def _model_name(cfg: DictConfig, launch: Launch) -> str:
    """``model=X``, with the head when it is not the model's own (``head=Y`` or a head given
    key by key); the head's ``_target_`` for a config built in code."""
    model, head = launch.choice("model"), launch.choice("head")
    target = f"head._target_={(cfg.get('head') or {}).get('_target_')}"
    if model is None:
        return target
    if head == model:
        return f"model={model}"
    return f"model={model} with " + (f"head={head}" if head else target)


def loss_is_mask_classification(loss_cfg: DictConfig) -> bool:
    """Whether the loss config builds a mask-classification criterion (its class says
    ``mask_classification = True``), read from ``_target_`` without building it."""
    target = loss_cfg.get("_target_")
    if not target:
        return False
    try:
        loss_class = get_class(str(target))
    except Exception:  # a wrong _target_ is reported when the loss is built
        return False
    return bool(getattr(loss_class, "mask_classification", False))


def check_loss_fits_model(cfg: DictConfig, model, launch: Launch | None = None) -> None:
    """A mask-classification model (MaskFormer, Mask2Former, EoMT: it predicts queries' classes
    and masks) trains only with the mask criterion, and a per-pixel model only with a per-pixel
    loss; either mismatch would fail inside the first step, so it is refused here."""
    model_is_mask = is_mask_classification(model)
    loss_is_mask = loss_is_mask_classification(cfg.loss)
    launch = launch or Launch()
    model_name, loss_name = _model_name(cfg, launch), _loss_name(cfg, launch)
    if model_is_mask and not loss_is_mask:
        raise ConfigError(
            f"{model_name} is a mask-classification model (it predicts a class and a mask per "
            f"query), but {loss_name} is a per-pixel loss that cannot read its predictions. Use "
            "loss=mask_classification (Hungarian matching of queries to classes, Mask2Former's "
            "criterion).")
    if loss_is_mask and not model_is_mask:
        raise ConfigError(
            f"{loss_name} matches the queries of a mask-classification model (Mask2Former, EoMT) "
            f"to classes, but {model_name} predicts per-pixel logits. Use a per-pixel loss with "
            "it (loss=ce, the default; or dice, focal, ce_dice, ohem, lovasz), or pick a "
            "mask-classification model.")
    if model_is_mask and getattr(model, "aux_head", None) is not None:
        raise ConfigError(
            f"{model_name} is a mask-classification model with an auxiliary head "
            "(model.aux_head), which would never be trained: such models supervise every "
            "decoder layer through loss=mask_classification. Set model.aux_head=null.")


def _round(value: int, multiple: int) -> int:
    return max(multiple, int(round(int(value) / multiple)) * multiple)


def check_data(train_set, val_set, run_dir: Path, progress: bool, skip_bad_files: bool) -> None:
    """Before training, every training and validation mask (one scan per split, cached in the run
    folder and reused by ``loss.class_weights=auto``): files that cannot be read (truncated,
    damaged, sizes that differ) stop the run here with the file named, or with
    ``skip_bad_files=true`` are left out with a count and the first names in the log; training
    values outside the classes, and 0/255 binary masks whose foreground would be ignored, stop it
    too: not silently, and not hours in. Generated data (no files) is not scanned."""
    for split, dataset in (("train", train_set), ("val", val_set)):
        base = base_dataset(dataset)
        if base.files() == []:
            continue
        scan = scan_masks(dataset, cache_dir=run_dir, progress=progress,
                          skip_unreadable=skip_bad_files)
        scan.check_values(split)
        if scan.unreadable:
            if scan.num_images == 0:
                raise DataError(scan.report_unreadable(split) + ". Nothing is left to use.")
            log.warning(scan.report_unreadable(split) + ". Left out (skip_bad_files=true).")
            base.drop_samples([index for index, _ in scan.unreadable])
        if split != "train":
            continue
        # dataset.mask_map='{255: 255}' says that 255 really is "ignore": then no 0/255 check.
        if base.ignore_index not in (getattr(base, "mask_map", None) or {}):
            scan.check_binary_255("train")
        absent = scan.absent_classes()
        if absent:
            log.warning(f"class(es) {', '.join(absent)} appear in none of the {scan.num_images} "
                        "training masks: the model cannot learn them, and their IoU will be "
                        "reported as undefined ('-') where no validation mask holds them either.")


def check_held_out(train_set, val_set) -> int:
    """Warn, before training, when validation images are also training images
    (:mod:`segexp.data.overlap`); the count goes into ``metrics.json``. A warning, not
    an error: training on everything for a final model (e.g. Cityscapes' train + val before a
    test-server submission) is a real protocol, but its validation scores are not held out."""
    shared = validation_images_in_training(train_set, val_set)
    if shared:
        log.warning(
            f"{len(shared)} of the {len(base_dataset(val_set))} validation images are also "
            f"training images, the same file or a copy of one (the first: {shared[0]}): the "
            "training and validation splits overlap (dataset.train_split / dataset.val_split, the "
            "split lists, or files copied into both), so the validation scores measure how well "
            "the model fits images it trained on, not how it does on unseen ones. Choose disjoint "
            "splits for a held-out score; metrics.json records the count as "
            "val_images_in_training.")
    return len(shared)


def run_info(cfg: DictConfig, run_dir: Path, launch: Launch) -> RunInfo:
    """Name, sweep group and tags for loggers."""
    choices = dict(launch.choices)
    if choices and cfg.get("default_backbone"):  # the model's default, not model_default/<model>
        choices["backbone"] = cfg.default_backbone
    tags = [f"{key}:{choices.get(key)}" for key in ("model", "backbone", "dataset")
            if choices.get(key)]
    if choices.get("model") and \
            model_label(choices.get("model"), choices.get("head")) != str(choices.get("model")):
        tags.insert(1, f"head:{choices['head']}")  # head=... chose another than the model's own
    return RunInfo(run_dir=run_dir, name=str(cfg.get("name", run_dir.name)),
                   config=OmegaConf.to_container(cfg, resolve=True), group=launch.sweep_group,
                   tags=tags, job_num=launch.job_num)


def build_run(cfg: DictConfig, run_dir: Path, launch: Launch, started: float,
              checkpoint: dict[str, Any] | None = None, checkpoint_path: Path | None = None) -> Run:
    """The one place a :class:`Run` is built: the trainer options read and checked, data, model
    and optimiser built and checked against each other, the run's length settled (for a time
    budget, measured), the lr schedule over it, the checkpoint's state loaded when resuming, and
    the loggers (rank 0). ``started``: when the run's set-up began (it counts against a budget)."""
    options = TrainerOptions.from_config(cfg.trainer)  # before any work: a wrong option is named
    dist = distributed.init_distributed(options.dist_backend)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    device = resolve_device(options.device, dist.local_rank if dist.enabled else None)
    autocast(device, options.precision)  # refuses a precision this device cannot run
    options = options.resolved_for(device)
    torch.backends.cudnn.benchmark = options.cudnn_benchmark
    train_set, val_set = build_datasets(cfg)
    model = build_model(cfg)
    check_compatible(cfg, options, model, train_set)
    check_loss_fits_model(cfg, model, launch)
    check_data(train_set, val_set, run_dir, progress=dist.is_main and options.progress_bar,
               skip_bad_files=bool(cfg.get("skip_bad_files", False)))
    val_in_train = check_held_out(train_set, val_set)
    if options.sync_bn and dist.enabled:  # BatchNorm statistics over the global batch
        model = distributed.convert_sync_batchnorm(model, device)
    model.to(device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    if dist.rank:  # dropout / drop-path masks differ between ranks; rank 0 draws as one process
        torch.manual_seed(cfg.seed + dist.rank)

    sampler = ResumableSampler(len(train_set), seed=cfg.seed, rank=dist.rank,
                               num_replicas=dist.world_size)
    run_plan = plan(options, sampler.samples_per_replica, dist.world_size)
    train_loader, val_loader = build_loaders(options, train_set, val_set, sampler, device, dist)
    optimizer = instantiate(cfg.optimizer)(model)
    # class_weights: auto -> from the training masks, scanned once (cached in the run folder).
    loss_cfg = resolve_auto_class_weights(cfg.loss, train_set, run_dir,
                                          progress=dist.is_main and options.progress_bar)
    parts = dict(model=model, train_model=wrap_for_training(model, options, device, dist),
                 criterion=instantiate(loss_cfg).to(device), optimizer=optimizer,
                 scaler=torch.amp.GradScaler(device.type, enabled=options.precision == "16"),
                 train_loader=train_loader, sampler=sampler, val_loader=val_loader, device=device,
                 options=options, plan=run_plan, run_dir=run_dir,
                 class_names=list(train_set.class_names), palette=list(train_set.colours),
                 metric=cfg.metric, ignore_index=train_set.ignore_index,
                 config_yaml=OmegaConf.to_yaml(cfg, resolve=True), dist=dist,
                 val_in_train=val_in_train)
    state = TrainState()
    if checkpoint is not None:
        state.load_state_dict(checkpoint["state"])  # the recorded length, before the schedule
    calibration = settle_length(state, options, run_plan, cfg.scheduler, resumed=checkpoint is not None,
                                elapsed_s=time.perf_counter() - started)
    # Other ranks log nothing: rank 0 reports the reduced figures of all. The run folder's log is
    # always kept; the `logger` group adds none, one or several (logger=[csv,tensorboard]).
    loggers = [JsonlLogger()] + build_loggers(cfg.get("logger")) if dist.is_main else []
    scheduler_for = functools.partial(build_scheduler, cfg, optimizer, run_plan)
    # While a budget run measures its speed, a schedule that depends on the length holds its start.
    hold = state.total_iters - 1 if calibration is not None and calibration.hold else state.hold_iters
    replan = (state.replanned_at, state.replanned_from) if state.replanned_at else None
    run = Run(**parts, scheduler=scheduler_for(state.total_iters, hold, replan), loggers=loggers,
              state=state, calibration=calibration, scheduler_for=scheduler_for,
              recheck=budget.Recheck(after=int(cfg.scheduler.get("warmup_steps") or 0))
              if options.budget_s is not None and not state.rechecked
              and budget.can_replan(cfg.scheduler, model) else None)
    if checkpoint is not None:  # after the scheduler, whose construction resets the lr
        resume_run(run, checkpoint, checkpoint_path)
    return run


def build_loaders(options: TrainerOptions, train_set, val_set, sampler: ResumableSampler,
                  device: torch.device, dist: distributed.DistInfo) -> tuple[DataLoader, DataLoader]:
    t = options
    pin_memory = device.type == "cuda" if t.pin_memory == "auto" else bool(t.pin_memory)
    workers = {"num_workers": t.num_workers, "pin_memory": pin_memory}
    if t.num_workers > 0:
        workers.update(worker_init_fn=quiet_worker_init, prefetch_factor=t.prefetch_factor)
    # Own generators, so creating a loader iterator never draws from the global RNG (exact resume).
    # Workers persist across epochs: the sampler runs in this process, so set_epoch still applies,
    # and augmentation is seeded per sample, not per worker.
    train_loader = DataLoader(train_set, batch_size=t.batch_size, sampler=sampler, drop_last=True,
                              persistent_workers=t.num_workers > 0, generator=torch.Generator(),
                              **workers)
    val_loader = DataLoader(val_set, batch_size=t.val_batch_size,
                            sampler=ContiguousShardSampler(len(val_set), dist.rank, dist.world_size),
                            collate_fn=pad_collate, generator=torch.Generator(), **workers)
    return train_loader, val_loader


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, run_plan: Plan,
                    total_iters: int, hold_iters: int = 0, replan: tuple[int, int] | None = None):
    """The lr schedule over ``total_iters`` (in epochs for ``interval: epoch``); ``hold_iters``:
    a budget run's first iterations, at the full lr (a warmup starting at factor 1); ``replan``:
    ``(at, planned)``, a budget run's re-plan (iteration schedules only)."""
    interval = cfg.scheduler.get("interval", "iter")
    total_steps = total_iters if interval == "iter" else -(-total_iters // run_plan.iters_per_epoch)
    extra = {"warmup_steps": hold_iters, "warmup_start_factor": 1.0} if hold_iters else {}
    if replan is not None:
        extra |= {"replanned_at": replan[0], "replanned_from": replan[1]}
    return instantiate(cfg.scheduler)(optimizer, total_steps=total_steps, **extra)


def settle_length(state: TrainState, options: TrainerOptions, run_plan: Plan, scheduler: DictConfig,
                  resumed: bool, elapsed_s: float) -> budget.Calibration | None:
    """The run's length: the config's limit; a resumed budget run's recorded count (its schedule
    continues unchanged); or, for a new budget run, not known yet: the returned
    :class:`budget.Calibration` measures the speed on the first iterations and
    :func:`budget.plan_run` fixes the count (``state.total_iters`` meanwhile: the cap, or
    :data:`budget.UNKNOWN_LENGTH`). Time spent so far counts against the budget."""
    t = options
    if t.budget_s is None:
        state.total_iters = run_plan.limit
        return None
    state.budget_used_s += elapsed_s
    if resumed and state.planned:
        log.info(f"Time budget {budget.format_duration(t.budget_s)}: "
                 f"{budget.format_duration(state.budget_used_s)} used so far; continuing the "
                 f"recorded {state.total_iters} iterations.")
        return None
    state.planned = False
    state.total_iters = run_plan.limit or budget.UNKNOWN_LENGTH
    name, interval = str(scheduler.get("name")), str(scheduler.get("interval", "iter"))
    warmup = int(scheduler.get("warmup_steps") or 0)
    # Where the lr cannot depend on the count yet: a plateau schedule never does; one stepped per
    # epoch does not in the first epoch; a warmup does not until it ends; else the lr is held.
    last, hold = None, False
    if name != "plateau":
        if interval == "epoch":
            last = run_plan.iters_per_epoch
        elif warmup:
            last = warmup
        elif int(scheduler.get("backbone_warmup_steps") or 0):
            raise ConfigError(
                "trainer.max_time with scheduler.backbone_warmup_steps needs scheduler.warmup_steps "
                "> 0: the budget measures the speed during that first warmup (holding the lr "
                "instead would keep the backbone at lr 0 meanwhile). Set e.g. "
                "scheduler.warmup_steps=100.")
        else:
            hold = True
    if run_plan.limit is not None:
        last = run_plan.limit if last is None else min(last, run_plan.limit)
    log.info(f"Time budget {budget.format_duration(t.budget_s)}"
             + (f": {budget.format_duration(state.budget_used_s)} used so far" if resumed else "")
             + "; measuring the speed on the first training iterations"
             + (" (the lr held at its start meanwhile)" if hold else "") + ".")
    return budget.Calibration(t.budget_s, last_iter=last, hold=hold, rebuild=name != "plateau")


def config_for_resume(cfg: DictConfig, checkpoint: dict[str, Any], path: Path,
                      overrides: tuple[str, ...] | None) -> DictConfig:
    """The config a resume runs with. When the command line (``overrides``; None: a config built
    in code, used as given) names nothing but the resume itself, the run folder and
    ``trainer.*`` values (e.g. a longer ``trainer.max_iters``), the run's own config, recorded in
    its checkpoint, is used with those values applied: the defaults may have changed since, and
    a forgotten override must not turn into a refused resume. Any other override means the user
    asks for that config (a model that does not fit is then refused)."""
    saved = checkpoint.get("config")
    if not saved or overrides is None:
        return cfg
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    trainer_values = [o.lstrip("+") for o, k in zip(overrides, keys, strict=True)
                      if k.startswith("trainer.")]
    if any(k != "resume" and not k.startswith(("trainer.", "hydra.")) for k in keys):
        return cfg
    resumed = OmegaConf.create(saved)
    with open_dict(resumed):
        resumed.resume = cfg.resume
        resumed.merge_with(OmegaConf.from_dotlist(trainer_values))
    log.info(f"Resuming with the run's own config, recorded in {path}"
             + (f", with {' '.join(trainer_values)}" if trainer_values else "") + ".")
    return resumed


def forget_logged_after(log_path: Path, step: int) -> None:
    """A resumed run repeats the iterations after its checkpoint: drop what the interrupted run
    logged for them, so ``metrics.jsonl`` (and the curves drawn from it) hold each step once."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
        kept.append(line)
    write_text(log_path, "".join(f"{line}\n" for line in kept))


def catch_stop_signals(run: Run, names) -> Callable[[], None]:
    """On each of ``names`` (``trainer.stop_signals``: SIGTERM from ``kill``, a container stop or a
    cluster's pre-emption, SIGUSR1 from SLURM's ``--signal=USR1@90``), finish the current
    iteration, write ``last.pt`` and stop (:func:`segexp.engine.trainer.save_interrupted`).
    Returns a function that puts the previous handlers back."""
    previous = {}

    def request_stop(signum, _frame) -> None:
        run.stop_signal = signal.Signals(signum).name
        log.warning(f"{run.stop_signal} received: stopping after the current iteration.")

    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set in the main thread
    for name in names:
        number = getattr(signal, str(name).upper(), None)
        if not isinstance(number, signal.Signals):
            raise ConfigError(f"trainer.stop_signals holds {name!r}, which is not a signal name "
                              "here (e.g. SIGTERM, SIGUSR1).")
        previous[number] = signal.signal(number, request_stop)

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    return restore


def requeue_with_submitit(signal_name: str) -> None:
    """Under the submitit launcher, hand a stopped job to submitit's own "checkpoint and requeue"
    (SLURM requeues the job with the same overrides and run folder, and
    :func:`requeued_resume` continues it from ``last.pt``). Called once the stop is saved and
    the loggers are finished, with the signal handlers put back: submitit's handler of
    ``signal_name`` is then the current one. It exits the process on rank 0; elsewhere (no
    submitit, other ranks) nothing happens."""
    handler = signal.getsignal(getattr(signal, signal_name))
    requeue = getattr(getattr(handler, "__self__", None), "checkpoint_and_try_requeue", None)
    if requeue is not None and type(handler.__self__).__module__.startswith("submitit"):
        log.warning(f"{signal_name}: requeueing this job through submitit; it resumes from "
                    "checkpoints/last.pt when it starts again.")
        requeue(getattr(signal, signal_name), None)


def requeued_resume(resume: Any, run_dir: Path) -> Any:
    """A SLURM job that was requeued (``SLURM_RESTART_COUNT`` > 0: after a pre-emption or a
    time-out) starts again with its first command line, so ``resume=false``: continue from its
    run folder's ``last.pt`` when there is one, instead of starting over in it."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    last = run_dir / "checkpoints" / "last.pt"
    if resume or not restarts.isdigit() or int(restarts) == 0 or not last.is_file():
        return resume
    log.warning(f"SLURM restart {restarts} of this job: resuming from {last}.")
    return True


def resume_run(run: Run, checkpoint: dict[str, Any], checkpoint_path: Path) -> None:
    """Model, optimizer, scheduler, scaler and random state from a checkpoint (its counters,
    ``run.state``, are loaded first: the schedule's length comes from them)."""
    load_weights_into(run.model, checkpoint["model"], option="resume", path=checkpoint_path,
                      target="this model (was it trained with another model/backbone/head?)",
                      remedy="To resume with the run's own config, give only resume=... (plus "
                             "hydra.run.dir and trainer.* values) on the command line.")
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    per_rank = checkpoint.get("rng_per_rank") or []
    set_rng_state(per_rank[run.dist.rank] if len(per_rank) == run.dist.world_size
                  else checkpoint["rng"])
    log.info(f"Resumed from {checkpoint_path} at iteration {run.state.iter} (epoch {run.state.epoch}).")


def measure_cost(run: Run, cfg: DictConfig) -> dict[str, Any]:
    """GFLOPs and inference FPS of the trained model at the training crop size (batch 1, the
    run's device and precision), for the summary: so runs compare on cost as well as accuracy."""
    if not run.options.measure_speed:
        return {}
    crop = cfg.dataset.get("crop_size")
    size = (int(crop[0]), int(crop[1])) if crop is not None else (512, 512)
    try:
        gflops = count_gflops(run.model, size)
        fps = measure_fps(run.model, size, run.device, run.options.precision)
    except RuntimeError as err:  # (out of memory included) a cost figure never fails a finished run
        log.warning(f"could not measure GFLOPs/FPS at {size[0]}x{size[1]}: {err}")
        return {}
    return {"gflops": round(gflops, 3), "fps": round(fps, 2),
            "cost_input": f"{size[0]}x{size[1]}, batch 1, {run.device.type}, "
                          f"precision {run.options.precision}"}


def pretrained_record(model: torch.nn.Module) -> dict[str, str]:
    """What the backbone's weights started from (``backbone.pretrained``, see
    :mod:`segexp.backbones.pretrained`): ``pretrained`` (``imagenet``, ``checkpoint``, ``none``...)
    and ``pretrained_source``, for ``metrics.json``, the logger tags and W&B."""
    source = getattr(getattr(model, "backbone", None), "pretrained_source", None)
    if source is None:  # a backbone from outside segexp.backbones
        return {"pretrained": "unknown", "pretrained_source": "unknown (the backbone does not say)"}
    return source.record()


def write_summary(run: Run, status: str, wall_time_s: float, error: str | None = None,
                  cost: dict[str, Any] | None = None) -> dict:
    """``metrics.json`` (rank 0 writes it; every rank gets the dict)."""
    s = run.state
    summary: dict[str, Any] = {
        "status": status,
        "metric": run.metric,
        "best": {"iter": s.best_iter, **_scalars(s.best_results)},
        "final": {"iter": s.iter, **_scalars(s.last_results)},
        "best_per_class": _per_class(s.best_results, run.class_names),
        "params": count_params(run.model),
        "precision": run.options.precision,  # as run: trainer.precision=auto resolved
        "channels_last": run.options.channels_last,  # as run: auto resolved
        **pretrained_record(run.model),
        "val_images_in_training": run.val_in_train,  # > 0: the validation scores are not held out
        **(cost or {}),
        "wall_time_s": round(wall_time_s, 2),
        "train_time_s": round(s.train_time_s, 2),
        "val_time_s": round(s.val_time_s, 2),
        "iters": s.iter,
        "planned_iters": s.total_iters if s.planned else None,  # None: stopped before planning
        "epochs": s.epoch,
        "images_seen": s.iter * run.options.batch_size * run.options.accumulate_grad_batches
        * run.dist.world_size,
    }
    if run.options.budget_s is not None:
        summary["budget"] = {"max_time": run.options.max_time, "seconds": run.options.budget_s,
                             "used_s": round(s.budget_used_s, 2),
                             "calibration_iters": s.calibration_iters,
                             "calibration_s": round(s.calibration_s, 2)}
        if s.replanned_at:
            summary["budget"] |= {"replanned_at": s.replanned_at, "replanned_from": s.replanned_from}
        if s.planned:
            summary["budget"]["repeat"] = budget.repeat_overrides(s, run.options.by_epoch)
    if error:
        summary["error"] = error
    if run.dist.enabled:
        summary["world_size"] = run.dist.world_size
    if not run.dist.is_main:
        return summary
    write_json(run.run_dir / "metrics.json", json_safe(summary), indent=2, allow_nan=False,
               default=str)
    return summary


def _scalars(results: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in results.items() if not isinstance(v, list)}


def _per_class(results: dict[str, Any], class_names: list[str]) -> dict[str, dict[str, Any]]:
    lists = {k: v for k, v in results.items() if isinstance(v, list)}
    return {name: {k: v[i] for k, v in lists.items()} for i, name in enumerate(class_names)}


def run_training(cfg: DictConfig, run_dir: Path, launch: Launch | None = None) -> float:
    """Train as configured into ``run_dir``; returns the best validation ``cfg.metric`` (for
    sweepers). ``launch``: how the run was started (``train.py`` passes Hydra's choices and
    command line); None for a config built in code."""
    launch = launch or Launch()
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    checkpoint_path = resolve_resume(requeued_resume(cfg.get("resume"), run_dir), run_dir)
    checkpoint = read_weights_file(checkpoint_path, "resume") if checkpoint_path is not None else None
    if checkpoint is not None:
        cfg = config_for_resume(cfg, checkpoint, checkpoint_path, launch.overrides)
    run = build_run(cfg, run_dir, launch, start, checkpoint, checkpoint_path)
    del checkpoint
    if checkpoint_path is not None and run.dist.is_main:
        forget_logged_after(run_dir / "metrics.jsonl", run.state.iter)
    info = run_info(cfg, run_dir, launch)
    info.resumed_from_iter = run.state.iter if checkpoint_path is not None else None
    weights = pretrained_record(run.model)
    info.config.update(params=count_params(run.model), **weights)
    info.tags.append(f"pretrained:{weights['pretrained']}")
    log.info(f"Backbone weights: {weights['pretrained_source']}")
    restore_signals = catch_stop_signals(run, run.options.stop_signals)
    try:
        for logger in run.loggers:
            logger.start(info)
        fit(run)
    except BaseException as err:
        record_failure(run, err, time.perf_counter() - start)
        raise
    finally:
        restore_signals()
        if run.stop_signal:
            requeue_with_submitit(run.stop_signal)
    finish_run(run, cfg, time.perf_counter() - start)
    return float(run.state.best_metric)


def record_failure(run: Run, err: BaseException, wall_time_s: float) -> None:
    """A run that stopped on an error or a signal: ``metrics.json`` says so, and the loggers
    finish as failed (or interrupted)."""
    status = "interrupted" if isinstance(err, TrainingInterrupted) else "failed"
    write_summary(run, status, wall_time_s, f"{type(err).__name__}: {err}")
    for logger in run.loggers:
        logger.finish(failed=True, status=status)


def finish_run(run: Run, cfg: DictConfig, wall_time_s: float) -> None:
    """After training: the cost measurement, ``metrics.json``, the loggers' summary and best
    checkpoint, the final table and the run's pictures."""
    status = {"early_stopping": "early_stopped", "time_limit": "time_limit"}.get(
        run.state.stopped_by, "completed")
    cost = measure_cost(run, cfg) if run.dist.is_main else {}
    summary = write_summary(run, status, wall_time_s, cost=cost)
    best = run.run_dir / "checkpoints" / "best.pt"
    for logger in run.loggers:
        logger.log_summary({f"best/{k}": v for k, v in summary["best"].items()} |
                           {k: summary[k] for k in ("params", "precision", "channels_last", "wall_time_s",
                                                    "train_time_s", "val_time_s", "iters",
                                                    "images_seen", "val_images_in_training")}
                           | {f"budget/{k}": v for k, v in summary.get("budget", {}).items()}
                           | pretrained_record(run.model) | cost)
        if best.exists():
            logger.log_checkpoint(best, aliases=["best", f"iter-{run.state.best_iter}"])
        logger.finish(status=status)
    if run.dist.is_main:
        print_final_table(run, summary)
        write_run_pictures(run.run_dir)


def print_final_table(run: Run, summary: dict) -> None:
    s = run.state
    log.info(f"Final validation (iteration {s.iter}):\n"
             f"{format_table(s.last_results, run.class_names)}\n"
             f"Best {run.metric}: {100 * s.best_metric:.2f} % at iteration {s.best_iter}. "
             f"Params: {summary['params'] / 1e6:.2f} M. "
             + (f"GFLOPs: {summary['gflops']:.2f}, FPS: {summary['fps']:.1f} ({summary['cost_input']}). "
                if "gflops" in summary else "")
             + f"Wall time: {summary['wall_time_s']:.0f} s. "
             f"Run folder: {run.run_dir}")
