"""scripts/bench/record_run.py: the record behind a README figure holds what the run reached, the exact
command and the machine, and a failed run is recorded as failed."""

from __future__ import annotations

import json
import shlex

import pytest

from tests.conftest import load_script

TINY = ["trainer=debug", "dataset.train_length=4", "dataset.val_length=2",
        "head.decoder_channels=[8,8,8]", "trainer.measure_speed=false"]


def test_a_recorded_run_holds_its_figures_command_and_machine(tmp_path):
    record_run = load_script("bench/record_run")
    out = tmp_path / "record.json"
    record = record_run.main(["--out", str(out), "--work", str(tmp_path / "runs"), "--", *TINY])
    assert json.loads(out.read_text()) == record
    (summary_path,) = (tmp_path / "runs").glob("*/metrics.json")
    summary = json.loads(summary_path.read_text())
    assert record["status"] == "completed" and record["exit_code"] == 0
    assert record["best"] == summary["best"] and record["iters"] == summary["iters"] == 2
    assert shlex.split(record["command"]) == ["python", "train.py", *TINY]  # pasteable as is
    assert record["machine"]["cpu"] and record["machine"]["torch"]
    assert record["wall_clock_s"] > 0 and record["pretrained"] in ("none", "imagenet")


def test_a_failed_run_is_recorded_as_failed(tmp_path):
    record_run = load_script("bench/record_run")
    out = tmp_path / "record.json"
    with pytest.raises(SystemExit) as exit_info:
        record_run.main(["--out", str(out), "--work", str(tmp_path / "runs"), "--", *TINY,
                         "trainer.batch_size=0"])
    assert exit_info.value.code != 0
    record = json.loads(out.read_text())
    assert record["status"] == "failed" and record["exit_code"] != 0 and record["best"] is None
