"""Errors that explain themselves: what is wrong, where, and what to do about it."""


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
