"""Training checkpoints: written atomically (read with :func:`segexp.weights_io.read_weights_file`),
where to resume from, and the random state they carry."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segexp.atomic import write_with
from segexp.errors import ConfigError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write to a temporary file beside ``path`` and rename it over: a crash mid-write (or a full
    disk) leaves the previous checkpoint intact and no temporary file behind."""
    return write_with(path, lambda tmp: torch.save(state, tmp))


def publish_copy(source: str | Path, path: str | Path) -> Path:
    """Make ``path`` hold the same bytes as ``source`` (a just-written checkpoint) without writing
    them again: a hard link where the file system allows, else a copy; atomic either way."""
    import shutil

    source, path = Path(source), Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    return path


def resolve_resume(resume: bool | str | None, run_dir: Path) -> Path | None:
    """``resume=true`` -> this run folder's ``checkpoints/last.pt``; a folder -> its last.pt;
    a file -> that file."""
    if resume in (None, False, "false", "False", ""):
        return None
    if resume is True or resume in ("true", "True"):
        candidate = run_dir / "checkpoints" / "last.pt"
        if not candidate.is_file():
            raise ConfigError(
                f"resume=true looks for {candidate}, which does not exist. Resume an earlier run "
                "with hydra.run.dir=<its run folder> resume=true, or pass resume=<run folder or "
                "checkpoint file>.")
        return candidate
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no checkpoint at {path}. Pass a run folder holding "
                          "checkpoints/last.pt or a checkpoint file.")
    return path


def rng_state() -> dict[str, Any]:
    """All random generators a training step touches, in a form weights_only can load."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
