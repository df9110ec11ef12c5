"""scripts/bench/pipeline.py: loader vs model vs end-to-end throughput and FLOP accounting
(the figures are recorded, never asserted as timings)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from segexp.config import compose_train_config
from segexp.engine.options import TrainerOptions
from segexp.models import build_model
from segexp.profiling import count_gflops
from tests.conftest import load_script

bench_pipeline = load_script("bench/pipeline")

TINY = ["model=fcn", "head.channels=16", "head.dropout=0", "dataset.image_size=32",
        "dataset.train_length=4", "trainer.batch_size=2", "trainer.num_workers=0"]


def test_pipeline_benchmark_columns_and_flop_accounting(tmp_path):
    out = tmp_path / "pipe.csv"
    row = bench_pipeline.main([*TINY, "--iters", "2", "--warmup", "1", "--peak-tflops", "0.5",
                               "--device", "cpu", "--out", str(out)])
    (written,) = list(csv.DictReader(open(out)))
    assert list(written) == bench_pipeline.COLUMNS
    meta = json.loads(out.with_suffix(".json").read_text())["meta"]
    assert meta["command"].startswith("python scripts/bench/pipeline.py model=fcn")
    for key in ("loader_img_s", "model_img_s", "end_to_end_img_s"):
        assert row[key] > 0
    assert row["loader_bound"] == (row["end_to_end_img_s"] < 0.9 * row["model_img_s"])
    assert row["achieved_tflops"] == pytest.approx(
        row["train_gflop_per_image"] * row["end_to_end_img_s"] / 1e3, rel=0.01)
    assert row["mfu"] == pytest.approx(row["achieved_tflops"] / 0.5, rel=0.01)
    # A training step costs the forward pass (2 FLOPs per multiply-accumulate) and a backward
    # pass of up to twice that (the first layer needs no input gradient).
    with torch.device("meta"):
        model = build_model(compose_train_config(TINY)[0])
    forward_gflop = 2 * count_gflops(model, (32, 32))
    assert 2.0 * forward_gflop < row["train_gflop_per_image"] <= 3.05 * forward_gflop


def test_peak_is_unknown_on_the_cpu_and_given_wins():
    assert bench_pipeline.peak_for(torch.device("cpu"), None) is None
    assert bench_pipeline.peak_for(torch.device("cpu"), 123.0) == 123.0


def test_runs_on_a_real_sample_split(tmp_path, shared_datasets):
    """The Cityscapes sample holds only val/: --split val reads it with the training transforms."""
    row = bench_pipeline.main(["model=fcn", "head.channels=16", "dataset=cityscapes",
                               f"dataset.root={shared_datasets / 'samples' / 'cityscapes'}",
                               "dataset.crop_size=[64,128]", "trainer.batch_size=2",
                               "trainer.num_workers=1", "--split", "val", "--iters", "1",
                               "--warmup", "1", "--device", "cpu", "--out", str(tmp_path / "c.csv")])
    assert row["dataset"] == "cityscapes" and row["num_workers"] == 1 and row["loader_img_s"] > 0


def test_the_record_says_what_auto_resolved_to(tmp_path):
    """trainer.precision/channels_last=auto are recorded as run (e.g. '32', NCHW), not as written."""
    row = bench_pipeline.main([*TINY, "--iters", "1", "--warmup", "1", "--device", "cpu",
                               "--out", str(tmp_path / "p.csv")])
    expected = TrainerOptions(precision="auto", channels_last="auto").resolved_for(
        torch.device("cpu"))
    assert row["precision"] == expected.precision != "auto"
    assert row["channels_last"] is expected.channels_last
