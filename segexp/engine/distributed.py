"""torch.distributed for the training loop: one process per device, started by ``torchrun`` or by
SLURM (``srun`` / the submitit launcher), or a single process when neither is present.

    torchrun --nproc_per_node=4 train.py model=upernet dataset=cityscapes
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
    python train.py -m hydra/launcher=slurm hydra.launcher.nodes=2 hydra.launcher.gpus_per_node=8 ...

``trainer.batch_size`` is per process (MMSegmentation's samples per GPU): the global batch is
``batch_size x world size``. Rank 0 alone logs, writes checkpoints and pictures; every rank
computes the same validation metrics (the confusion matrix is summed over ranks), so decisions
such as early stopping agree without further messages.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta

import torch
import torch.distributed as dist
from torch import nn

from segexp.engine.launch import cluster_tasks, started_as_one_of_several
from segexp.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[01-04],gpu7`` -> ``node01``)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        head = nodelist.split(",")[0]
        if "[" in head:  # prefix[01-04,07] -> prefix01
            prefix, ranges = head.split("[", 1)
            head = prefix + ranges.rstrip("]").split(",")[0].split("-")[0]
        return head


def export_cluster_environment() -> bool:
    """In a job of several tasks (the submitit launcher, local or SLURM; or ``srun``), set the
    variables ``env://`` initialisation reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT). Returns whether it did; torchrun's variables win."""
    if "RANK" in os.environ or cluster_tasks() <= 1:
        return False
    if os.environ.get("SUBMITIT_EXECUTOR"):  # submitit knows its job, SLURM or local
        from submitit.helpers import TorchDistributedEnvironment

        # Each process picks its GPU by LOCAL_RANK, so all GPUs stay visible.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return True
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", _slurm_first_host(os.environ.get("SLURM_JOB_NODELIST", "")
                                                           or os.environ.get("SLURM_NODELIST", "")))
    # One port per job, so two jobs sharing a node do not collide.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    return True


def init_distributed(backend: str = "auto", timeout_min: float = 30.0) -> DistInfo:
    """Join the process group if this process was started as one of several (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if not started_as_one_of_several():
        return DistInfo()
    export_cluster_environment()
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run a single process.")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.dist_backend=nccl needs CUDA devices; use gloo on CPUs.")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=timedelta(minutes=timeout_min))
    return current()


def current() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum / max / mean over ranks; a no-op in a single process."""
    info = current()
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= info.world_size
    return tensor


def broadcast_object(value):
    """Rank 0's ``value`` on every rank."""
    if not current().enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_object(value) -> list:
    if not current().enabled:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def share_start_time(backend: str = "auto") -> DistInfo:
    """Before Hydra names the run folder: join the process group and give every rank rank 0's
    start time (``${run_time:...}`` in the config reads it), since processes started together
    can straddle a second and must still share one folder. A no-op in a single process."""
    if not started_as_one_of_several():
        return DistInfo()
    info = init_distributed(backend)
    os.environ["SEGEXP_RUN_TIME"] = broadcast_object(datetime.now().isoformat(timespec="seconds"))
    return info


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- SyncBatchNorm ------------------------------------------------------------------------------
class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every rank's loss depends on
    every rank's statistics."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the whole global batch, on any device and backend.

    torch.nn.SyncBatchNorm runs on GPUs only; this one sums (count, sum, sum of squares) over
    ranks with a differentiable all-reduce, so it also trains on CPUs with gloo (where a
    multi-process run must match a single process with the same global batch). The state dict
    is a BatchNorm's: checkpoints load into either.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and current().enabled):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        x = input.float()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32, device=x.device)
        stats = torch.cat([count, x.sum(dims), (x * x).sum(dims)])
        stats = _SumOverRanks.apply(stats)
        n = stats[0]
        mean = stats[1:1 + x.shape[1]] / n
        var = (stats[1 + x.shape[1]:] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = [1, -1] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm -> a synchronised one: on CUDA torch's (fused kernels; timm's converter,
    which also keeps timm's BatchNorm+activation layers whole), elsewhere ours (plain
    BatchNorm1d/2d/3d only; a subclass with more behaviour is left as it is, with a warning)."""
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
            type(module) not in (*_PLAIN_BATCHNORMS, SyncBatchNorm):
        warnings.warn(f"trainer.sync_bn: {type(module).__name__} is not synchronised on this "
                      "device (only plain BatchNorm layers are off CUDA).", stacklevel=3)
    if type(module) in _PLAIN_BATCHNORMS:
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                sync.weight = module.weight
                sync.bias = module.bias
        if module.track_running_stats:
            sync.running_mean = module.running_mean
            sync.running_var = module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, _convert(child))
    return module
