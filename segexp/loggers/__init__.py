"""Run loggers (``logger`` config group)."""

from segexp.loggers.base import CSVLogger, JsonlLogger, Logger, RunInfo, VisSample, build_loggers
from segexp.loggers.mlflow_logger import MLflowLogger
from segexp.loggers.tensorboard_logger import TensorBoardLogger
from segexp.loggers.wandb_logger import WandbLogger

__all__ = ["CSVLogger", "JsonlLogger", "Logger", "MLflowLogger", "RunInfo", "TensorBoardLogger",
           "VisSample", "WandbLogger", "build_loggers"]
