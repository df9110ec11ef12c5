"""Run loggers (``logger`` config group)."""

from segexp.loggers.base import CSVLogger, JsonlLogger, Logger, RunInfo, VisSample
from segexp.loggers.wandb_logger import WandbLogger

__all__ = ["CSVLogger", "JsonlLogger", "Logger", "RunInfo", "VisSample", "WandbLogger"]
