"""Loading whole-model checkpoints (``model.checkpoint=PATH``): segexp's own, and public layouts
converted on the fly. Every key that does not fit is reported in one table; nothing is silently
skipped. Files are read with ``weights_only=True`` (or safetensors): nothing in them runs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from torch import nn

from segexp.errors import ConfigError
from segexp.weights_io import load_weights_into, read_state_dict

log = logging.getLogger(__name__)


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
        from segexp.convert import hf_maskformer

        formats["hf_maskformer"] = (hf_maskformer.looks_like_hf_maskformer,
                                    hf_maskformer.convert_hf_maskformer)
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


def load_weights(model: nn.Module, path: str | Path, checkpoint_format: str = "auto",
                 reinit_classifier: bool = False, num_classes: int | None = None) -> str:
    """Load ``path`` into ``model``; raise a ConfigError with a table of every key that does not
    fit. With ``reinit_classifier`` a classifier whose class count differs keeps its fresh
    initialisation (fine-tuning on a dataset with other classes)."""
    state = read_state_dict(path, "model.checkpoint")
    state, fmt = convert(state, set(model.state_dict()), checkpoint_format)
    fit = load_weights_into(model, state, option="model.checkpoint", path=path, fmt=fmt,
                            num_classes=num_classes, reinit_classifier=reinit_classifier,
                            remedy="Check model=, backbone= and head= against the model the file "
                                   "was saved from.")
    note = f", re-initialised {', '.join(fit.reinitialised)}" if fit.reinitialised else ""
    log.info(f"Loaded {len(fit.loadable)} tensors from {path} ({fmt} layout{note}).")
    return fmt
