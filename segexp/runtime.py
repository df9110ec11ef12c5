"""Where and how computation runs: the device, mixed precision, seeding and data-loader workers.
A leaf module (torch, NumPy and :mod:`segexp.errors` only), so inference, profiling and the
training engine share these without importing each other."""

from __future__ import annotations

import contextlib
import random
import zlib

import numpy as np
import torch

from segexp.errors import ConfigError

PRECISIONS = ("32", "bf16", "16")


def resolve_device(spec: str, local_rank: int | None = None,
                   option: str = "trainer.device") -> torch.device:
    """``auto`` -> CUDA if available; in a distributed run each process takes GPU ``local_rank``.
    ``option`` names the setting in the error (``--device`` for a script)."""
    spec = str(spec)
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}={spec} but no CUDA device is available here; use "
                          f"{option}=cpu" + (" (or trainer=cpu)." if option == "trainer.device"
                                             else "."))
    if device.type == "cuda" and local_rank is not None and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def autocast(device: torch.device, precision: str):
    """Mixed precision context; ``"32"`` is plain float32. Refuses a precision the device cannot
    run (called once before any work to check ``trainer.precision``)."""
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision}: use \"32\", \"bf16\" or \"16\".")
    if precision == "32":
        return contextlib.nullcontext()
    if precision == "16" and device.type != "cuda":
        raise ConfigError("trainer.precision=16 needs a CUDA device; use \"32\" or \"bf16\" here.")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_for(base_seed: int, index: int) -> int:
    """A stable 31-bit seed from two integers (hash() is salted per process, so not usable)."""
    return zlib.crc32(f"{base_seed}:{index}".encode()) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet_worker_init(_worker_id: int) -> None:
    """``worker_init_fn`` of data loaders: the workers are the parallelism, so OpenCV's and
    torch's own threads in each of them would only compete for the same cores."""
    import cv2

    cv2.setNumThreads(0)
    torch.set_num_threads(1)
