"""Export a trained run's model to ONNX and check it against PyTorch with onnxruntime.

    segexp-export outputs/2026-11-22/10-00-00_fcn_resnet18_synthetic
    segexp-export RUN_DIR --checkpoint last --out fcn.onnx --size 512 512

The graph takes ``images`` (N, 3, H, W) float32, normalised as in training, and returns
``logits`` (N, num_classes, H, W). Batch, height and width are dynamic axes unless ``--static``
is given; H and W must stay multiples of the backbone's size divisor (32 for ResNet). After
exporting, onnxruntime runs the graph at ``--size`` and at a second size (dynamic export) and
the largest absolute difference from PyTorch is printed; above ``--atol`` the export is refused.
Fallbacks, each printed: a graph that fails at the second size is traced again at that size
(a shape test such as "resize unless already that size" gets baked in when a small example
leaves a 1x1 feature map); a model the TorchScript exporter cannot make dynamic (adaptive
pooling in PSPNet / UPerNet / FastFCN / Lite-HRNet, ViT position-embedding resampling) is
exported at the static ``--size``, with the torch.export-based exporter (needs onnxscript) when
the TorchScript one fails even then. CCNet's graph (EyeLike) does not load in onnxruntime's CPU
provider and SegNeXt's head is random at inference (fresh NMF bases): both are refused with
the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from segexp.cli import command
from segexp.errors import SegexpError
from segexp.inference import checkpoint_path as run_checkpoint
from segexp.inference import load_run_config, load_trained_model

DEFAULT_OPSET = 17


class ExportError(SegexpError):
    """The export could not be made or does not match PyTorch."""


def require_onnxruntime():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as err:
        raise ExportError(
            f"{err.name or 'onnxruntime'} is not installed; the export and its check need it: "
            "pip install onnx onnxruntime") from err
    return onnxruntime


def default_size(cfg, divisor: int) -> tuple[int, int]:
    """The run's crop size (else its image size, else 512), rounded up to the size divisor."""
    dataset = cfg.get("dataset") or {}
    size = dataset.get("crop_size") or dataset.get("image_size") or 512
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return -(-h // divisor) * divisor, -(-w // divisor) * divisor


def second_size(size: tuple[int, int], divisor: int) -> tuple[int, int]:
    """Another valid size, different in both height and width, for the dynamic-axes check."""
    return size[0] + divisor, size[1] + 2 * divisor


@contextlib.contextmanager
def _quiet_fds():
    """Silence file descriptors 1 and 2 (C++ writes that Python's redirection cannot catch)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def export(model: torch.nn.Module, path: Path, size: tuple[int, int], opset: int,
           dynamic: bool, dynamo: bool = False) -> None:
    example = torch.randn(1, 3, *size)
    if dynamo:  # torch.export-based exporter, static shapes: covers some ops TorchScript lacks
        if importlib.util.find_spec("onnxscript") is None:
            raise ExportError("the TorchScript exporter cannot export this model and the "
                              "torch.export-based one needs onnxscript: pip install onnxscript")
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), input_names=["images"],
                              output_names=["logits"], opset_version=max(opset, 18),
                              dynamo=True, external_data=False)
        return
    dynamic_axes = {"images": {0: "batch", 2: "height", 3: "width"},
                    "logits": {0: "batch", 2: "height", 3: "width"}} if dynamic else None
    path.parent.mkdir(parents=True, exist_ok=True)
    # Tracer warnings about shape checks are expected; a failing export dumps its whole graph
    # from C++ (torch's exporter leaves its ONNX log on), hence the fd-level silence.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_fds():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["images"],
                          output_names=["logits"], dynamic_axes=dynamic_axes,
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def export_static(model: torch.nn.Module, path: Path, size: tuple[int, int], opset: int) -> None:
    """TorchScript exporter at a fixed size, else the torch.export-based one (opset >= 18)."""
    try:
        export(model, path, size, opset, dynamic=False)
    except Exception as err:
        message = _export_failure(err, model)
        reason = message.split(". Adaptive pooling")[0]
        print(f"TorchScript exporter failed ({reason}); trying the torch.export-based exporter "
              "(dynamo=True, static size).")
        try:
            export(model, path, size, opset, dynamic=False, dynamo=True)
        except ExportError:
            raise
        except Exception as err2:
            raise ExportError(f"{message}; the torch.export-based exporter failed too: "
                              f"{type(err2).__name__}: {str(err2).strip().splitlines()[0][:300]}"
                              ) from err2


def check_deterministic(model: torch.nn.Module, size: tuple[int, int]) -> None:
    """Refuse a model whose eval-mode output changes between two calls on the same input: no
    export of it can be checked against PyTorch."""
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first, second = model(images), model(images)
    if not torch.equal(first, second):
        raise ExportError(
            "the model's eval-mode output changes from one call to the next on the same input "
            f"(max difference {float((first - second).abs().max()):.3g}), so an ONNX export "
            "cannot be checked against it. SegNeXt's LightHam head draws random NMF bases on "
            "every forward pass (head.rand_init=true); a model trained that way has no fixed "
            "bases to export.")


def _export_failure(err: Exception, model: torch.nn.Module) -> str:
    message = f"torch.onnx.export failed: {type(err).__name__}: {str(err).strip().splitlines()[0][:500]}"
    if "adaptive_avg_pool2d" in str(err):
        stride = max(model.feature_source.reductions)
        message += (f". Adaptive pooling (PSPNet / UPerNet pyramid pooling, bins 1, 2, 3, 6) "
                    "exports only with a static size whose pooled feature map divides by every "
                    f"bin: pass --static --size H W with H and W multiples of {6 * stride} "
                    f"(6 x the deepest stride {stride}).")
    return message


def compare(model: torch.nn.Module, path: Path, sizes: list[tuple[int, int]],
            seed: int = 0) -> list[dict]:
    """Run PyTorch and onnxruntime on random inputs of each size; one result per size:
    ``size``, ``max_abs_diff`` (``inf`` when onnxruntime fails) and ``error``."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)  # failures are reported below, not as log lines
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # e.g. an operator onnxruntime's CPU provider does not implement
        raise ExportError(f"{path} was written but onnxruntime cannot load it: "
                          f"{type(err).__name__}: {str(err).strip().splitlines()[0][:500]}") from err
    generator = torch.Generator().manual_seed(seed)
    results = []
    for size in sizes:
        images = torch.randn(1, 3, *size, generator=generator)
        with torch.no_grad():
            expected = model(images).numpy()
        try:
            (got,) = session.run(["logits"], {"images": images.numpy()})
        except Exception as err:  # onnxruntime raises its own exception types
            results.append({"size": size, "max_abs_diff": float("inf"),
                            "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
            continue
        if got.shape != expected.shape:
            results.append({"size": size, "max_abs_diff": float("inf"),
                            "error": f"output shape {got.shape}, PyTorch gives {expected.shape}"})
            continue
        results.append({"size": size, "max_abs_diff": float(np.abs(got - expected).max()),
                        "error": None})
    return results


def _report(results: list[dict], atol: float) -> bool:
    ok = True
    for r in results:
        h, w = r["size"]
        if r["error"]:
            print(f"  {h}x{w}: FAILED ({r['error']})")
            ok = False
        else:
            passed = r["max_abs_diff"] <= atol
            ok &= passed
            print(f"  {h}x{w}: max abs diff {r['max_abs_diff']:.3g} "
                  f"({'ok' if passed else f'above {atol:g}'})")
    return ok


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder written by train.py")
    parser.add_argument("--checkpoint", default="best",
                        help="best, last, or a checkpoint file (default: best)")
    parser.add_argument("--out", type=Path, default=None,
                        help="ONNX file to write (default: RUN_DIR/model_<checkpoint>.onnx)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="example input size (default: the run's crop size)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default: {DEFAULT_OPSET})")
    parser.add_argument("--static", action="store_true",
                        help="fixed input size instead of dynamic batch/height/width axes")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest accepted |onnxruntime - PyTorch| (default: 1e-4)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.aux_head=null")
    args = parser.parse_args(argv)

    require_onnxruntime()  # fail before the (slow) model build when it is missing
    cfg = OmegaConf.merge(load_run_config(args.run_dir), OmegaConf.from_dotlist(args.overrides))
    checkpoint_path = run_checkpoint(args.run_dir, args.checkpoint)

    model, _ = load_trained_model(checkpoint_path, cfg)
    model.eval()
    divisor = model.size_divisor
    size = tuple(args.size) if args.size else default_size(cfg, divisor)
    model.check_input_size(*size)  # a clear message for a size the backbone cannot take
    out = args.out or args.run_dir / f"model_{checkpoint_path.stem}.onnx"
    check_deterministic(model, size)

    dynamic, note = not args.static, None
    print(f"Exporting {checkpoint_path} ({'dynamic' if dynamic else 'static'} size, example "
          f"{size[0]}x{size[1]}, opset {args.opset}) to {out}")
    try:
        if dynamic:
            export(model, out, size, args.opset, dynamic)
        else:
            export_static(model, out, size, args.opset)
    except Exception as err:
        if not dynamic:
            raise
        note = (f"dynamic height/width export failed ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0][:300]}); exported with the static size "
                f"{size[0]}x{size[1]}")
        print(f"Note: {note}.")
        dynamic = False
        export_static(model, out, size, args.opset)

    sizes = [size, second_size(size, divisor)] if dynamic else [size]
    print("onnxruntime vs PyTorch:")
    results = compare(model, out, sizes)
    ok = _report(results, args.atol)
    if dynamic and not ok:
        # A shape test taken at trace time (e.g. "resize unless already that size", true when a
        # small example leaves a 1x1 deepest map) is baked into the graph: trace again at the
        # larger size before giving up on dynamic axes.
        print(f"Tracing again at {sizes[1][0]}x{sizes[1][1]}:")
        export(model, out, sizes[1], args.opset, dynamic)
        results = compare(model, out, sizes)
        ok = _report(results, args.atol)
    if dynamic and not ok:
        dynamic = False
        note = (f"this model does not export with dynamic height/width (the traced graph does "
                f"not hold at other sizes); exported again with the static size {size[0]}x{size[1]}")
        print(f"Note: {note}.")
        export_static(model, out, size, args.opset)
        results = compare(model, out, [size])
        ok = _report(results, args.atol)
    if not ok:
        raise ExportError(f"{out} does not match PyTorch within {args.atol:g} (see above).")
    print(f"Wrote {out} ({'dynamic batch/height/width' if dynamic else f'static 1x3x{size[0]}x{size[1]}'}"
          f"; H and W multiples of {divisor})")
    return {"path": str(out), "dynamic": dynamic, "results": results, "note": note}


def cli() -> None:
    """The ``segexp-export`` command (and ``python scripts/export_onnx.py``)."""
    with torch.no_grad():  # not set_grad_enabled(False): the command may run inside a program
        command(main)


if __name__ == "__main__":
    cli()
