"""Model cost: parameters, GFLOPs and inference speed. Shared by the end of a training run (the
run's ``metrics.json`` and W&B summary), ``scripts/benchmark.py`` and ``scripts/model_table.py``.

GFLOPs follow the papers' tables: multiply-accumulates x 1e-9 for one image, counted by
``torch.utils.flop_counter``. Attention goes through SDPA's math backend while counting; the fused
CPU/CUDA kernels are invisible to the counter and would count as zero.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from segexp.runtime import autocast


def cpu_model() -> str:
    """The CPU's name (Linux /proc/cpuinfo), for benchmark records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_gflops(model: nn.Module, size: tuple[int, int], device: torch.device | str | None = None) -> float:
    """GMACs of one forward pass of a ``size`` (h, w) image, in eval mode (no auxiliary head).
    Works on the meta device, where nothing is computed."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images = torch.zeros(1, 3, *size, device=device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images)
    model.train(was_training)
    return counter.get_total_flops() / 2e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds of ``iters`` calls after ``warmup`` untimed ones (CUDA work included)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_fps(model: nn.Module, size: tuple[int, int], device: torch.device, precision: str = "32",
                batch: int = 1, iters: int = 5, warmup: int = 2) -> float:
    """Images per second of eval-mode inference at ``size``, median of ``iters`` timed batches."""
    was_training = model.training
    model.eval()
    images = torch.randn(batch, 3, *size, device=device)

    def infer():
        with autocast(device, precision):
            model(images)

    latency = median_time(infer, device, iters, warmup)
    model.train(was_training)
    return batch / latency
