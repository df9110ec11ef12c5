"""Model cost: parameters, GFLOPs and inference speed, and the machine's description. Shared by the
end of a training run (the run's ``metrics.json`` and W&B summary), ``segexp-bench``
(:mod:`segexp.cli.benchmark`) and the benchmark scripts in ``scripts/``.

GFLOPs follow the papers' tables: multiply-accumulates x 1e-9 for one image, counted by
``torch.utils.flop_counter``. Attention goes through SDPA's math backend while counting; the fused
CPU/CUDA kernels are invisible to the counter and would count as zero.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from segexp.runtime import autocast, seed_for


def cpu_model() -> str:
    """The CPU's name (Linux /proc/cpuinfo), for benchmark records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU, cores (all and usable), load and library versions, for benchmark records."""
    import cv2
    import torchvision

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "load_1min": load,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "opencv": cv2.__version__, "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}"}


class Cycled(Dataset):
    """``length`` samples from ``base``, repeating it: sample i is ``base[i % len(base)]`` with
    augmentation seed ``seed_for(seed, i)`` (the seeded path training takes)."""

    def __init__(self, base, length: int, seed: int = 0) -> None:
        self.base, self.length, self.seed = base, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.base[(i % len(self.base), seed_for(self.seed, i))]


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
