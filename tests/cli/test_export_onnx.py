"""ONNX export (segexp-export, segexp.cli.export_onnx): onnxruntime matches PyTorch at two input sizes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from segexp.engine.checkpoint import save_checkpoint
from segexp.models import build_model
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="onnx / onnxruntime not installed (pip install onnx onnxruntime)")


def _export_onnx():
    import segexp.cli.export_onnx

    return segexp.cli.export_onnx


def make_run(run_dir: Path, *overrides: str) -> None:
    """A run folder as train.py leaves it (saved config + best.pt), without training: the
    weights are a seeded random initialisation, with non-trivial BN statistics."""
    cfg = tiny_config(*overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    save_checkpoint({"model": model.state_dict()}, run_dir / "checkpoints" / "best.pt")


@pytest.mark.parametrize("overrides", [("model=fcn", "head.channels=16"), ("model=segformer",)],
                         ids=["fcn_resnet18", "segformer_mit_b0"])
def test_export_matches_pytorch_at_two_sizes(tmp_path, overrides):
    make_run(tmp_path, *overrides)
    out = tmp_path / "exported" / "model.onnx"
    result = _export_onnx().main([str(tmp_path), "--out", str(out), "--size", "32", "64"])
    assert out.is_file() and result["dynamic"] and result["note"] is None
    sizes = [tuple(r["size"]) for r in result["results"]]
    assert sizes == [(32, 64), (64, 128)]
    assert all(r["error"] is None and r["max_abs_diff"] <= 1e-4 for r in result["results"])

    # The file on its own: a third size and batch 2 through onnxruntime.
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    cfg = OmegaConf.load(tmp_path / ".hydra" / "config.yaml")
    model = build_model(cfg).eval()
    model.load_state_dict(torch.load(tmp_path / "checkpoints" / "best.pt",
                                     weights_only=True)["model"])
    images = torch.randn(2, 3, 96, 32)
    with torch.no_grad():
        expected = model(images).numpy()
    (got,) = session.run(["logits"], {"images": images.numpy()})
    assert got.shape == (2, model.num_classes, 96, 32)
    assert abs(got - expected).max() <= 1e-4


def test_shape_test_baked_in_at_a_tiny_size_is_traced_again(tmp_path, capsys):
    # At 32x32 ResNet's deepest map is 1x1, so ASPP's "resize the pooled map unless it is
    # already that size" is traced as a no-op: the graph fails at 64x96 until traced again there.
    make_run(tmp_path, "model=deeplabv3", "head.channels=16", "model.aux_head=null")
    result = _export_onnx().main([str(tmp_path), "--size", "32", "32"])
    assert "Tracing again at 64x96" in capsys.readouterr().out
    assert result["dynamic"] and result["note"] is None
    assert [tuple(r["size"]) for r in result["results"]] == [(32, 32), (64, 96)]
    assert all(r["error"] is None and r["max_abs_diff"] <= 1e-4 for r in result["results"])


def test_static_export_and_bad_run_folder(tmp_path):
    make_run(tmp_path / "run", "model=fcn", "head.channels=16")
    module = _export_onnx()
    result = module.main([str(tmp_path / "run"), "--static"])
    assert not result["dynamic"] and (tmp_path / "run" / "model_best.onnx").is_file()
    assert [tuple(r["size"]) for r in result["results"]] == [(32, 32)]
    assert result["results"][0]["max_abs_diff"] <= 1e-4
    with pytest.raises(module.SegexpError, match="is not a train.py run folder"):
        module.main([str(tmp_path)])


def test_missing_onnxruntime_is_a_clear_error(monkeypatch):
    module = _export_onnx()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(module.ExportError, match="pip install onnx onnxruntime"):
        module.require_onnxruntime()
