"""Distributed training on CPUs with gloo: sharding, SyncBatchNorm, SLURM start-up, and a
two-process torchrun run that matches one process with the same global batch."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn

from segexp.data.sampler import ContiguousShardSampler, ResumableSampler
from segexp.engine import distributed
from segexp.weights_io import read_weights_file
from tests.conftest import ROOT, free_port, last_weights, launcher_free_env


def test_rank_shares_together_are_the_single_process_batches():
    length, batch, world = 21, 3, 2  # 21 = 10 per rank, one sample dropped
    single = list(ResumableSampler(length, seed=7))
    shares = [list(ResumableSampler(length, seed=7, rank=r, num_replicas=world)) for r in range(world)]
    assert [len(s) for s in shares] == [10, 10]
    assert len({i for s in shares for i, _ in s}) == 20  # no sample twice
    for k in range(10 // batch):
        together = sorted(x for s in shares for x in s[k * batch:(k + 1) * batch])
        assert together == sorted(single[k * batch * world:(k + 1) * batch * world])


def test_rank_share_resumes_mid_epoch_and_reshuffles_per_epoch():
    sampler = ResumableSampler(20, seed=1, rank=1, num_replicas=2)
    sampler.set_epoch(3)
    whole = list(sampler)
    sampler.set_epoch(3, start=4)
    assert list(sampler) == whole[4:] and len(sampler) == 6
    sampler.set_epoch(4)
    assert [i for i, _ in sampler] != [i for i, _ in whole]
    with pytest.raises(ValueError, match="rank 2"):
        ResumableSampler(4, rank=2, num_replicas=2)


@pytest.mark.parametrize("length,world", [(10, 3), (2, 4), (7, 1)])
def test_evaluation_shards_cover_the_split_once_with_rank_0_first(length, world):
    shards = [list(ContiguousShardSampler(length, r, world)) for r in range(world)]
    assert sum(shards, []) == list(range(length))
    assert shards[0] == list(range(len(shards[0])))


def test_slurm_environment_becomes_torch_distributed_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "SUBMITIT_EXECUTOR", "SUBMITIT_LOCAL_NTASKS"):
        monkeypatch.setenv(key, "")  # recorded, so the values exported below are undone after
        monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", "")  # no scontrol: the node list is parsed here
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-10,12],login1")
    assert distributed.export_cluster_environment()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07" and os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
    # torchrun's own variables win over SLURM's
    assert not distributed.export_cluster_environment()


def _sync_bn_worker(rank: int, port: int, x: torch.Tensor, expected: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
        model = distributed.convert_sync_batchnorm(model, torch.device("cpu"))
        assert isinstance(model[1], distributed.SyncBatchNorm)
        # rank 0 gets 1 image, rank 1 gets 2: statistics weigh every pixel, not every rank
        part = x[:1] if rank == 0 else x[1:]
        out = model(part)
        (out.square().sum() / expected["pixels"]).backward()
        grad = model[0].weight.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(out, expected["out"][:1] if rank == 0 else expected["out"][1:],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, expected["grad"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model[1].running_var, expected["running_var"], atol=1e-5, rtol=1e-5)
        model.eval()  # evaluation uses the running statistics, with no communication
        torch.testing.assert_close(model(part), expected["eval"][:1] if rank == 0 else expected["eval"][1:],
                                   atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_on_cpu_equals_batchnorm_over_the_global_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(3, 3, 8, 8)
    out = model(x)
    pixels = out.numel()
    (out.square().sum() / pixels).backward()
    expected = {"out": out.detach(), "grad": model[0].weight.grad.clone(), "pixels": pixels,
                "running_var": model[1].running_var.clone(), "eval": model.eval()(x).detach()}
    mp.spawn(_sync_bn_worker, args=(free_port(), x, expected), nprocs=2)


def test_sync_batchnorm_leaves_batchnorm_subclasses_alone():
    class NormAct(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.BatchNorm2d(2), NormAct(2))
    with pytest.warns(UserWarning, match="NormAct is not synchronised"):
        converted = distributed.convert_sync_batchnorm(model, torch.device("cpu"))
    assert type(converted[0]) is distributed.SyncBatchNorm and type(converted[1]) is NormAct
    assert set(converted.state_dict()) == set(nn.Sequential(nn.BatchNorm2d(2), NormAct(2)).state_dict())


# No dropout, and no resizing or padding (ignored pixels would weigh the ranks' losses unequally):
# then two processes with SyncBN and one process with the same global batch compute the same.
SAME_WORK = ["trainer=debug", "transforms=none", "dataset.image_size=32", "dataset.train_length=8",
             "dataset.val_length=5", "trainer.max_val_batches=null", "trainer.max_iters=3",
             "trainer.val_interval=3", "trainer.measure_speed=false", "head.dropout=0",
             # SGD: linear in the gradient, so the two summation orders stay rounding-close (Adam
             # normalises each gradient and turns rounding noise into lr-sized steps); a small lr
             # so the rounding stays far from flipping a prediction after 3 steps.
             "optimizer=sgd", "optimizer.lr=1.0e-4",
             # timm's zero-initialised residual branches: SyncBN takes the variance as
             # E[x^2] - E[x]^2, and at stride 32 a 32x32 image is one pixel, so two samples; with
             # live branches (the ResNet configs' default) that cancellation moved running
             # variances by up to 35 % and flipped 470 of the near-untrained model's pixels.
             "backbone.zero_init_last=true"]


def _one_process(run_dir: Path, *overrides: str) -> Path:
    one = subprocess.run([sys.executable, str(ROOT / "train.py"), *SAME_WORK, "trainer.batch_size=2",
                          f"hydra.run.dir={run_dir}", *overrides], cwd=run_dir,
                         env=launcher_free_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> tuple[Path, Path]:
    """The reference: one process with the global batch of two processes of batch 1; and the
    same at twice the lr, the weights a gradient summed over two ranks instead of averaged gives
    (SGD is linear in it): the yardstick of how far a wrong reduction moves them."""
    return (_one_process(tmp_path_factory.mktemp("one_process")),
            _one_process(tmp_path_factory.mktemp("doubled_lr"), "optimizer.lr=2.0e-4"))


def _largest_weight_gap(a_dir: Path, b_dir: Path) -> float:
    a, b = last_weights(a_dir), last_weights(b_dir)
    return max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())


def assert_same_training(reference: tuple[Path, Path], two_dir: Path) -> None:
    one_dir, doubled_dir = reference
    summaries = [json.loads((d / "metrics.json").read_text()) for d in (one_dir, two_dir)]
    assert summaries[1]["world_size"] == 2 and summaries[1]["iters"] == 3
    # Two SyncBN processes and one process sum in different orders, so on another CPU's kernels
    # a few pixels' argmax can flip: compare the predictions within a few pixels, not exactly.
    matrices = [np.array([[int(v) for v in r[1:]]
                          for r in list(csv.reader(open(d / "confusion_matrix.csv")))[1:]])
                for d in (one_dir, two_dir)]
    assert np.abs(matrices[1] - matrices[0]).sum() <= 2 * 8  # at most 8 of 5120 pixels moved
    for key in ("mIoU", "aAcc", "mAcc"):
        assert summaries[1]["best"][key] == pytest.approx(summaries[0]["best"][key], abs=5e-3)
    # The small lr keeps predictions from flipping, so the weights carry the check: the two runs
    # differ by rounding, far less than a wrong reduction (the doubled lr) would move them.
    rounding, wrong = _largest_weight_gap(one_dir, two_dir), _largest_weight_gap(one_dir, doubled_dir)
    assert rounding < 0.1 * wrong, (rounding, wrong)

    # Validation covered the whole split once: 5 images of 32x32 pixels, split 2 + 3.
    for d in (one_dir, two_dir):
        rows = list(csv.reader(open(d / "confusion_matrix.csv")))
        assert np.array([[int(v) for v in r[1:]] for r in rows[1:]]).sum() == 5 * 32 * 32

    one_weights = read_weights_file(one_dir / "checkpoints" / "last.pt")["model"]
    two_checkpoint = read_weights_file(two_dir / "checkpoints" / "last.pt")
    assert len(two_checkpoint["rng_per_rank"]) == 2
    assert set(two_checkpoint["model"]) == set(one_weights)  # plain keys, no "module." prefix
    for name, value in one_weights.items():
        # Running variances come from E[x^2] - E[x]^2 in SyncBN: a little less exact.
        tolerance = 1e-3 if "running" in name else 1e-5
        torch.testing.assert_close(two_checkpoint["model"][name], value, atol=tolerance, rtol=1e-3,
                                   msg=name)

    losses = [[json.loads(line)["train/loss"] for line in (d / "metrics.jsonl").read_text().splitlines()
               if "train/loss" in line] for d in (one_dir, two_dir)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, one_process_run):
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port", str(free_port()), str(ROOT / "train.py"), *SAME_WORK,
         "trainer.batch_size=1", "trainer.val_batch_size=2", "trainer.sync_bn=true"],
        cwd=tmp_path, env=launcher_free_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    # Both ranks wrote into one run folder, named by rank 0's start time.
    (two_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert (two_dir / ".hydra" / "config.yaml").is_file()
    assert_same_training(one_process_run, two_dir)
    log = (two_dir / "train.log").read_text()
    assert log.count("Final validation") == 1  # rank 0 alone reports


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="hydra-submitit-launcher is not installed")
def test_submitit_launcher_starts_one_process_per_task(tmp_path, one_process_run):
    """The SLURM launcher's multi-task jobs, on this machine: submitit_local with 2 tasks."""
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
         "hydra.launcher.tasks_per_node=2", *SAME_WORK, "trainer.batch_size=1",
         "trainer.val_batch_size=2", "trainer.sync_bn=true", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=launcher_free_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (job_dir,) = [p for p in sweep.iterdir() if p.name.startswith("0_")]
    assert_same_training(one_process_run, job_dir)


def test_slurm_launcher_preset_asks_one_task_per_gpu():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2",
                                          "hydra.launcher.gpus_per_node=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)


def test_distributed_resume_continues_exactly(tmp_path):
    def torchrun(*args: str) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
             str(free_port()), str(ROOT / "train.py"), *SAME_WORK, "trainer.batch_size=1",
             "trainer.sync_bn=true", "trainer.val_interval=2", "trainer.max_iters=4",
             # a schedule that does not depend on the run's length, so a shorter first part
             # stands in for a crash after iteration 2
             "scheduler=step", "scheduler.milestones=null", "scheduler.step_size=3", *args],
            cwd=tmp_path, env=launcher_free_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]

    torchrun(f"hydra.run.dir={tmp_path / 'straight'}")
    torchrun(f"hydra.run.dir={tmp_path / 'resumed'}", "trainer.max_iters=2")
    torchrun(f"hydra.run.dir={tmp_path / 'resumed'}", "resume=true")
    straight = read_weights_file(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = read_weights_file(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert resumed["state"]["iter"] == 4
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, atol=0, rtol=0, msg=name)


def test_share_start_time_is_a_no_op_in_one_process(monkeypatch):
    for key in ("WORLD_SIZE", "SLURM_NTASKS", "SUBMITIT_LOCAL_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("SEGEXP_RUN_TIME", raising=False)
    assert distributed.share_start_time() == distributed.DistInfo()
    assert "SEGEXP_RUN_TIME" not in os.environ and not dist.is_initialized()


def test_run_folder_name_uses_the_shared_start_time(monkeypatch):
    from omegaconf import OmegaConf

    import segexp.config  # noqa: F401  (registers ${run_time:...})

    monkeypatch.setenv("SEGEXP_RUN_TIME", "2031-02-03T04:05:06")
    node = OmegaConf.create({"dir": "outputs/${run_time:%Y-%m-%d}/${run_time:%H-%M-%S}_x"})
    assert node.dir == "outputs/2031-02-03/04-05-06_x"
    assert Path(node.dir).name == "04-05-06_x"


def test_each_kind_of_model_trains_under_distributed_data_parallel(tmp_path):
    """DDP fails on the second step when a step leaves a trainable parameter without a gradient
    (a head branch that is not used). That every model's criterion reaches all its parameters is
    checked in process for every model (tests/models/test_models.py); here each kind runs for real, two
    processes with SyncBN, two steps: an auxiliary head (PSPNet) and mask classification with
    deep supervision (Mask2Former)."""
    models = ["mask2former", "pspnet"]
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
         str(free_port()), str(ROOT / "train.py"), "-m", f"model={','.join(models)}",
         "trainer=debug", "trainer.sync_bn=true", "trainer.measure_speed=false",
         "trainer.num_vis_images=0", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=launcher_free_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = {}
    for job in sweep.glob("*/metrics.json"):
        hydra = yaml.safe_load((job.parent / ".hydra" / "hydra.yaml").read_text())["hydra"]
        summaries[hydra["runtime"]["choices"]["model"]] = json.loads(job.read_text())
    assert sorted(summaries) == models
    for model, summary in summaries.items():
        assert (summary["status"], summary.get("world_size"), summary["iters"]) == ("completed", 2, 2), \
            (model, summary.get("error"))
