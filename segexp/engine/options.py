"""The training loop's settings (the ``trainer`` config group), read and checked once.

:meth:`TrainerOptions.from_config` turns the composed ``trainer`` node into a frozen, typed object
before anything is built: a wrong type, a value out of range, an option that does not exist or a
length given twice is a :class:`~segexp.errors.ConfigError` naming the option, not a failure
deep in training; and the loop reads plain attributes, never the config, on every batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from segexp.engine.budget import parse_duration
from segexp.errors import ConfigError
from segexp.runtime import PRECISIONS, resolve_channels_last, resolve_precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerOptions:
    """One field per key of ``conf/trainer/default.yaml`` (its comments say what each does), plus
    ``budget_s``: ``max_time`` in seconds, or None."""

    device: str = "auto"
    precision: str = "32"
    max_time: str | None = None
    max_iters: int | None = None
    max_epochs: int | None = None
    val_interval: int | None = None
    log_interval: int = 20
    batch_size: int = 8
    val_batch_size: int = 8
    num_workers: int = 2
    pin_memory: bool | str = "auto"
    prefetch_factor: int = 2
    accumulate_grad_batches: int = 1
    grad_clip: float | None = None
    early_stopping_patience: int | None = None
    max_train_batches: int | None = None
    max_val_batches: int | None = None
    cudnn_benchmark: bool = True
    channels_last: bool | str = "auto"
    compile: bool | str = False
    compile_backend: str = "inductor"
    sync_bn: bool = False
    dist_backend: str = "auto"
    find_unused_parameters: bool = False
    stop_signals: tuple[str, ...] = ()
    progress_bar: bool = True
    num_vis_images: int = 4
    measure_speed: bool = True
    budget_s: float | None = dataclasses.field(default=None, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget_s", parse_duration(self.max_time))

    @property
    def by_epoch(self) -> bool:
        """Whether the run is counted in epochs (``max_epochs``; ``val_interval`` too)."""
        return self.max_epochs is not None

    def resolved_for(self, device: torch.device) -> TrainerOptions:
        """These options with ``auto`` precision and memory format settled for ``device`` (each
        choice made is logged): what the run, its summary and the benchmarks use."""
        options = self
        if options.precision == "auto":
            options = dataclasses.replace(options, precision=resolve_precision("auto", device))
            log.info(f"trainer.precision=auto: {options.precision} on {device.type} ("
                     + ("bfloat16 mixed precision: this device computes it natively)"
                        if options.precision == "bf16" else "float32: no native bfloat16 here)"))
        if options.channels_last == "auto":
            options = dataclasses.replace(options, channels_last=resolve_channels_last(
                "auto", device, options.precision))
            log.info(f"trainer.channels_last=auto: {'NHWC' if options.channels_last else 'NCHW'}"
                     f" weights and images ({device.type}, precision {options.precision})")
        return options

    @classmethod
    def from_config(cls, node: DictConfig | Mapping[str, Any]) -> TrainerOptions:
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) \
            else dict(node)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"trainer.{unknown[0]} is not a trainer option; the options are "
                              f"{', '.join(names)} (conf/trainer/default.yaml).")
        kwargs = {}
        for name in names:
            if name in values:
                kwargs[name] = _CHECKS[name](name, values[name])
        options = cls(**kwargs)
        options._check_length()
        return options

    def _check_length(self) -> None:
        if self.max_iters is not None and self.max_epochs is not None:
            raise ConfigError("set one of trainer.max_iters and trainer.max_epochs, not both "
                              f"(got max_iters={self.max_iters}, max_epochs={self.max_epochs}).")
        if self.max_iters is None and self.max_epochs is None and self.budget_s is None:
            raise ConfigError("set how long to train: trainer.max_time (e.g. 20m), "
                              "trainer.max_iters or trainer.max_epochs.")


def _int(least: int, optional: bool = False):
    def check(name: str, value: Any) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            what = f"an integer >= {least}" + (" or null" if optional else "")
            raise ConfigError(f"trainer.{name}={value!r}: use {what}.")
        return value
    return check


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"trainer.{name}={value!r}: use true or false.")
    return value


def _text(name: str, value: Any) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ConfigError(f"trainer.{name}={value!r}: use a name or number (see "
                          "conf/trainer/default.yaml).")
    return str(value)


def _precision(name: str, value: Any) -> str:
    precision = str(value)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.{name}={value}: use auto, \"32\", \"bf16\" or \"16\".")
    return precision


def _max_time(name: str, value: Any) -> str | None:
    if value is None:
        return None
    parse_duration(value, f"trainer.{name}")  # a readable error for a wrong duration
    return str(value)


def _grad_clip(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"trainer.{name}={value!r}: use a positive maximum gradient norm "
                          "(e.g. 1.0) or null.")
    return float(value)


def _auto_or_bool(name: str, value: Any) -> bool | str:
    if value == "auto" or isinstance(value, bool):
        return value
    raise ConfigError(f"trainer.{name}={value!r}: use auto, true or false.")


def _compile(name: str, value: Any) -> bool | str:
    if isinstance(value, (bool, str)):
        return value
    raise ConfigError(f"trainer.{name}={value!r}: use false, true or a torch.compile mode "
                      "(e.g. max-autotune).")


def _signals(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"trainer.{name}={value!r}: use a list of signal names, e.g. "
                          "[SIGTERM,SIGUSR1].")
    return tuple(str(v) for v in value)


_CHECKS = {
    "device": _text, "precision": _precision, "max_time": _max_time,
    "max_iters": _int(1, optional=True), "max_epochs": _int(1, optional=True),
    "val_interval": _int(1, optional=True), "log_interval": _int(1), "batch_size": _int(1),
    "val_batch_size": _int(1), "num_workers": _int(0), "pin_memory": _auto_or_bool,
    "prefetch_factor": _int(1), "accumulate_grad_batches": _int(1), "grad_clip": _grad_clip,
    "early_stopping_patience": _int(1, optional=True),
    "max_train_batches": _int(1, optional=True), "max_val_batches": _int(1, optional=True),
    "cudnn_benchmark": _bool, "channels_last": _auto_or_bool, "compile": _compile,
    "compile_backend": _text, "sync_bn": _bool, "dist_backend": _text,
    "find_unused_parameters": _bool, "stop_signals": _signals, "progress_bar": _bool,
    "num_vis_images": _int(0), "measure_speed": _bool,
}
