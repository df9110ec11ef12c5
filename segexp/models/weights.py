"""Loading whole-model checkpoints (``model.checkpoint=PATH``): segexp's own, and public layouts
converted on the fly. Every key that does not fit is reported in one table; nothing is silently
skipped. Files are read with ``weights_only=True`` (or safetensors): nothing in them runs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from segexp.errors import ConfigError

log = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    from segexp.engine.checkpoint import read_weights_file

    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"model.checkpoint={path}: no such file.")
    state = read_weights_file(path, option="model.checkpoint")
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "state" in state:
        return state["model"]  # a segexp training checkpoint
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        return state["state_dict"]  # MMSegmentation / Lightning style wrapper
    if not isinstance(state, dict):
        raise ConfigError(f"model.checkpoint={path} holds a {type(state).__name__}, not a "
                          "state dict.")
    return state


def _converters() -> dict[str, tuple[Callable[[dict], bool], Callable[[dict], dict]]]:
    """Known layouts: name -> (detector, converter). Imported lazily: each is optional."""
    from segexp.convert import torchvision_models

    formats = {"torchvision": (torchvision_models.looks_like_torchvision,
                               torchvision_models.convert_torchvision)}
    try:
        from segexp.convert import hf_segformer

        formats["hf_segformer"] = (hf_segformer.is_hf_segformer, hf_segformer.convert_hf_segformer)
    except ImportError:
        pass
    try:
        from segexp.convert import hf_upernet

        formats["hf_upernet"] = (hf_upernet.looks_like_hf_upernet, hf_upernet.convert_hf_upernet)
    except ImportError:
        pass
    try:
        from segexp.convert import hf_eomt

        formats["hf_eomt"] = (hf_eomt.looks_like_hf_eomt, hf_eomt.convert_hf_eomt)
    except ImportError:
        pass
    try:
        from segexp.convert import hf_mask2former

        formats["hf_mask2former"] = (hf_mask2former.looks_like_hf_mask2former,
                                     hf_mask2former.convert_hf_mask2former)
    except ImportError:
        pass
    try:
        from segexp.convert import mmseg

        formats["mmseg"] = (mmseg.looks_like_mmseg, mmseg.convert_mmseg)
    except ImportError:
        pass
    return formats


def convert(state: dict, model_keys: set[str], checkpoint_format: str = "auto") -> tuple[dict, str]:
    """Return the state dict in segexp's layout and the format it was read as."""
    formats = _converters()
    if checkpoint_format == "segexp" or (checkpoint_format == "auto" and set(state) & model_keys
                                         and len(set(state) & model_keys) >= len(state) // 2):
        return state, "segexp"
    if checkpoint_format == "auto":
        for name, (detect, converter) in formats.items():
            if detect(state):
                return converter(state), name
        raise ConfigError("model.checkpoint: cannot tell which layout the file has (not segexp, "
                          f"{', '.join(formats)}). Set model.checkpoint_format= to one of "
                          f"segexp, {', '.join(formats)}.")
    if checkpoint_format not in formats:
        raise ConfigError(f"model.checkpoint_format={checkpoint_format} is unknown; use auto, "
                          f"segexp, {', '.join(formats)}.")
    return formats[checkpoint_format][1](state), checkpoint_format


def problems_table(rows: list[tuple[str, str, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'key'.ljust(width)}  {'problem':<22}  detail", "-" * (width + 40)]
    lines += [f"{key.ljust(width)}  {problem:<22}  {detail}" for key, problem, detail in rows]
    return "\n".join(lines)


def load_weights(model: nn.Module, path: str | Path, checkpoint_format: str = "auto",
                 reinit_classifier: bool = False, num_classes: int | None = None) -> str:
    """Load ``path`` into ``model``; raise a ConfigError with a table of every key that does not
    fit. With ``reinit_classifier`` a classifier whose class count differs keeps its fresh
    initialisation (fine-tuning on a dataset with other classes)."""
    target = model.state_dict()
    state, fmt = convert(read_state_dict(path), set(target), checkpoint_format)
    rows: list[tuple[str, str, str]] = []
    reinitialised = []
    loadable = {}
    for key, value in state.items():
        if key not in target:
            rows.append((key, "unexpected", f"in the file {tuple(value.shape)}, not in the model"))
        elif value.shape != target[key].shape:
            # (K + 1 rows: a mask-classification head's, whose last class is "no object")
            is_classifier = (num_classes is not None and target[key].ndim >= 1
                             and target[key].shape[0] in (num_classes, num_classes + 1)
                             and value.shape[1:] == target[key].shape[1:])
            if is_classifier and reinit_classifier:
                reinitialised.append(key)
            else:
                hint = " (a classifier: set model.reinit_classifier=true to fine-tune on other " \
                       "classes)" if is_classifier else ""
                rows.append((key, "shape mismatch",
                             f"file {tuple(value.shape)} vs model {tuple(target[key].shape)}{hint}"))
        else:
            loadable[key] = value
    rows += [(key, "missing", f"in the model {tuple(target[key].shape)}, not in the file")
             for key in target if key not in state]
    if rows:
        raise ConfigError(f"model.checkpoint={path} (read as '{fmt}') does not fit this model; "
                          f"{len(rows)} key(s):\n{problems_table(rows)}\nCheck model=, backbone= "
                          "and head= against the model the file was saved from.")
    model.load_state_dict(loadable, strict=False)
    note = f", re-initialised {', '.join(reinitialised)}" if reinitialised else ""
    log.info(f"Loaded {len(loadable)} tensors from {path} ({fmt} layout{note}).")
    return fmt
