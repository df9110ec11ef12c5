"""Errors that explain themselves: what is wrong, where, and what to do about it."""

from __future__ import annotations

from collections.abc import Sequence


class SegexpError(Exception):
    """Base class for problems segexp can explain to the user (shown without a traceback)."""


class ConfigError(SegexpError, ValueError):
    """A configuration option holds a value that cannot work."""


class DataError(SegexpError, ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class IncompatibleBackboneError(ConfigError):
    """A head (or model) cannot take the features the chosen backbone produces."""


class TrainingError(SegexpError, RuntimeError):
    """Training had to stop (for example a NaN loss); the last good checkpoint is kept."""


class TrainingInterrupted(TrainingError):
    """A signal (SIGTERM, a cluster's pre-emption signal) stopped training at an iteration
    boundary; ``last.pt`` holds that iteration, and ``resume=true`` continues from it."""


class StorageError(SegexpError, OSError):
    """A run's file could not be written: a full disk, a read-only or missing folder."""


def first_line(err: BaseException) -> str:
    """An exception's first non-empty line (its type's name if it has none), for a message that
    quotes the cause in a few words."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def first_few(items: Sequence[str], limit: int = 6, sep: str = ", ") -> str:
    """The first ``limit`` of ``items`` joined by ``sep``, then ``... (N in all)`` when there are
    more: how every message names a list that may be long."""
    items = list(items)
    return sep.join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")
