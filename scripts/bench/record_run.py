"""Run ``python train.py <overrides>`` as a user would and record what it reached, for the figures
the README quotes (its quick-start line is recorded in docs/results/quickstart.json):

    python scripts/bench/record_run.py --out docs/results/quickstart.json                 # `python train.py`
    python scripts/bench/record_run.py --out x.json -- dataset=stanford_background trainer.max_time=5m

The run goes into a fresh folder under ``--work``; the record holds the exact command, the
machine (CPU, cores, threads, library versions), the commit, the wall-clock time of the whole
command (start-up included, as a user waits for it), and from the run's ``metrics.json`` the best
and final validation figures, iterations and images seen. A failed run is recorded as failed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from segexp.atomic import write_json
from segexp.cli import command
from segexp.profiling import machine_info

ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True)
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the record (JSON)")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "record_run",
                        help="where the run folder goes")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args(argv)
    run_dir = args.work / datetime.now().strftime("%Y%m%d-%H%M%S")
    shown = ["python", "train.py", *args.overrides]
    cmd = [sys.executable, str(ROOT / "train.py"), *args.overrides, f"hydra.run.dir={run_dir}"]
    print(f"running: {shlex.join(shown)}  (run folder {run_dir})", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT)
    wall = time.perf_counter() - start
    summary_path = run_dir / "metrics.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    record = {
        "command": shlex.join(shown),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine_info(),
        "exit_code": done.returncode,
        "status": summary.get("status", "failed"),
        "wall_clock_s": round(wall, 1),
        "metric": summary.get("metric"),
        "best": summary.get("best"),
        "final": summary.get("final"),
        "iters": summary.get("iters"),
        "images_seen": summary.get("images_seen"),
        "precision": summary.get("precision"),  # trainer.precision as run (auto resolved)
        "pretrained": summary.get("pretrained"),
        "run_dir": str(run_dir),
    }
    write_json(args.out, record, indent=2)
    best = (record["best"] or {}).get(record["metric"] or "mIoU")
    print(f"{record['status']}: best {record['metric']} "
          + (f"{100 * best:.2f} %" if best is not None else "-")
          + f" in {wall:.0f} s; wrote {args.out}")
    if done.returncode != 0:
        sys.exit(done.returncode)
    return record


if __name__ == "__main__":
    command(main)
