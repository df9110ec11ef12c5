"""Sweeps end to end: +sweep=compare_models into segexp-compare, a failing job that does
not stop the others, an Optuna search (hparams_search=optuna) and a submitit launch."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import yaml
from PIL import Image

from segexp.cli.compare_runs import compare, main
from tests.conftest import train_py

FAST = ["trainer=debug", "dataset.image_size=32", "dataset.train_length=4", "dataset.val_length=1"]


def has_plugin(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_compare_models_sweep_with_a_failing_job_into_the_comparison(tmp_path):
    # trainer.batch_size=1 is refused for PSPNet only (BatchNorm after global pooling): the first
    # job fails while its model is built, and the two after it still run.
    sweep = tmp_path / "sweep"
    out = train_py("-m", "+sweep=compare_models", "+sweep/pair=pspnet_resnet18,fcn_resnet18,"
                   "segformer_mit_b0", *FAST, "trainer.batch_size=1", f"hydra.sweep.dir={sweep}",
                   # a time budget for every job, capped by FAST's iteration limit (first wins)
                   "trainer.max_time=10m")
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = {p.name: json.loads((p / "metrics.json").read_text())
            for p in sorted(sweep.iterdir()) if (p / "metrics.json").is_file()}
    assert list(jobs) == ["0_pspnet_resnet18_synthetic", "1_fcn_resnet18_synthetic",
                          "2_segformer_mit_b0_synthetic"]
    assert jobs["0_pspnet_resnet18_synthetic"]["status"] == "failed"
    assert "batch_size=1" in jobs["0_pspnet_resnet18_synthetic"]["error"]
    assert [j["status"] for j in list(jobs.values())[1:]] == ["completed", "completed"]

    main([str(sweep), "--out", str(tmp_path / "cmp")])
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "comparison.csv")))
    assert {(r["model"], r["backbone"], r["status"]) for r in rows[:2]} == {
        ("fcn", "resnet18", "completed"), ("segformer", "mit_b0", "completed")}
    assert float(rows[0]["mIoU (%)"]) >= float(rows[1]["mIoU (%)"])  # sorted, failed last
    assert (rows[2]["model"], rows[2]["status"]) == ("pspnet", "failed")
    assert "batch_size=1" in rows[-1]["error"] and rows[-1]["mIoU (%)"] == ""
    for row in rows[:2]:
        assert 0 <= float(row["mIoU (%)"]) <= 100 and float(row["params (M)"]) > 1
        assert row["IoU background (%)"] and row["dataset"] == "synthetic"
        assert float(row["GFLOPs"]) > 0 and float(row["FPS"]) > 0  # from metrics.json, no --flops
        assert row["budget"] == "10m" and int(row["iterations"]) == 2
        assert int(row["images seen"]) == 2  # batch 1
    for name in ("miou_vs_cost.png", "learning_curves.png", "per_class_iou.png"):
        assert (tmp_path / "cmp" / name).read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "<table>" in page and "segformer" in page and "failed" in page
    assert "| fcn | resnet18 |" in (tmp_path / "cmp" / "comparison.md").read_text()


def write_run_folders(root):
    """Run folders as written by train.py: two completed, one failed, one killed before
    metrics.json."""
    for name, summary in {
        "a": {"status": "completed", "best": {"mIoU": 0.5, "aAcc": 0.9}, "params": 2_000_000,
              "gflops": 4.0, "fps": 30.0, "best_per_class": {"x": {"IoU": 0.4}, "y": {"IoU": 0.6}}},
        "b": {"status": "completed", "best": {"mIoU": 0.7, "aAcc": 0.95}, "params": 1_000_000,
              "gflops": 2.0, "best_per_class": {"x": {"IoU": 0.7}, "y": {"IoU": None}},
              "val_images_in_training": 0},
        # validated on images it trained on: the table says so beside its (inflated) mIoU
        "e": {"status": "completed", "best": {"mIoU": 0.9}, "val_images_in_training": 3},
        "c": {"status": "failed", "error": "ConfigError: no | way"},
        "d": None,
    }.items():
        run = root / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"dataset": {"crop_size": [8, 8]}}))
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"runtime": {"choices": {"model": f"m{name}", "backbone": "r18",
                                               "dataset": "toy"}}}}))
        if summary:
            (run / "metrics.json").write_text(json.dumps(summary))
        (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "val/m')


def test_compare_runs_reads_folders_without_training(tmp_path):
    write_run_folders(tmp_path)
    runs = compare([tmp_path], tmp_path / "out")
    assert [(r.path.name, r.status) for r in runs] == [
        ("e", "completed"), ("b", "completed"), ("a", "completed"), ("c", "failed"),
        ("d", "no metrics.json")]
    assert runs[2].fps == 30.0 and runs[1].loss_curve == [(1, 1.0)] and runs[1].crop == [8, 8]
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert ("| b | mb | r18 | toy | 1.00 | 2.00 |  |  |  |  |  | 70.00 | 95.00 | 70.00 |  | completed |"
            in table)
    assert "no \\| way" in table
    assert "| 90.00 |  |  |  | completed (not held out: 3 validation images trained on) |" in table


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _coloured_pixels(png) -> int:
    """Pixels of a clear hue (plot lines, bubbles, bars): text, grid lines and table shading
    are grey or pale."""
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((image.max(-1) - image.min(-1)) > 60).sum())


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium (Debian package: chromium)")
def test_report_html_renders_in_headless_chromium(tmp_path):
    write_run_folders(tmp_path / "runs")
    compare([tmp_path / "runs"], tmp_path / "out")
    page = tmp_path / "out" / "report.html"
    # The same page without its pictures: what a page whose images failed to decode looks like.
    bare = tmp_path / "out" / "bare.html"
    bare.write_text(re.sub(r"src='data:image/png;base64,[^']*'", "src=''", page.read_text()))

    def chromium(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                               "--hide-scrollbars", "--window-size=1400,4000", *args],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HOME": str(tmp_path)})

    dom = chromium("--dump-dom", page.as_uri()).stdout
    assert "<title>segexp run comparison</title>" in dom
    body = dom.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    assert body.count("<tr") == 5 and body.count("class=\"failed\"") == 2
    assert body.count("class=\"not-held-out\"") == 1
    assert dom.count("<img") == 3 and "Run folders" in dom
    shots = {}
    for name, html_file in (("page", page), ("bare", bare)):
        shots[name] = tmp_path / f"{name}.png"
        chromium(f"--screenshot={shots[name]}", html_file.as_uri())
        assert shots[name].read_bytes()[:4] == b"\x89PNG", name
    # The three embedded plots decoded and drew: thousands of coloured pixels the bare page lacks.
    assert _coloured_pixels(shots["page"]) > 5000 > 20 * max(1, _coloured_pixels(shots["bare"]))


@pytest.mark.skipif(not has_plugin("hydra_plugins.hydra_optuna_sweeper"),
                    reason="hydra-optuna-sweeper is not installed")
def test_optuna_search_of_two_trials(tmp_path):
    out = train_py("-m", "hparams_search=optuna", "model=segformer", *FAST,
                   "hydra.sweeper.n_trials=2", "search.crop=choice(32)",
                   f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "search.crop",
                                          "loss.weights.dice"}
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/metrics.json"))]
    assert len(summaries) == 2 and all(s["status"] == "completed" for s in summaries)
    assert math.isclose(result["best_value"], max(s["best"]["mIoU"] for s in summaries))
    config = yaml.safe_load((tmp_path / "0_segformer_mit_b0_synthetic" / ".hydra" / "config.yaml")
                            .read_text())
    assert config["loss"]["_target_"] == "segexp.losses.CombinedLoss"


@pytest.mark.skipif(not has_plugin("hydra_plugins.hydra_submitit_launcher"),
                    reason="hydra-submitit-launcher is not installed")
def test_submitit_local_launch_of_one_job(tmp_path):
    out = train_py("-m", "hydra/launcher=submitit_local", "model=segformer", *FAST,
                   "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "0_segformer_mit_b0_synthetic" / "metrics.json").read_text())
    assert summary["status"] == "completed"
    assert list((tmp_path / ".submitit").iterdir())
