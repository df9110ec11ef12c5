"""Where and how computation runs: the device, mixed precision, seeding and data-loader workers.
A leaf module (torch, NumPy and :mod:`segexp.errors` only), so inference, profiling and the
training engine share these without importing each other."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import zlib
from pathlib import Path

import numpy as np
import torch

from segexp.errors import ConfigError

PRECISIONS = ("auto", "32", "bf16", "16")


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


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA GPU that supports it (Ampere and
    later), or a CPU with AVX512-BF16 or AMX, oneDNN's fast path. Elsewhere bfloat16 is emulated
    and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA=AVX2, ...) below its bf16 level turns the fast
        # path off whatever the CPU has.
        return _onednn_allows("BF16", "AMX") and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def _onednn_allows(*levels: str) -> bool:
    """Whether oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``, none by default) admits kernels of a
    level whose name holds one of ``levels`` (e.g. "AVX512", "BF16")."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return cap in ("ALL", "DEFAULT") or any(level in cap for level in levels)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` (mixed precision) where the device computes bfloat16 natively, else
    ``32``; any other value as given. On one core with AVX512-BF16, U-Net/ResNet-18 trained 10.1
    instead of 5.3 images/s (docs/performance.md)."""
    precision = str(precision)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "32"
    return precision


def resolve_channels_last(channels_last: bool | str, device: torch.device, precision: str) -> bool:
    """``auto`` -> NHWC on CPUs with AVX-512 (oneDNN: U-Net/ResNet-18 training steps 8 % faster
    in bf16, 13 % in float32; with oneDNN capped at AVX2, 3 % slower: docs/performance.md) and on
    GPUs with mixed precision (tensor-core kernels take NHWC); NCHW elsewhere.
    ``precision``: as resolved (not ``auto``)."""
    if channels_last != "auto":
        return bool(channels_last)
    if device.type == "cpu":
        return _onednn_allows("AVX512") and "avx512f" in cpu_flags()
    return device.type == "cuda" and str(precision) in ("bf16", "16")


def autocast(device: torch.device, precision: str):
    """Mixed precision context; ``"32"`` is plain float32, ``"auto"`` is resolved by
    :func:`resolve_precision`. Refuses a precision the device cannot run (called once before any
    work to check ``trainer.precision``)."""
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision}: use auto, \"32\", \"bf16\" or \"16\".")
    precision = resolve_precision(precision, device)
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
