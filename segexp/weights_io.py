"""Weight files: the one reader and the one way to load a state dict into a model.

Used by ``resume``, ``model.checkpoint``, ``backbone.checkpoint``, evaluation and inference. Files
are read with ``torch.load(..., weights_only=True)`` (nothing in them runs) or as
``.safetensors``; every usual fault (missing, a folder, damaged or cut short, holding code) is a
:class:`ConfigError` naming the option. Loading checks every key first and reports all that do
not fit in one table, so a model is never left partly loaded. A leaf module: torch, safetensors
and :mod:`segexp.errors` only.
"""

from __future__ import annotations

import pickle
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segexp.errors import ConfigError, first_few, first_line

# Containers a state dict is found in: MMSegmentation / Lightning (``state_dict``), segexp's and
# timm's training checkpoints (``model``), EMA weights, DataParallel-style saves (``module``).
WRAPPERS = ("state_dict", "model", "state_dict_ema", "module")


def check_weights_path(path: str | Path, option: str, expected: str | None = None) -> Path:
    """``path`` (``~`` expanded) if it is a file; else the error saying it is missing or a folder.
    ``expected`` completes "Point it at ..." (e.g. ``a saved state dict of timm's 'resnet18'``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{option}={path} is a folder, not a weights file: point it at the "
                          ".pth or .safetensors file inside.")
    if not path.is_file():
        raise ConfigError(f"{option}={path}: no such file."
                          + (f" Point it at {expected}." if expected else ""))
    return path


def read_weights_file(path: str | Path, option: str = "checkpoint",
                      map_location: str | torch.device = "cpu", expected: str | None = None) -> Any:
    """What a ``.pt``/``.pth``/``.bin`` (``weights_only=True``) or ``.safetensors`` file holds,
    with an error that says which of the usual faults it is: missing, not a file, damaged or cut
    short, or refused because it holds code or objects."""
    path = check_weights_path(path, option, expected)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"{option}={path} was refused: it holds Python objects or code, not only tensors and "
            "numbers, and segexp never executes what a file contains (torch.load with "
            f"weights_only=True). Save a plain state dict (torch.save(model.state_dict(), ...)) or "
            f"a .safetensors file. ({first_line(err)})") from err
    except Exception as err:  # zip/EOF/header errors: the bytes are not a whole file
        raise ConfigError(
            f"{option}={path} cannot be read: it is damaged or incomplete ({path.stat().st_size} "
            f"bytes; a copy or download cut short?). Copy it again. ({type(err).__name__}: "
            f"{first_line(err)})") from err


def read_state_dict(path: str | Path, option: str, expected: str | None = None) -> dict[str, Any]:
    """The state dict in a weights file, taken out of a :data:`WRAPPERS` container (a segexp
    training checkpoint gives its ``model``)."""
    state = read_weights_file(path, option, expected=expected)
    for wrapper in WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping):
        raise ConfigError(f"{option}={Path(path).expanduser()} holds a {type(state).__name__}, "
                          "not a state dict.")
    return dict(state)


# -- fitting a state dict to a model --------------------------------------------------------------
@dataclass
class Fit:
    """How a state dict fits a model: the tensors that load, the keys that do not fit as
    ``(key, problem, detail)`` rows, and classifiers left at their fresh initialisation."""

    loadable: dict[str, torch.Tensor] = field(default_factory=dict)
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)


def fit_state_dict(expected: Mapping[str, torch.Tensor], state: Mapping[str, Any], *,
                   compare_shapes: bool = True, ignored: Collection[str] = (),
                   num_classes: int | None = None, reinit_classifier: bool = False) -> Fit:
    """Compare ``state`` with a model's ``expected`` state dict (meta tensors are enough).
    ``ignored`` file keys are dropped (a classifier the model does not have). A tensor whose first
    dimension is ``num_classes`` (or ``+ 1``: a mask-classification head's "no object") and
    differs only there is a classifier: kept fresh with ``reinit_classifier``, else reported with
    that remedy."""
    fit = Fit()
    for key, value in state.items():
        if key in ignored:
            continue
        if key not in expected:
            fit.problems.append((key, "unexpected", f"in the file {_shape(value)}, not in the model"))
            continue
        target = expected[key]
        if compare_shapes and tuple(value.shape) != tuple(target.shape):
            is_classifier = (num_classes is not None and target.ndim >= 1
                             and target.shape[0] in (num_classes, num_classes + 1)
                             and value.shape[1:] == target.shape[1:])
            if is_classifier and reinit_classifier:
                fit.reinitialised.append(key)
            else:
                hint = " (a classifier: set model.reinit_classifier=true to fine-tune on other " \
                       "classes)" if is_classifier else ""
                fit.problems.append((key, "shape mismatch", f"file {_shape(value)} vs model "
                                     f"{tuple(target.shape)}{hint}"))
            continue
        fit.loadable[key] = value
    fit.problems += [(key, "missing", f"in the model {tuple(expected[key].shape)}, not in the file")
                     for key in expected if key not in state]
    return fit


def _shape(value: Any) -> tuple | str:
    return tuple(value.shape) if hasattr(value, "shape") else type(value).__name__


def problems_table(rows: list[tuple[str, str, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'key'.ljust(width)}  {'problem':<22}  detail", "-" * (width + 40)]
    lines += [f"{key.ljust(width)}  {problem:<22}  {detail}" for key, problem, detail in rows]
    return "\n".join(lines)


def misfit_error(option: str, path: str | Path, target: str, problems: list[tuple[str, str, str]],
                 remedy: str, fmt: str | None = None) -> ConfigError:
    """One message for weights that do not fit: a line naming the first keys of each kind, then
    every key in a table, then what to do."""
    kinds = [(kind, [key for key, problem, _ in problems if problem == kind])
             for kind in ("missing", "unexpected", "shape mismatch")]
    summary = "; ".join(f"{kind} {first_few(keys)}" for kind, keys in kinds if keys)
    read_as = f" (read as '{fmt}')" if fmt else ""
    return ConfigError(f"{option}={path}{read_as} does not fit {target}: {summary}; "
                       f"{len(problems)} key(s):\n{problems_table(problems)}\n{remedy}")


def load_weights_into(module: nn.Module, state: Mapping[str, Any], *, option: str,
                      path: str | Path, target: str = "this model", remedy: str = "",
                      fmt: str | None = None, num_classes: int | None = None,
                      reinit_classifier: bool = False) -> Fit:
    """Load ``state`` into ``module`` if every key fits (see :func:`fit_state_dict`); otherwise
    raise :func:`misfit_error` and leave the module untouched."""
    fit = fit_state_dict(module.state_dict(), state, num_classes=num_classes,
                         reinit_classifier=reinit_classifier)
    if fit.problems:
        raise misfit_error(option, path, target, fit.problems, remedy, fmt)
    module.load_state_dict(fit.loadable, strict=not fit.reinitialised)
    return fit
