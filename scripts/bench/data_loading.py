"""Data-pipeline throughput (images/s) of the training transforms, per DataLoader worker count.

    python scripts/bench/data_loading.py                                   # synthetic
    python scripts/bench/data_loading.py dataset=stanford_background
    python scripts/bench/data_loading.py dataset=cityscapes dataset.root=/data/cityscapes
    python scripts/bench/data_loading.py dataset=ade20k dataset.root=/data/ade20k/ADEChallengeData2016
    python scripts/bench/data_loading.py dataset=cityscapes dataset.root=SAMPLES --split val --workers 0,2

Takes the same overrides as train.py, builds the ``--split`` split (default train) with the
*training* transforms (so a val-only sample folder can still measure the training pipeline), and
for each ``--workers`` count loads ``--warmup`` batches (worker start-up included, not timed),
then times ``--batches`` batches of ``trainer.batch_size`` (or ``--batch-size``). A split with
fewer images than that is cycled (index i reads image i mod length, with its own augmentation
seed), so a handful of sample files is enough. Prints a table and appends it, with the machine
and the command, to ``docs/data_throughput.md`` (``--out`` for another file).

The figures depend on the machine and its load; nothing in the tests asserts on them.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from segexp.cli import command
from segexp.config import compose_train_config, instantiate
from segexp.errors import SegexpError
from segexp.profiling import Cycled, machine_info

ROOT = Path(__file__).resolve().parents[2]

DEFAULT_OUT = ROOT / "docs" / "data_throughput.md"
DOC_HEADER = """# Data-pipeline throughput

Images per second that a `DataLoader` over a dataset's split delivers through the **training**
transforms (`transforms.train`: random rescale, crop, flip, normalise), per number
of worker processes, measured by `scripts/bench/data_loading.py` (which appends one section per run).
Batches of `trainer.batch_size` are timed after a warm-up that includes the workers' start-up;
splits with fewer images than needed are cycled (each repeat draws its own augmentation).
Figures depend on the machine and on its load at the time (the 1-minute load average is given).
With 0 workers the transforms run in the main process on torch's intra-op threads (one per core
unless `--threads`/`OMP_NUM_THREADS` says otherwise); workers always use one thread each.
"""




def measure(dataset, batch_size: int, workers: int, batches: int, warmup: int,
            seed: int = 0) -> dict:
    """Throughput of one loader configuration: ``warmup`` untimed batches, then ``batches``."""
    data = Cycled(dataset, batch_size * (warmup + batches), seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                        drop_last=True, pin_memory=False)
    start = time.perf_counter()
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    warm = time.perf_counter()
    images = 0
    for _ in range(batches):
        batch, _ = next(iterator)
        images += batch.shape[0]
    elapsed = time.perf_counter() - warm
    del iterator  # shuts the workers down
    return {"workers": workers, "batches": batches, "images": images,
            "seconds": elapsed, "images_per_s": images / elapsed,
            "ms_per_batch": 1000 * elapsed / batches, "warmup_s": warm - start}


def format_table(results: list[dict]) -> str:
    lines = ["| workers | images/s | ms/batch | timed batches | images | warm-up (s) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['workers']} | {r['images_per_s']:.1f} | {r['ms_per_batch']:.1f} | "
                     f"{r['batches']} | {r['images']} | {r['warmup_s']:.2f} |")
    return "\n".join(lines)


def report(results: list[dict], info: dict, setup: dict, command: str) -> str:
    return "\n".join([
        f"## {setup['dataset']}: {setup['split']} split, training transforms "
        f"({setup['date']})",
        "",
        f"- command: `{command}`",
        f"- machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"load average {info['load_1min']:.2f}; {info['os']}, Python {info['python']}, "
        f"torch {info['torch']} ({info['torch_threads']} intra-op thread(s) in the main process), "
        f"torchvision {info['torchvision']}, OpenCV {info['opencv']}",
        f"- data: {setup['length']} image(s) in the split{setup['cycled']}; batch size "
        f"{setup['batch_size']}, crop {setup['crop_size']}, base size {setup['base_size']}; "
        f"{setup['warmup']} warm-up + {setup['batches']} timed batches per worker count",
        "",
        format_table(results),
        "",
    ])


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*",
                        help="config overrides as for train.py, e.g. dataset=cityscapes dataset.root=...")
    parser.add_argument("--split", default="train",
                        help="split whose images go through the training transforms (default: train)")
    parser.add_argument("--workers", type=_counts, default=[0, 1, 2],
                        help="comma-separated DataLoader worker counts to measure (default: 0,1,2)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches (default: 20)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed batches first, worker start-up included (default: 2)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per batch (default: trainer.batch_size)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the main process, which runs the transforms "
                             "with 0 workers (default: torch's own, one per core; DataLoader "
                             "workers always use 1)")
    parser.add_argument("--seed", type=int, default=0, help="augmentation seed (default: 0)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="Markdown file the results are appended to (default: docs/data_throughput.md)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no file")
    args = parser.parse_intermixed_args(argv)
    if args.batches < 1 or args.warmup < 0 or min(args.workers) < 0:
        parser.error("need --batches >= 1, --warmup >= 0 and --workers >= 0")

    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    cfg, dataset_name = compose_train_config(args.overrides)
    batch_size = args.batch_size or int(cfg.trainer.batch_size)
    dataset = instantiate(cfg.dataset, split=args.split,
                          transforms=instantiate(cfg.transforms.train))
    if len(dataset) == 0:
        raise SegexpError(f"the {args.split} split of dataset '{type(dataset).__name__}' is empty "
                          f"(dataset.root={cfg.dataset.get('root')}). Check the folder layout.")
    needed = batch_size * (args.warmup + args.batches)
    setup = {
        "dataset": dataset_name, "split": args.split, "length": len(dataset),
        "cycled": f", cycled {needed / len(dataset):.1f} times" if needed > len(dataset) else "",
        "batch_size": batch_size, "warmup": args.warmup, "batches": args.batches,
        "crop_size": _size(cfg.dataset.get("crop_size")),
        "base_size": _size(cfg.dataset.get("base_size")),
        "date": datetime.date.today().isoformat(),
    }
    print(f"dataset={dataset_name}, {args.split} split ({len(dataset)} images), training "
          f"transforms, batch {batch_size}: {args.warmup} warm-up + {args.batches} timed batches")
    results = []
    for workers in args.workers:
        result = measure(dataset, batch_size, workers, args.batches, args.warmup, args.seed)
        print(f"  {workers} worker(s): {result['images_per_s']:.1f} images/s")
        results.append(result)
    command = "python scripts/bench/data_loading.py " + shlex.join(argv)
    text = report(results, machine_info(), setup, command.strip())
    print()
    print(text)
    if not args.no_write:
        out = args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        existing = out.read_text() if out.is_file() else DOC_HEADER
        out.write_text(existing.rstrip("\n") + "\n\n" + text)
        print(f"Appended to {out}")
    return results


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, "
                                         "e.g. 0,1,2") from None
    if not counts:
        raise argparse.ArgumentTypeError("give at least one worker count, e.g. 0,1,2")
    return counts


def _size(value) -> str:
    if value is None:
        return "none"
    value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return "x".join(str(v) for v in value) + " (h x w)"


if __name__ == "__main__":
    command(main)
