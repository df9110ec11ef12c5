"""segexp-bench (segexp.cli.benchmark): the table's columns in CSV and JSON, --all --dry-run; no
timed assertions (the figures are data, only checked to be positive numbers)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from segexp.models.cost import model_cost
from tests.conftest import ALL_MODELS

NUMERIC = ["params_m", "gflops", "latency_ms", "fps", "train_iter_ms"]
FAST = ["--size", "64", "64", "--iters", "2", "--warmup", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def bench():
    import segexp.cli.benchmark

    return segexp.cli.benchmark


def test_two_tiny_models_write_csv_and_json(bench, tmp_path, capsys):
    out = tmp_path / "results.csv"
    bench.main(["model=fcn", "head.channels=16", *FAST, "--out", str(out)])
    bench.main(["model=segformer", *FAST, "--out", str(tmp_path / "segformer.csv")])
    printed = capsys.readouterr().out
    assert "| model | backbone | GFLOPs | params (M) | FPS | iter time (ms) |" in printed

    rows = [*csv.DictReader(out.open()), *csv.DictReader((tmp_path / "segformer.csv").open())]
    assert [(r["model"], r["backbone"]) for r in rows] == [("fcn", "resnet18"),
                                                           ("segformer", "mit_b0")]
    for row in rows:
        assert list(row) == bench.COLUMNS
        assert row["error"] == ""
        assert row["size"] == "64x64" and row["device"] == "cpu"
        assert row["mem_kind"] == "cpu_maxrss_delta"
        for column in NUMERIC:
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (column, value)
        assert float(row["peak_mem_mb"]) >= 0  # a high-water mark: 0 when an earlier peak was higher
        assert float(row["fps"]) == pytest.approx(1000 / float(row["latency_ms"]), rel=1e-6)

    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["device"] == "cpu" and "memory" in data["meta"]
    (row,) = data["rows"]
    assert set(bench.COLUMNS) <= set(row)
    assert row["overrides"] == "model=fcn head.channels=16"
    assert all(isinstance(row[c], float) and row[c] > 0 for c in NUMERIC)


def test_head_override_changes_the_measured_model(bench, tmp_path):
    """head.channels reaches the model: fewer channels, fewer parameters and FLOPs."""
    small = model_cost(["model=fcn", "head.channels=16"], (64, 64))
    default = model_cost(["model=fcn"], (64, 64))
    assert small[0] < default[0] and small[1] < default[1]


def test_all_dry_run_lists_every_model(bench, capsys):
    rows = bench.main(["--all", "--dry-run"])
    assert [r["model"] for r in rows] == ALL_MODELS
    backbones = {r["model"]: r["backbone"] for r in rows}
    assert backbones["segformer"] == "mit_b0" and backbones["fastfcn"] == "resnet50"
    printed = capsys.readouterr().out
    assert all(m in printed for m in ALL_MODELS)


def test_all_with_model_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--all", "model=fcn", "--dry-run"])
