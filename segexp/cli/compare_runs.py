"""Compare finished runs: a table (Markdown + CSV), plots (PNG) and one self-contained HTML page.

    segexp-compare outputs/multirun/2026-01-01/12-00-00      # a sweep folder
    segexp-compare outputs/2026-01-01/a outputs/2026-01-01/b --out cmp
    segexp-compare <sweep> --flops                          # + GFLOPs, measured

Each run folder's ``.hydra/`` (model, backbone, dataset, crop size), ``metrics.json`` (status,
best validation metrics, per-class IoU, parameters, times, the time budget with the iterations
and images it gave, error) and ``metrics.jsonl`` (learning curves) are read (a sweep at one
``trainer.max_time`` compares models at equal wall-clock, and the table says how far each got);
a folder is any one holding ``.hydra/config.yaml`` or ``metrics.json`` under the given paths.
Rows are sorted by best mIoU; failed runs come last with their error; a run that validated on
images it also trained on (``val_images_in_training``) says so in its status (highlighted in the
page): its mIoU is not a held-out score.
Writes to --out (default: <the one folder given>/comparison, else ./comparison):
``comparison.md``, ``comparison.csv``, ``miou_vs_cost.png`` (mIoU vs GFLOPs, bubble area =
parameters; vs parameters when GFLOPs are unknown), ``learning_curves.png`` (validation mIoU
and training loss against iteration), ``per_class_iou.png`` and ``report.html`` (all of them,
pictures embedded). GFLOPs and FPS come from metrics.json (``gflops``, ``fps``) when a run
wrote them; ``--flops`` measures GFLOPs at each run's crop size on the meta device
(segexp.models.cost.model_cost: multiply-accumulates x 1e-9).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import yaml

from segexp.atomic import write_text, write_with
from segexp.cli import command
from segexp.errors import DataError
from segexp.models.cost import model_cost

plt.switch_backend("Agg")  # files only, also without a display


@dataclass
class RunRecord:
    path: Path
    model: str = ""
    backbone: str = ""
    dataset: str = ""
    overrides: list[str] = field(default_factory=list)
    crop: list[int] | None = None
    status: str = "unknown"
    error: str = ""
    params_m: float | None = None
    gflops: float | None = None
    fps: float | None = None
    train_time_s: float | None = None
    wall_time_s: float | None = None
    iters: int | None = None
    images_seen: int | None = None
    budget: str = ""  # trainer.max_time of a run at a time budget
    val_in_train: int = 0  # validation images the run also trained on: its scores are not held out
    best: dict[str, Any] = field(default_factory=dict)
    per_class_iou: dict[str, float | None] = field(default_factory=dict)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.backbone}" if self.model else self.path.name

    @property
    def miou(self) -> float | None:
        value = self.best.get("mIoU")
        return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def find_run_dirs(paths: list[Path]) -> list[Path]:
    found: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise DataError(f"{path} does not exist: give a multirun folder or run folders.")
        if (path / ".hydra" / "config.yaml").is_file() or (path / "metrics.json").is_file():
            found.add(path.resolve())
            continue
        found |= {p.parent.parent.resolve() for p in path.rglob(".hydra/config.yaml")}
        found |= {p.parent.resolve() for p in path.rglob("metrics.json")}
    if not found:
        raise DataError(f"no run folders (.hydra/ or metrics.json) under "
                         f"{', '.join(map(str, paths))}")
    return sorted(found)


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return None


def _crop(config: dict) -> list[int] | None:
    """The run's crop size, resolving the simple ${a.b} interpolations of the saved config."""
    from omegaconf import OmegaConf

    try:
        crop = OmegaConf.select(OmegaConf.create(config), "dataset.crop_size")
        return [int(side) for side in crop] if crop is not None else None
    except Exception:  # an interpolation needing Hydra's runtime, or no crop
        return None


def read_run(path: Path) -> RunRecord:
    run = RunRecord(path=path)
    config = _load_yaml(path / ".hydra" / "config.yaml") or {}
    hydra_cfg = (_load_yaml(path / ".hydra" / "hydra.yaml") or {}).get("hydra", {})
    choices = (hydra_cfg.get("runtime") or {}).get("choices") or {}
    run.overrides = _load_yaml(path / ".hydra" / "overrides.yaml") or []
    run.model = str(choices.get("model", ""))
    backbone = str(choices.get("backbone", ""))
    run.backbone = str(config.get("default_backbone") or backbone.split("/")[-1])
    run.dataset = str(choices.get("dataset", ""))
    run.crop = _crop(config)

    summary_path = path / "metrics.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        run.status = summary.get("status", "unknown")
        run.error = summary.get("error", "")
        run.params_m = summary["params"] / 1e6 if summary.get("params") else None
        run.gflops = summary.get("gflops")
        run.fps = summary.get("fps")
        run.train_time_s = summary.get("train_time_s")
        run.wall_time_s = summary.get("wall_time_s")
        run.iters = summary.get("iters")
        run.images_seen = summary.get("images_seen")
        run.budget = str((summary.get("budget") or {}).get("max_time") or "")
        run.val_in_train = int(summary.get("val_images_in_training") or 0)
        run.best = summary.get("best") or {}
        run.per_class_iou = {name: values.get("IoU")
                             for name, values in (summary.get("best_per_class") or {}).items()}
    else:
        run.status, run.error = "no metrics.json", "the job did not finish (or is still running)"

    log_path = path / "metrics.jsonl"
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a killed job
            step = entry.get("step")
            if isinstance(entry.get("val/mIoU"), (int, float)):
                run.val_curve.append((step, entry["val/mIoU"]))
            if isinstance(entry.get("train/loss"), (int, float)):
                run.loss_curve.append((step, entry["train/loss"]))
    return run


def measure_flops(run: RunRecord) -> None:
    """GFLOPs at the run's crop size, the model built from the run's overrides on the meta device."""
    overrides = [o for o in run.overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        params_m, gflops = model_cost(overrides, tuple(run.crop or (512, 512)))
    except Exception as err:  # a model that cannot be built (the failed runs) has no cost
        print(f"compare_runs: no GFLOPs for {run.path.name}: {type(err).__name__}: {err}",
              file=sys.stderr)
        return
    run.gflops = round(gflops, 3)
    run.params_m = run.params_m or params_m


def sort_runs(runs: list[RunRecord]) -> list[RunRecord]:
    return sorted(runs, key=lambda r: (r.miou is None, -(r.miou or 0.0), r.path.name))


def class_names(runs: list[RunRecord]) -> list[str]:
    names: list[str] = []
    for run in runs:
        names += [n for n in run.per_class_iou if n not in names]
    return names


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else ""


def _num(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else ""


def status_cell(run: RunRecord) -> str:
    """The run's status; a run that validated on images it trained on says so beside it, since
    its mIoU is not comparable with held-out ones."""
    if run.val_in_train:
        return f"{run.status} (not held out: {run.val_in_train} validation images trained on)"
    return run.status


def table(runs: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    names = class_names(runs)
    header = (["run", "model", "backbone", "dataset", "params (M)", "GFLOPs", "FPS",
               "budget", "iterations", "images seen", "train time (s)", "mIoU (%)",
               "aAcc (%)"] + [f"IoU {n} (%)" for n in names]
              + ["status", "error"])
    rows = []
    for r in runs:
        rows.append([r.path.name, r.model, r.backbone, r.dataset, _num(r.params_m, 2),
                     _num(r.gflops, 2), _num(r.fps, 1), r.budget, _num(r.iters, 0),
                     _num(r.images_seen, 0), _num(r.train_time_s, 1), _pct(r.miou),
                     _pct(r.best.get("aAcc"))] + [_pct(r.per_class_iou.get(n)) for n in names]
                    + [status_cell(r), r.error.splitlines()[0] if r.error else ""])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header))] + [line(r) for r in rows]) + "\n"


def plot_cost(runs: list[RunRecord], path: Path) -> None:
    done = [r for r in runs if r.miou is not None and r.params_m]
    use_flops = bool(done) and all(r.gflops for r in done)
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in done:
        x = r.gflops if use_flops else r.params_m
        ax.scatter(x, 100 * r.miou, s=20 + 8 * r.params_m, alpha=0.5)
        ax.annotate(r.label, (x, 100 * r.miou), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("GFLOPs (bubble area: parameters)" if use_flops else "parameters (M)")
    ax.set_ylabel("best validation mIoU (%)")
    ax.set_title("mIoU vs cost" if done else "mIoU vs cost (no finished runs)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(runs: list[RunRecord], path: Path) -> None:
    fig, (ax_val, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")
    for i, r in enumerate(runs):  # one colour per run in both panels
        colour = plt.cm.tab20(i % 20)
        if r.val_curve:
            steps, values = zip(*r.val_curve)
            ax_val.plot(steps, [100 * v for v in values], marker=".", color=colour, label=r.label)
        if r.loss_curve:
            steps, values = zip(*r.loss_curve)
            ax_loss.plot(steps, values, color=colour, label=r.label)
    ax_val.set(xlabel="iteration", ylabel="validation mIoU (%)", title="validation mIoU")
    ax_loss.set(xlabel="iteration", ylabel="training loss", title="training loss")
    for ax in (ax_val, ax_loss):
        ax.grid(alpha=0.3)
    if ax_loss.get_legend_handles_labels()[0] or ax_val.get_legend_handles_labels()[0]:
        source = ax_val if ax_val.get_legend_handles_labels()[0] else ax_loss
        fig.legend(*source.get_legend_handles_labels(), fontsize=7, loc="outside right upper")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_per_class(runs: list[RunRecord], path: Path) -> None:
    done = [r for r in runs if r.per_class_iou and r.miou is not None]
    names = class_names(done)
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(names) * max(1, len(done)) / 3 + 3), 4.5))
    width = 0.8 / max(1, len(done))
    for i, r in enumerate(done):
        values = [100 * (r.per_class_iou.get(n) or 0.0) for n in names]
        ax.bar([j + i * width - 0.4 + width / 2 for j in range(len(names))], values, width,
               label=r.label)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("IoU (%) at the best validation")
    ax.set_title("per-class IoU")
    ax.grid(axis="y", alpha=0.3)
    if done:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def row_class(status: str) -> str:
    """Failed runs red, runs whose validation was not held out (:func:`status_cell`) yellow."""
    if status.split(" (")[0] not in ("completed", "early_stopped"):
        return "failed"
    return "not-held-out" if "not held out" in status else ""


def html_page(header: list[str], rows: list[list[str]], pictures: list[Path], sources: list[Path]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr class='{}'>{}</tr>".format(
        row_class(row[-2]), "".join(f"<td>{html.escape(c)}</td>" for c in row)) for row in rows)
    images = "".join(
        f"<figure><img alt='{p.stem}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'><figcaption>{p.stem}</figcaption></figure>"
        for p in pictures)
    listed = "".join(f"<li>{html.escape(str(s))}</li>" for s in sources)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>segexp run comparison</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} th{{background:#eee}}
tr.failed{{background:#fdd}} tr.not-held-out{{background:#ffd}}
img{{max-width:100%}} figure{{margin:1em 0}}</style></head>
<body><h1>Run comparison</h1><p>{len(rows)} runs, sorted by best validation mIoU.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{images}<h2>Run folders</h2><ul>{listed}</ul></body></html>
"""


def compare(paths: list[Path], out: Path, flops: bool = False) -> list[RunRecord]:
    runs = [read_run(p) for p in find_run_dirs(paths)]
    if flops:
        for run in runs:
            if run.gflops is None and run.status in ("completed", "early_stopped"):
                measure_flops(run)
    runs = sort_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table(runs)
    write_text(out / "comparison.md", markdown(header, rows))

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header] + rows)

    write_with(out / "comparison.csv", write_csv)
    pictures = [out / "miou_vs_cost.png", out / "learning_curves.png", out / "per_class_iou.png"]
    plot_cost(runs, pictures[0])
    plot_curves(runs, pictures[1])
    plot_per_class(runs, pictures[2])
    write_text(out / "report.html", html_page(header, rows, pictures, [r.path for r in runs]))
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a multirun folder or run folders")
    parser.add_argument("--out", type=Path, help="output folder (default: <folder>/comparison)")
    parser.add_argument("--flops", action="store_true",
                        help="measure GFLOPs at each run's crop size when metrics.json has none")
    args = parser.parse_args(argv)
    out = args.out or (args.paths[0] / "comparison" if len(args.paths) == 1 else Path("comparison"))
    runs = compare(args.paths, out, flops=args.flops)
    print((out / "comparison.md").read_text())
    print(f"{len(runs)} runs ({sum(r.status == 'failed' for r in runs)} failed) -> {out}")


def cli() -> None:
    """The ``segexp-compare`` command (and ``python scripts/compare_runs.py``)."""
    command(main)


if __name__ == "__main__":
    cli()
