"""End-to-end training: the run folder, multirun, exact resume, NaN handling, evaluation."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from segexp.engine import trainer as trainer_module
from segexp.engine.experiment import run_training
from segexp.errors import ConfigError, TrainingError
from segexp.models import build_model
from segexp.profiling import count_gflops
from segexp.weights_io import read_weights_file
from tests.conftest import ROOT, compose_config, last_weights, tiny_config, train_py


def test_run_folder_holds_config_checkpoints_metrics_and_pictures(tmp_path):
    out = train_py("trainer=debug", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    for name in ("last.pt", "best.pt"):
        checkpoint = read_weights_file(tmp_path / "checkpoints" / name)
        assert checkpoint["state"]["iter"] == 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in line for line in lines)
    assert any("val/mIoU" in line and "val/IoU/background" in line for line in lines)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["iters"] == 2
    assert summary["params"] > 1_000_000 and summary["wall_time_s"] > 0
    # backbone.pretrained=auto, offline, no cached weights: one warning, then from scratch.
    assert summary["pretrained_source"] == "none (auto: offline, no cached weights)"
    assert out.stdout.count("no pretrained weights") == 1 and "from scratch" in out.stdout
    assert 0.0 <= summary["best"]["mIoU"] <= 1.0 and "aAcc" in summary["final"]
    assert list(summary["best_per_class"]) == ["background", "circle", "rectangle", "triangle",
                                               "ellipse", "star"]
    assert list((tmp_path / "predictions").glob("iter_*.png"))
    for picture in ("learning_curves.png", "per_class_iou.png", "confusion_matrix.png"):
        assert (tmp_path / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    assert "mean" in out.stdout and "Best mIoU" in out.stdout  # the final table

    # The confusion matrix beside its picture is the best validation's: its diagonal gives aAcc.
    rows = list(csv.reader(open(tmp_path / "confusion_matrix.csv")))
    assert [r[0] for r in rows[1:]] == list(summary["best_per_class"]) == rows[0][1:]
    counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    assert counts.trace() / counts.sum() == pytest.approx(summary["best"]["aAcc"], abs=1e-9)

    # Cost at the training crop (64x64 under trainer=debug), measured on the trained model.
    with torch.device("meta"):
        model = build_model(compose_config("trainer=debug"))
    assert summary["gflops"] == pytest.approx(count_gflops(model, (64, 64)), abs=5e-4)  # 3 decimals
    assert summary["fps"] > 0 and summary["cost_input"].startswith("64x64, batch 1, cpu")
    assert "GFLOPs" in out.stdout


def test_two_job_multirun(tmp_path):
    out = train_py("-m", "model=fcn,unet", "trainer=debug", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    summaries = sorted(tmp_path.glob("*/metrics.json"))
    assert len(summaries) == 2
    names = {json.loads(p.read_text())["status"] for p in summaries}
    assert names == {"completed"}
    assert {p.parent.name.split("_")[1] for p in summaries} == {"fcn", "unet"}


def test_resume_reaches_the_same_weights_and_metrics(tmp_path, monkeypatch):
    overrides = ["trainer.max_iters=6", "trainer.val_interval=2", "trainer.log_interval=1"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    best_straight = run_training(tiny_config(*overrides), straight)

    # Crash during iteration 5: the checkpoint written after iteration 4 must survive.
    real_step, calls = trainer_module.optimizer_step, {"n": 0}

    def crashing_step(run):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated crash")
        real_step(run)

    monkeypatch.setattr(trainer_module, "optimizer_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(*overrides), broken)
    assert read_weights_file(broken / "checkpoints" / "last.pt")["state"]["iter"] == 4
    assert json.loads((broken / "metrics.json").read_text())["status"] == "failed"
    monkeypatch.setattr(trainer_module, "optimizer_step", real_step)

    best_resumed = run_training(tiny_config(*overrides, "resume=true"), broken)
    a, b = last_weights(straight), last_weights(broken)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert best_resumed == best_straight
    final_a = json.loads((straight / "metrics.json").read_text())["final"]
    final_b = json.loads((broken / "metrics.json").read_text())["final"]
    assert final_a == final_b


def test_resume_true_without_a_checkpoint_says_what_to_do(tmp_path):
    out = train_py("trainer=debug", "resume=true", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 1
    assert "resume=true looks for" in out.stderr and "hydra.run.dir=" in out.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from segexp import losses

    real_forward, calls = losses.CrossEntropyLoss.forward, {"n": 0}

    def poisoned(self, logits, target):
        calls["n"] += 1
        loss = real_forward(self, logits, target)
        return loss * float("nan") if calls["n"] >= 3 else loss  # iteration 3 goes bad

    monkeypatch.setattr(losses.CrossEntropyLoss, "forward", poisoned)
    cfg = tiny_config("trainer.max_iters=6", "trainer.val_interval=2", "trainer.log_interval=1")
    with pytest.raises(TrainingError, match="iteration 3") as info:
        run_training(cfg, tmp_path)
    assert str(tmp_path / "checkpoints" / "last.pt") in str(info.value)
    kept = read_weights_file(tmp_path / "checkpoints" / "last.pt")
    assert kept["state"]["iter"] == 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_diverged_weights_never_replace_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The loss can stay finite for a step or two after the weights explode: the checkpoint from
    before the divergence is kept and the error says which iteration it holds."""
    real_step = trainer_module.optimizer_step

    def exploding_step(run):
        real_step(run)
        if run.state.iter == 2:  # during iteration 3: the weights blow up, the loss stays finite
            with torch.no_grad():
                for p in run.model.parameters():
                    p.mul_(1e5)

    monkeypatch.setattr(trainer_module, "optimizer_step", exploding_step)
    with pytest.raises(TrainingError, match="iteration 4 the weights have diverged") as info:
        run_training(tiny_config("trainer.max_iters=6", "trainer.val_interval=2",
                                 "trainer.measure_speed=false"), tmp_path)
    assert "keeps iteration 2" in str(info.value)
    assert read_weights_file(tmp_path / "checkpoints" / "last.pt")["state"]["iter"] == 2


def test_evaluate_script_reproduces_the_best_validation(tmp_path):
    run_training(tiny_config("trainer.max_iters=2", "trainer.val_interval=2"), tmp_path)
    (tmp_path / ".hydra").mkdir()
    from omegaconf import OmegaConf

    OmegaConf.save(tiny_config("trainer.max_iters=2"), tmp_path / ".hydra" / "config.yaml")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    evaluated = json.loads((tmp_path / "eval_val_best.json").read_text())
    best = json.loads((tmp_path / "metrics.json").read_text())["best"]
    assert evaluated["mIoU"] == pytest.approx(best["mIoU"], abs=1e-6)
    assert evaluated["images_also_in_training"] == 0  # synthetic: disjoint splits
    assert (tmp_path / "eval_val_best.png").is_file()


def test_trains_on_the_real_stanford_background_files(tmp_path, shared_datasets):
    root = shared_datasets / "stanford_background" / "iccv09Data"
    out = train_py("trainer=debug", "dataset=stanford_background", f"dataset.root={root}",
                   f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["status"] == "completed"
    assert list(summary["best_per_class"]) == ["sky", "tree", "road", "grass", "water",
                                               "building", "mountain", "foreground"]


@pytest.mark.slow
def test_default_run_learns_the_synthetic_scenes(tmp_path):
    """`python train.py` as a new user runs it: must end far above chance (1/6 for 6 classes)."""
    out = train_py(f"hydra.run.dir={tmp_path}", "trainer.progress_bar=false")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["best"]["mIoU"] > 0.85, summary["best"]


def test_epoch_based_run_with_early_stopping(tmp_path):
    # A vanishing lr: the weights stay put, only BatchNorm's running statistics move, so the
    # validations soon stop improving and patience 1 stops at the first that does not.
    cfg = tiny_config("trainer.max_iters=null", "trainer.max_epochs=6", "trainer.val_interval=1",
                      "trainer.early_stopping_patience=1", "optimizer.lr=1e-12",
                      "scheduler.min_lr_ratio=0")
    run_training(cfg, tmp_path)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    iters_per_epoch = 16 // 2
    validations = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
                   if "val/mIoU" in line]
    n = len(validations)
    assert summary["status"] == "early_stopped" and 2 <= n < 6
    assert summary["epochs"] == n and summary["iters"] == n * iters_per_epoch
    assert [v["step"] for v in validations] == [k * iters_per_epoch for k in range(1, n + 1)]
    scores = [v["val/mIoU"] for v in validations]
    # every validation but the last set a new best; the last did not, and patience 1 stopped there
    assert all(scores[i] > max(scores[:i], default=-1) for i in range(n - 1))
    assert scores[-1] <= max(scores[:-1])


def test_gradient_accumulation_and_clipping_count_optimizer_steps(tmp_path, monkeypatch):
    steps = {"n": 0}
    real = torch.nn.utils.clip_grad_norm_

    def counting_clip(parameters, max_norm, *args, **kwargs):
        steps["n"] += 1
        assert max_norm == 0.5
        return real(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting_clip)
    cfg = tiny_config("trainer.max_iters=3", "trainer.val_interval=3",
                      "trainer.accumulate_grad_batches=2", "trainer.grad_clip=0.5")
    run_training(cfg, tmp_path)
    state = read_weights_file(tmp_path / "checkpoints" / "last.pt")["state"]
    assert steps["n"] == 3 and state["iter"] == 3
    assert state["batch_in_epoch"] == 6  # 3 iterations x 2 batches, within the first epoch


def test_csv_logger_and_wandb_disabled(tmp_path):
    run_training(tiny_config("trainer.max_iters=2", "trainer.val_interval=1", "logger=csv"),
                 tmp_path / "csv")
    import csv

    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert [r["step"] for r in rows if r.get("val/mIoU")] == ["1", "2"]
    assert any(r.get("train/loss") for r in rows)
    run_training(tiny_config("trainer.max_iters=1", "trainer.val_interval=1", "logger=wandb",
                             "logger.wandb.mode=disabled"), tmp_path / "off")
    assert not (tmp_path / "off" / "wandb").exists() or not list(
        (tmp_path / "off" / "wandb").glob("offline-run-*"))


def test_bf16_autocast_trains_and_fp16_needs_cuda(tmp_path):
    run_training(tiny_config("trainer.max_iters=2", "trainer.val_interval=2",
                             "trainer.precision=bf16"), tmp_path / "bf16")
    summary = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["final"]["aAcc"] > 0
    with pytest.raises(ConfigError, match="precision=16 needs a CUDA device"):
        run_training(tiny_config("trainer.max_iters=1", "trainer.precision=16"), tmp_path / "fp16")


def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(tmp_path, monkeypatch,
                                                                            caplog):
    from segexp import runtime

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the suite may run under a cap
    cpu = torch.device("cpu")
    for flags, expected in (({"avx2", "avx512f"}, "32"), ({"avx512f", "avx512_bf16"}, "bf16"),
                            ({"amx_bf16", "amx_tile"}, "bf16"), (set(), "32")):
        monkeypatch.setattr(runtime, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert runtime.resolve_precision("auto", cpu) == expected, flags
        assert runtime.resolve_precision("32", cpu) == "32"  # a chosen precision stays
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped below its bf16 kernels
    assert runtime.resolve_precision("auto", cpu) == "32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    # The choice made is logged and recorded in metrics.json.
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    with caplog.at_level("INFO"):
        run_training(tiny_config("trainer.max_iters=1", "trainer.val_interval=1",
                                 "trainer.precision=auto"), tmp_path / "auto")
    assert json.loads((tmp_path / "auto" / "metrics.json").read_text())["precision"] == "bf16"
    assert "trainer.precision=auto: bf16 on cpu" in caplog.text
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2"}))
    run_training(tiny_config("trainer.max_iters=1", "trainer.val_interval=1",
                             "trainer.precision=auto"), tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text())["precision"] == "32"


def test_auto_channels_last_is_nhwc_on_avx512_cpus_and_with_mixed_precision_on_gpus(
        tmp_path, monkeypatch, caplog):
    from segexp import runtime
    from segexp.runtime import resolve_channels_last

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the suite may run under a cap
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_channels_last("auto", cpu, "32") and resolve_channels_last("auto", cpu, "bf16")
    assert resolve_channels_last("auto", gpu, "bf16") and resolve_channels_last("auto", gpu, "16")
    assert not resolve_channels_last("auto", gpu, "32")
    assert not resolve_channels_last(False, cpu, "bf16") and resolve_channels_last(True, gpu, "32")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped below AVX-512: NCHW
    assert not resolve_channels_last("auto", cpu, "32")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert resolve_channels_last("auto", cpu, "32")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2"}))  # an AVX2-only CPU
    assert not resolve_channels_last("auto", cpu, "32")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    with caplog.at_level("INFO"):
        run_training(tiny_config("model=fcn", "head.channels=16", "trainer.max_iters=1",
                                 "trainer.val_interval=1", "trainer.channels_last=auto"), tmp_path)
    assert "trainer.channels_last=auto: NHWC" in caplog.text
    assert json.loads((tmp_path / "metrics.json").read_text())["channels_last"] is True
    weights = read_weights_file(tmp_path / "checkpoints" / "last.pt")["model"]
    assert weights["backbone.body.conv1.weight"].is_contiguous(memory_format=torch.channels_last)


def test_device_and_precision_are_checked_where_they_are_named():
    from segexp.runtime import autocast, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"trainer.precision=8: use"):
        autocast(torch.device("cpu"), "8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device=cuda but no CUDA device.*use --device=cpu"):
            resolve_device("cuda", option="--device")
        with pytest.raises(ConfigError, match=r"trainer.device=cuda:1 .*\(or trainer=cpu\)"):
            resolve_device("cuda:1")


@pytest.mark.parametrize("transforms", ["mmseg", "strong"])
def test_training_with_the_mmseg_and_mixing_pipelines(tmp_path, transforms):
    from segexp.data.mixing import MixedDataset
    from segexp.engine.experiment import build_datasets

    cfg = tiny_config(f"transforms={transforms}", "trainer.max_iters=2", "trainer.val_interval=2")
    train_set, _ = build_datasets(cfg)
    assert isinstance(train_set, MixedDataset) == (transforms == "strong")
    run_training(cfg, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "completed"


def test_compiled_training_step_matches_the_plain_one(tmp_path):
    """trainer.compile wraps what the step calls; the eager backend traces the model with
    TorchDynamo without generating kernels, so the weights must come out the same."""
    overrides = ["trainer.max_iters=2", "trainer.val_interval=2", "head.dropout=0"]
    run_training(tiny_config(*overrides), tmp_path / "plain")
    run_training(tiny_config(*overrides, "trainer.compile=true", "trainer.compile_backend=eager"),
                 tmp_path / "compiled")
    plain, compiled = last_weights(tmp_path / "plain"), last_weights(tmp_path / "compiled")
    assert set(plain) == set(compiled)  # checkpoints hold the plain module's names
    for name in plain:
        torch.testing.assert_close(compiled[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_inductor_compiled_training_runs(tmp_path):
    """The real thing: inductor generates C++ kernels on the CPU (a minute or two)."""
    run_training(tiny_config("trainer.max_iters=2", "trainer.val_interval=2", "trainer.compile=true"),
                 tmp_path)
    assert read_weights_file(tmp_path / "checkpoints" / "last.pt")["state"]["iter"] == 2


def test_channels_last_training_matches_the_default_layout(tmp_path):
    # Other convolution kernels run on NHWC tensors: the same losses up to rounding (the weights
    # of this tiny model, whose deepest BatchNorm sees two values, drift apart faster).
    # SGD: its step is linear in the gradient, so rounding differences stay rounding-sized (Adam
    # divides by the gradient's own scale and turns them into whole lr-sized steps).
    overrides = ["model=fcn", "head.channels=16", "trainer.max_iters=3", "trainer.val_interval=3",
                 "trainer.log_interval=1", "head.dropout=0", "optimizer=sgd"]
    run_training(tiny_config(*overrides, "trainer.channels_last=false"), tmp_path / "plain")
    run_training(tiny_config(*overrides, "trainer.channels_last=true"), tmp_path / "nhwc")
    losses = [[json.loads(line)["train/loss"] for line in (tmp_path / d / "metrics.jsonl").read_text()
               .splitlines() if "train/loss" in line] for d in ("plain", "nhwc")]
    # The first loss comes from identical weights (kernel rounding only); later ones after steps
    # whose rounding differences grow (rel 1.3e-3 after two steps with oneDNN capped at AVX2).
    assert len(losses[0]) == 3 and losses[1][0] == pytest.approx(losses[0][0], rel=1e-4)
    assert losses[1] == pytest.approx(losses[0], rel=5e-3)
    checkpoint = read_weights_file(tmp_path / "nhwc" / "checkpoints" / "last.pt")
    assert checkpoint["model"]["backbone.body.conv1.weight"].is_contiguous(
        memory_format=torch.channels_last)
