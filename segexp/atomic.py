"""Files a run writes appear whole or not at all: written to a temporary file beside the target,
flushed to disk, then renamed over it. A crash, a signal or a full disk mid-write leaves the
previous version intact and no temporary file behind; a full disk or a folder that cannot be
written is a :class:`~segexp.errors.StorageError` naming the folder (and, for a full disk, the
free space), not a bare ``OSError``."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from segexp.errors import StorageError


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def storage_error(err: OSError, path: Path, size: int | None = None) -> StorageError:
    """The explanation of ``err`` raised while writing ``path``."""
    folder = path.parent
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = _mb(shutil.disk_usage(folder).free)
        except OSError:
            free = "unknown"
        need = f" (about {_mb(size)} needed)" if size else ""
        return StorageError(f"the disk holding {folder} is full: cannot write {path.name}{need}; "
                            f"{free} free. Free some space (old run folders, checkpoints) or set "
                            "hydra.run.dir=<a folder on another disk>, then resume=true.")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {path.name} into {folder}: permission denied or a "
                            "read-only file system. Choose a writable output folder with "
                            "hydra.run.dir=<folder>.")
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return StorageError(f"cannot write {path}: the folder {folder} does not exist and could not "
                            "be created (is a parent a file?). Choose another hydra.run.dir.")
    return StorageError(f"cannot write {path}: {err.strerror or err}.")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same extension, so writers that pick a format by
    it still work); when the block ends without error the file is synced and renamed to
    ``path``. On any error the temporary file is removed; OS errors become a StorageError."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb") as f:  # the bytes on disk before the rename publishes them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        size = _remove(tmp)
        raise storage_error(err, path, size) from err
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> int | None:
    """Delete a temporary file if there is one; its size, for the message."""
    try:
        size = tmp.stat().st_size
        tmp.unlink()
        return size
    except OSError:  # never created (or its folder is not one)
        return None


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data: Any, **kwargs: Any) -> Path:
    return write_text(path, json.dumps(data, **kwargs))


def write_with(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """``writer(temporary_path)`` writes the file (``torch.save``, ``fig.savefig``, ...)."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)
