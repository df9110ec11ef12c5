"""scripts/bench/peers.py: the pairs, the CSV/JSON columns, ratios = segexp / peer of the recorded
times, a missing peer package reported as a skipped row; no timed assertions (figures are data)."""

from __future__ import annotations

import csv
import json
import math
import sys

import pytest
import torch

from tests.conftest import load_script

TINY = ["--size", "64", "64", "--batch", "2", "--iters", "1", "--warmup", "0", "--device", "cpu",
        "--num-classes", "4"]
TIMES = ["segexp_train_ms", "peer_train_ms", "segexp_latency_ms", "peer_latency_ms"]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/peers")


def test_three_pairs_write_csv_and_json_with_ratios_of_the_recorded_times(bench, tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("segmentation_models_pytorch")
    out = tmp_path / "peers.csv"
    returned = bench.main(["--pairs", "segformer_b0,fcn_r50-torchvision", *TINY, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| pair | classes | params M (segexp / peer) |" in printed and "train ratio" in printed

    rows = list(csv.DictReader(out.open()))
    assert [r["pair"] for r in rows] == ["segformer_b0-transformers", "segformer_b0-smp",
                                         "fcn_r50-torchvision"]
    for row in rows:
        assert list(row) == bench.COLUMNS
        assert row["status"] == "ok", row["status"]
        assert (row["size"], row["batch"], row["device"], row["num_classes"]) == ("64x64", "2", "cpu", "4")
        assert row["mem_kind"] == "tensor_peak"
        for column in [*TIMES, "segexp_gflops", "peer_gflops", "segexp_peak_mb", "peer_peak_mb"]:
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (column, value)
        assert float(row["train_ratio"]) == pytest.approx(
            float(row["segexp_train_ms"]) / float(row["peer_train_ms"]), rel=1e-9)
        assert float(row["latency_ratio"]) == pytest.approx(
            float(row["segexp_latency_ms"]) / float(row["peer_latency_ms"]), rel=1e-9)
        for kind in ("train", "latency"):  # one round: its own ratio is the ratio
            assert float(row[f"{kind}_ratio_min"]) == pytest.approx(float(row[f"{kind}_ratio"]), rel=1e-9)
            assert float(row[f"{kind}_ratio_max"]) == pytest.approx(float(row[f"{kind}_ratio"]), rel=1e-9)
        # These three pairs are the same architecture on both sides: equal size shows like for like.
        assert row["segexp_params_m"] == row["peer_params_m"]
        assert float(row["segexp_gflops"]) == pytest.approx(float(row["peer_gflops"]), rel=1e-6)
        assert "model.num_classes=4" in row["segexp_overrides"]

    data = json.loads(out.with_suffix(".json").read_text())
    meta = data["meta"]
    assert meta["command"].startswith("python scripts/bench/peers.py --pairs segformer_b0,fcn_r50")
    assert meta["device"] == "cpu" and meta["device_name"]
    assert set(meta["versions"]) >= {"torch", "torchvision", "transformers", "segmentation_models_pytorch"}
    assert [r["pair"] for r in data["rows"]] == [r["pair"] for r in returned] == [r["pair"] for r in rows]
    assert all(isinstance(r[c], float) for r in data["rows"] for c in TIMES)


def test_dry_run_lists_every_pair(bench, capsys):
    rows = bench.main(["--dry-run"])
    names = [r["pair"] for r in rows]
    assert names == [
        "upernet_convnext_t-transformers", "upernet_convnext_t-smp",
        "segformer_b0-transformers", "segformer_b0-smp", "segformer_b2-transformers", "segformer_b2-smp",
        "mask2former_swin_t-transformers", "deeplabv3_r50-torchvision", "fcn_r50-torchvision",
        "unet_r50-smp", "pspnet_r50-smp"]
    printed = capsys.readouterr().out
    assert all(name in printed for name in names)
    assert all(r["note"] and r["peer_config"] and r["num_classes"] >= 2 for r in rows)


def test_pairs_select_by_architecture_or_peer(bench):
    assert [p.name for p in bench.select_pairs(["segformer_b2"])] == ["segformer_b2-transformers",
                                                                      "segformer_b2-smp"]
    assert [p.name for p in bench.select_pairs(["torchvision"])] == ["deeplabv3_r50-torchvision",
                                                                     "fcn_r50-torchvision"]


def test_missing_peer_package_is_a_skipped_row_and_the_other_pairs_run(bench, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # makes its import fail
    out = tmp_path / "peers.csv"
    rows = bench.main(["--pairs", "segformer_b0,unet_r50", *TINY, "--out", str(out)])
    status = {r["pair"]: r["status"] for r in rows}
    assert status["segformer_b0-transformers"] == "ok"
    for pair in ("segformer_b0-smp", "unet_r50-smp"):
        assert status[pair] == "skipped: install segmentation-models-pytorch==0.6.0 (benchmark only)"
    written = {r["pair"]: r for r in csv.DictReader(out.open())}
    assert written["unet_r50-smp"]["status"].startswith("skipped")
    assert written["unet_r50-smp"]["train_ratio"] == ""


def test_both_sides_return_full_resolution_logits_and_overrides_reach_segexp(bench):
    pytest.importorskip("transformers")
    pair = next(p for p in bench.PAIRS if p.name == "segformer_b0-transformers")
    segexp, peer, _ = bench.build_contenders(pair, 4, [])
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert segexp.model.eval().__call__(images).shape == (2, 4, 64, 96)
        peer.model.eval()
        assert peer.logits(images).shape == (2, 4, 64, 96)  # transformers gives 16x24, upsampled
    narrow, _, overrides = bench.build_contenders(pair, 4, ["head.channels=16"])
    assert overrides[-1] == "head.channels=16"
    assert bench.count_params(narrow.model) < bench.count_params(segexp.model)


@pytest.mark.parametrize("argv, message", [
    (["--pairs", "nope"], "unknown pair(s) nope"),
    (["--size", "100", "64"], "multiples of 32"),
    (["--batch", "1"], "--batch must be at least 2"),
    (["--segexp-override", "fcn_r50-torchvision"], "expected PAIR:KEY=VALUE"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
])
def test_bad_options_are_clear_errors(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "bench/peers.py: error: " in err and message in err
