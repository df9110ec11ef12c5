"""Composing the project's config outside ``train.py``, and building objects from it."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra.utils
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from segexp.errors import ConfigError, SegexpError

_START = datetime.now()


def _run_time(pattern: str) -> str:
    """``${run_time:%Y-%m-%d}``: Hydra's ``${now:...}``, except that the processes of one
    distributed run (torchrun, SLURM) share rank 0's start time, so they share one run folder
    (``segexp.engine.distributed.shared_start_time`` puts it in ``SEGEXP_RUN_TIME``)."""
    shared = os.environ.get("SEGEXP_RUN_TIME")
    return (datetime.fromisoformat(shared) if shared else _START).strftime(pattern)


OmegaConf.register_new_resolver("run_time", _run_time, use_cache=True, replace=True)


def _untimed(max_time: Any, value: Any) -> Any:
    """``${untimed:${.max_time},400}``: a default iteration limit that gives way to a time
    budget (``trainer.max_time``), while an explicit ``trainer.max_iters=N`` still caps it."""
    return value if max_time is None else None


OmegaConf.register_new_resolver("untimed", _untimed, replace=True)


def model_label(model: Any, head: Any) -> str:
    """``${model_label:<model>,<head>}``: the model's name in run names, with the decode head after
    a dash when ``head=...`` chose another than the model's own (``setr-setr_mla``); a head
    named like the model (the default, ``head: ${model}``) or none adds nothing."""
    model, head = str(model), "" if head is None else str(head)
    return model if head in ("", model) else f"{model}-{head}"


OmegaConf.register_new_resolver("model_label", model_label, replace=True)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but an error of ours raised inside a target comes out as
    itself: Hydra wraps it, and our messages already say what is wrong and what to do."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, SegexpError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


# The configs are the repository's conf/, found beside the package: segexp is installed editable
# from a clone (`pip install -e .`, which the README's set-up does) or run from the clone itself,
# so conf/ edits take effect at once and every command composes the same files. A wheel built
# from the clone carries the Python package only (see require_conf_dir).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def require_conf_dir() -> Path:
    """:data:`CONF_DIR`, or a ConfigError saying how to install segexp so that it has one."""
    if not (CONF_DIR / "train.yaml").is_file():
        raise ConfigError(f"the configs were not found at {CONF_DIR}: segexp reads the conf/ folder "
                          "of its repository. Install it editable from a clone: git clone the "
                          "repository, then `pip install -e .` (or the README's set-up) in it.")
    return CONF_DIR


def compose_train_config(overrides: list[str]) -> tuple[DictConfig, str]:
    """The config ``python train.py <overrides>`` would run with, and the chosen dataset's name,
    for scripts and notebooks (``segexp.engine.experiment.run_training(cfg, run_dir)`` trains
    it). ``name``, built from Hydra's runtime choices, is resolved here, while they are known."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    dataset_name = str(cfg.hydra.runtime.choices.get("dataset") or "dataset")
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves against the current config
    with open_dict(cfg):
        cfg.name = str(cfg.name)
        del cfg["hydra"]
    return cfg, dataset_name


class OutputFolderCheck(Callback):
    """Hydra creates the run (or sweep) folder before ``train.py``'s own error handling starts, so
    an unwritable or impossible ``hydra.run.dir`` would end in a bare ``OSError`` traceback. This
    callback (``hydra.callbacks`` in ``conf/train.yaml``) tries the folder first and stops with
    one line naming it and the option to change."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_output_folder(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_output_folder(config.hydra.sweep.dir, "hydra.sweep.dir")


def check_output_folder(folder: str, option: str) -> None:
    path = Path(str(folder)).expanduser()
    probe = path / f".segexp_write_test_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        print(f"segexp: error: cannot write the run folder {path} ({reason}: "
              f"{err.filename or path}). Choose a writable folder with {option}=<path>.",
              file=sys.stderr)
        sys.exit(1)  # SystemExit passes through Hydra's error printer: one line, no traceback
