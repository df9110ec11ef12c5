"""Speed and size of segmentation models: params, GFLOPs, inference FPS, training iteration time
and peak memory, for one model or every model on its default backbone.

    segexp-bench model=segformer                       # one model, its default backbone
    segexp-bench model=upernet backbone=convnext_tiny --size 512 512 --device cuda --amp bf16
    segexp-bench --all --size 256 256 --out outputs/benchmark/cpu.csv
    segexp-bench model=fcn,pspnet,segformer --size 256 256   # several models
    segexp-bench --all --dry-run                       # list what --all would measure

Takes the same overrides as train.py (with ``--all`` they apply to every model). For each model:

- params (M) and GFLOPs (multiply-accumulates x 1e-9, batch 1, at ``--size``) from
  ``segexp.models.cost.model_cost`` (meta device, attention counted through SDPA's math backend);
- inference: ``--warmup`` untimed then ``--iters`` timed forward passes of ``--batch`` random
  images (eval mode, no grad, ``--amp`` autocast); latency is the median, FPS = batch / latency;
- training: ``--warmup`` + ``--iters`` iterations of forward (with the auxiliary head, or the
  query predictions of a mask-classification model, as ``train_step``) + the configured loss
  (the loop's ``model_loss``) on random labels + backward + SGD step on ``--train-batch``
  random images (default 2: BatchNorm after global pooling needs more than one sample); the
  median is reported;
- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the model's runs (tensors only,
  ``mem_kind=cuda_max_allocated``); on CPU the growth of the process's peak resident set size
  (``resource.getrusage(...).ru_maxrss``) while the model is built and run (``mem_kind=
  cpu_maxrss_delta``). The CPU figure is a high-water mark of the whole process: with ``--all``,
  a model that needs less than an earlier one shows 0 (run it alone for its own figure).

Prints a table (model, backbone, GFLOPs, params, FPS, iter time, memory) and writes it as CSV to
``--out`` and as JSON beside it (same name, ``.json``). Timings depend on the machine and its
load; the tests check the columns, never the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import resource
import sys
from pathlib import Path

import torch
from hydra.errors import HydraException
from tqdm import tqdm

from segexp.atomic import write_text, write_with
from segexp.cli import command
from segexp.config import CONF_DIR, compose_train_config, instantiate
from segexp.engine.experiment import check_loss_fits_model
from segexp.engine.trainer import model_loss
from segexp.errors import SegexpError
from segexp.models import build_model
from segexp.models.cost import model_cost
from segexp.profiling import measure_fps, median_time
from segexp.runtime import autocast, resolve_device

# Under the working directory, as train.py's run folders.
DEFAULT_OUT = Path("outputs") / "benchmark" / "benchmark.csv"
AMP = {"none": "32", "bf16": "bf16", "fp16": "16"}
COLUMNS = ["model", "backbone", "overrides", "size", "batch", "train_batch", "device", "amp",
           "params_m", "gflops", "latency_ms", "fps", "train_iter_ms", "peak_mem_mb", "mem_kind",
           "error"]


def all_models() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def _split(overrides: list[str]) -> tuple[str | None, list[str]]:
    """The ``model=`` choice (if any) and the remaining overrides."""
    model, rest = None, []
    for o in overrides:
        if o.startswith("model="):
            model = o.split("=", 1)[1]
        else:
            rest.append(o)
    return model, rest


def _maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def benchmark(overrides: list[str], size: tuple[int, int], batch: int, train_batch: int,
              device: torch.device, amp: str, iters: int, warmup: int) -> dict:
    """One row of the table for the model that ``overrides`` compose."""
    cfg = compose_train_config(list(overrides))[0]
    precision = AMP[amp]
    params, gflops = model_cost(list(overrides), tuple(size))
    row = {"params_m": params, "gflops": gflops}

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _maxrss_mb()

    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).to(device)  # speed does not depend on weights
    criterion = instantiate(cfg.loss).to(device)
    check_loss_fits_model(cfg, model)  # e.g. loss=ce for a mask-classification model
    num_classes = int(cfg.model.num_classes)
    height, width = size

    # -- inference
    latency = batch / measure_fps(model, size, device, precision, batch, iters, warmup)

    # -- training
    model.train()
    params_to_train = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params_to_train, lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16")
    train_images = torch.randn(train_batch, 3, height, width, device=device)
    masks = torch.randint(0, num_classes, (train_batch, height, width), device=device)

    def train_iter():
        with autocast(device, precision):
            loss = model_loss(criterion, model, model(train_images, return_aux=True), masks)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    iter_time = median_time(train_iter, device, iters, warmup)

    if device.type == "cuda":
        memory, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        memory, kind = max(0.0, _maxrss_mb() - rss_before), "cpu_maxrss_delta"
    row.update({"latency_ms": 1000 * latency, "fps": batch / latency,
                "train_iter_ms": 1000 * iter_time, "peak_mem_mb": memory, "mem_kind": kind})
    return row


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def format_table(rows: list[dict]) -> str:
    memory_unit = "peak memory (MB)"
    lines = [f"| model | backbone | GFLOPs | params (M) | FPS | iter time (ms) | {memory_unit} |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['backbone']} | {fmt(r.get('gflops'), '.2f')} | "
                         f"{fmt(r.get('params_m'), '.2f')} | failed: {r['error']} | | |")
            continue
        lines.append(f"| {r['model']} | {r['backbone']} | {r['gflops']:.2f} | {r['params_m']:.2f} | "
                     f"{r['fps']:.2f} | {r['train_iter_ms']:.1f} | {r['peak_mem_mb']:.0f} |")
    return "\n".join(lines)


def write(rows: list[dict], out: Path, meta: dict, columns: list[str] = COLUMNS) -> tuple[Path, Path]:
    """``columns`` of the rows as CSV at ``out``; all of them, with ``meta``, as JSON beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: r.get(k, "") for k in columns})

    write_with(out, write_csv)
    json_path = out.with_suffix(".json")
    # NaN is not JSON: a missing figure is null.
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
             for r in rows]
    write_text(json_path, json.dumps({"meta": meta, "rows": clean}, indent=2) + "\n")
    return out, json_path


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides as for train.py, e.g. "
                        "model=upernet backbone=convnext_tiny")
    parser.add_argument("--all", action="store_true",
                        help="every conf/model/*.yaml on its default backbone")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the models and backbones that would be measured, measure nothing")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                        help="input height and width (default: 512 512)")
    parser.add_argument("--batch", type=int, default=1, help="inference batch size (default: 1)")
    parser.add_argument("--train-batch", type=int, default=2,
                        help="training batch size (default: 2)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--amp", choices=list(AMP), default="none",
                        help="autocast dtype (fp16 needs CUDA; default: none = float32)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"CSV file; the JSON goes beside it (default: {DEFAULT_OUT})")
    args = parser.parse_intermixed_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.batch < 1 or args.train_batch < 1:
        parser.error("need --iters >= 1, --warmup >= 0, --batch >= 1 and --train-batch >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model, rest = _split(args.overrides)
    if args.all:
        if model is not None:
            parser.error("--all measures every model: leave out model=")
        jobs = [[f"model={m}", *rest] for m in all_models()]
    else:
        # model=a,b,c (Hydra's sweep syntax) measures several models, each on its default backbone
        jobs = [[f"model={m}", *rest] for m in model.split(",")] if model else [list(rest)]

    device = resolve_device(args.device, option="--device")
    if args.amp == "fp16" and device.type != "cuda":
        parser.error("--amp fp16 needs a CUDA device; use --amp bf16 or none on the CPU")
    entries = []
    for overrides in jobs:
        cfg = compose_train_config(list(overrides))[0]
        name = cfg.model.get("_target_", "").rsplit(".", 1)[-1]
        model_name = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "unet")
        backbone = next((o.split("=", 1)[1] for o in overrides if o.startswith("backbone=")),
                        str(cfg.get("default_backbone", name)))
        entries.append((model_name, backbone, overrides))

    if args.dry_run:
        for model_name, backbone, overrides in entries:
            print(f"{model_name}\t{backbone}\t{' '.join(overrides)}")
        return [{"model": m, "backbone": b, "overrides": " ".join(o)} for m, b, o in entries]

    rows = []
    progress = tqdm(entries, desc="models", disable=len(entries) < 2)
    for model_name, backbone, overrides in progress:
        progress.set_postfix_str(f"{model_name} {backbone}")
        row = {"model": model_name, "backbone": backbone, "overrides": " ".join(overrides),
               "size": f"{args.size[0]}x{args.size[1]}", "batch": args.batch,
               "train_batch": args.train_batch, "device": device.type, "amp": args.amp,
               "error": ""}
        try:
            row.update(benchmark(overrides, tuple(args.size), args.batch, args.train_batch, device,
                                 args.amp, args.iters, args.warmup))
        except (SegexpError, HydraException, RuntimeError, ValueError) as err:
            if not args.all:
                raise
            row["error"] = str(err).strip().splitlines()[0][:200]
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    meta = {"command": "segexp-bench " + " ".join(argv), "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "iters": args.iters, "warmup": args.warmup,
            "memory": "cuda_max_allocated: torch.cuda.max_memory_allocated over inference and "
                      "training; cpu_maxrss_delta: growth of the process's peak RSS (ru_maxrss)"}
    print()
    print(format_table(rows))
    mem_kinds = sorted({r["mem_kind"] for r in rows if r.get("mem_kind")})
    print(f"\n{device.type}, size {args.size[0]}x{args.size[1]}, inference batch {args.batch}, "
          f"training batch {args.train_batch}, amp {args.amp}, median of {args.iters} after "
          f"{args.warmup} warm-up; memory: {', '.join(mem_kinds) or '-'}")
    csv_path, json_path = write(rows, args.out, meta)
    print(f"Wrote {csv_path} and {json_path}")
    return rows


def cli() -> None:
    """The ``segexp-bench`` command (and ``python scripts/benchmark.py``)."""
    command(main)


if __name__ == "__main__":
    cli()
