"""Is the data loader the bottleneck? Training throughput with data loading against the model
alone, and (on a GPU) the achieved TFLOP/s and model FLOPs utilisation (MFU).

    python scripts/bench/pipeline.py model=upernet backbone=convnext_tiny dataset=ade20k \\
        dataset.root=../shared/datasets/samples/ade20k --split val
    python scripts/bench/pipeline.py model=segformer backbone=mit_b2 dataset=cityscapes \\
        dataset.root=/data/cityscapes trainer.precision=bf16 trainer.batch_size=8 --device cuda

Takes the same overrides as train.py (model, dataset, trainer.batch_size, trainer.num_workers,
trainer.precision, trainer.channels_last, ...) and measures, each after ``--warmup`` untimed
iterations, ``--iters`` training iterations of the loop's own ``train_step`` + ``optimizer_step``:

- ``loader``: the training DataLoader alone (``trainer.num_workers`` workers, the dataset's
  training transforms), images/s;
- ``model``: one batch kept on the device, fed again and again: the model's ceiling;
- ``end_to_end``: batches from the loader, copied to the device as ``fit`` does.

``loader_bound`` is true when end-to-end throughput falls more than 10 % below the model's.
Training FLOPs per image are counted once (forward + backward, ``torch.utils.flop_counter``,
attention on SDPA's math backend); TFLOP/s = FLOPs x images/s, and MFU = that / the device's
peak (``--peak-tflops``, or a table of dense bf16/fp16 peaks for known GPUs). ``--split`` picks
the split whose files are read (sample folders may hold only ``val``); a split with fewer
images than needed is cycled. Writes ``--out`` (CSV) and JSON beside it; prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import open_dict
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from segexp.cli import command
from segexp.config import compose_train_config, instantiate
from segexp.engine.experiment import check_loss_fits_model
from segexp.engine.options import TrainerOptions
from segexp.engine.trainer import Run, optimizer_step, to_device, train_step
from segexp.errors import SegexpError
from segexp.models import build_model
from segexp.profiling import Cycled, machine_info, synchronize
from segexp.runtime import quiet_worker_init, resolve_device

ROOT = Path(__file__).resolve().parents[2]

DEFAULT_OUT = ROOT / "outputs" / "benchmark" / "pipeline.csv"
# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
               "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}
COLUMNS = ["model", "dataset", "device", "precision", "channels_last", "batch_size", "num_workers",
           "loader_img_s", "model_img_s", "end_to_end_img_s", "loader_bound", "train_gflop_per_image",
           "achieved_tflops", "peak_tflops", "mfu"]


def peak_for(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def build(cfg, split: str, device: torch.device, iters: int, warmup: int):
    """The loop's pieces for ``cfg``: a Run whose loader cycles ``split`` long enough."""
    t = TrainerOptions.from_config(cfg.trainer).resolved_for(device)
    dataset = instantiate(cfg.dataset, split=split, transforms=instantiate(cfg.transforms.train))
    if len(dataset) == 0:
        raise SegexpError(f"the {split} split of dataset.root={cfg.dataset.get('root')} is empty; "
                          "pass --split with a split that has images.")
    if cfg.dataset.get("num_classes", 0) is None:  # counted from the masks: the model takes it
        with open_dict(cfg):
            cfg.dataset.num_classes = dataset.num_classes
    needed = t.batch_size * (iters + warmup) * 2  # the loader is run twice (alone, end to end)
    workers = {"num_workers": t.num_workers, "pin_memory": device.type == "cuda"}
    if t.num_workers > 0:
        workers.update(worker_init_fn=quiet_worker_init, prefetch_factor=t.prefetch_factor,
                       persistent_workers=True)
    loader = DataLoader(Cycled(dataset, needed, cfg.seed), batch_size=t.batch_size, drop_last=True,
                        **workers)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, pretrained=False).to(device)  # speed does not depend on weights
    check_loss_fits_model(cfg, model)  # e.g. loss=ce for a mask-classification model
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = instantiate(cfg.optimizer)(model)
    # A Run of the parts a training step uses (no schedule, sampler or validation here).
    return Run(model=model, train_model=model, criterion=instantiate(cfg.loss).to(device),
               optimizer=optimizer, scheduler=None,
               scaler=torch.amp.GradScaler(device.type, enabled=t.precision == "16"),
               train_loader=loader, sampler=None, val_loader=None, device=device, options=t,
               plan=None, run_dir=Path("."), class_names=list(dataset.class_names), palette=[],
               loggers=[])


def step(run: Run, images: torch.Tensor, masks: torch.Tensor) -> None:
    train_step(run, images, masks)
    optimizer_step(run)


def images_per_s(batches, run: Run, iters: int, warmup: int, train: bool) -> float:
    """Throughput over ``iters`` batches of ``batches`` after ``warmup``, training on each if
    ``train`` (else only loading them)."""
    done = 0
    start = None
    for i, (images, masks) in enumerate(batches):
        if i == warmup:
            synchronize(run.device)
            start = time.perf_counter()
        if train:
            step(run, *to_device(run, images, masks))
        if i >= warmup:
            done += len(images)
        if i + 1 == warmup + iters:
            break
    synchronize(run.device)
    return done / (time.perf_counter() - start)


def train_gflop_per_image(run: Run, images: torch.Tensor, masks: torch.Tensor) -> float:
    """Forward + backward FLOPs (not MACs) of one training step, per image, in GFLOP."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        train_step(run, images, masks)
    run.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(images) / 1e9


def measure(overrides: list[str], split: str, device: torch.device, iters: int, warmup: int,
            peak_tflops: float | None) -> dict:
    cfg, dataset_name = compose_train_config(overrides)
    run = build(cfg, split, device, iters, warmup)
    t = run.options  # 'auto' precision and layout as resolved for the device, not as written
    loader_rate = images_per_s(run.train_loader, run, iters, warmup, train=False)
    images, masks = to_device(run, *next(iter(run.train_loader)))
    flops = train_gflop_per_image(run, images, masks)
    model_rate = images_per_s(((images, masks) for _ in range(iters + warmup)), run, iters, warmup,
                              train=True)
    end_to_end = images_per_s(run.train_loader, run, iters, warmup, train=True)
    peak = peak_for(device, peak_tflops)
    achieved = flops * end_to_end / 1e3
    model_name = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "unet")
    backbone = next((o.split("=", 1)[1] for o in overrides if o.startswith("backbone=")),
                    str(cfg.get("default_backbone", "")))
    return {"model": f"{model_name} {backbone}".strip(), "dataset": dataset_name,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": str(t.precision), "channels_last": bool(t.channels_last),
            "batch_size": int(t.batch_size),
            "num_workers": int(t.num_workers), "loader_img_s": _sig(loader_rate),
            "model_img_s": _sig(model_rate), "end_to_end_img_s": _sig(end_to_end),
            "loader_bound": end_to_end < 0.9 * model_rate,
            "train_gflop_per_image": _sig(flops), "achieved_tflops": _sig(achieved),
            "peak_tflops": peak, "mfu": _sig(achieved / peak) if peak else None}


def _sig(value: float) -> float:
    """Four significant digits: CPU rates can be 0.06 images/s, GPU rates hundreds."""
    return float(f"{value:.4g}")


def format_table(rows: list[dict]) -> str:
    lines = ["| model | dataset | device | precision | layout | batch | workers | loader img/s "
             "| model img/s | end-to-end img/s | loader-bound | GFLOP/img (train) | TFLOP/s | MFU |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
        lines.append(f"| {r['model']} | {r['dataset']} | {r['device']} | {r['precision']} | "
                     f"{'NHWC' if r['channels_last'] else 'NCHW'} | {r['batch_size']} | "
                     f"{r['num_workers']} | {r['loader_img_s']} | "
                     f"{r['model_img_s']} | {r['end_to_end_img_s']} | "
                     f"{'yes' if r['loader_bound'] else 'no'} | {r['train_gflop_per_image']} | "
                     f"{r['achieved_tflops']} | {mfu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides as for train.py")
    parser.add_argument("--split", default="train", help="split whose files are read (default: train)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default: 3)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU (default: known GPUs' bf16 peak)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="CSV file; the JSON goes beside it")
    args = parser.parse_intermixed_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("need --iters >= 1 and --warmup >= 0")
    device = resolve_device(args.device, option="--device")
    row = measure(args.overrides, args.split, device, args.iters, args.warmup, args.peak_tflops)
    print(format_table([row]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerow(row)
    meta = {"command": "python scripts/bench/pipeline.py " + " ".join(argv), **machine_info(),
            "iters": args.iters, "warmup": args.warmup}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": [row]}, indent=2) + "\n")
    print(f"Wrote {args.out} and {args.out.with_suffix('.json')}")
    return row


if __name__ == "__main__":
    command(main)
