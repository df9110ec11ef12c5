"""Class pixel frequencies, image sizes and class weights of a dataset split.

    python scripts/dataset_stats.py dataset=stanford_background
    python scripts/dataset_stats.py dataset=cityscapes dataset.root=/data/cityscapes --split val
    python scripts/dataset_stats.py dataset=ade20k --max-images 500 --weights inverse

Reads every sample of the split as stored (no transforms, no resizing: the dataset's ``load``),
with the same overrides as train.py, and prints

* per class: labelled pixels, their fraction of all labelled pixels, and how many images hold it;
* image sizes (min / median / max height and width, and the count per size when there are few);
* the fraction of ignored pixels (``ignore_index``);
* class weights, two ways:
  - inverse frequency: ``1 / freq_c`` with ``freq_c`` the class's share of labelled pixels,
    scaled so the classes present average 1;
  - median frequency balancing (Eigen & Fergus 2015, used by SegNet): ``median(f) / f_c`` with
    ``f_c`` = pixels of class c / labelled pixels of the images that contain c, the median over
    the classes present.
  Classes absent from the split get weight 0 in both (with a warning).
  The counts and weights are :mod:`segexp.data.scan`'s, the same that ``loss.class_weights=auto``
  trains with (median frequency).

Writes ``outputs/stats_<dataset>_<split>.yaml``, a snippet for the ``loss`` group
(``loss.class_weights``, the ``--weights`` method; the other method is in a comment), and
``outputs/stats_<dataset>_<split>.png``, a bar chart of the class frequencies.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
from hydra.errors import HydraException

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segexp.config import compose_train_config, instantiate  # noqa: E402
from segexp.data.scan import MaskScan, class_weights, scan_masks  # noqa: E402
from segexp.errors import SegexpError  # noqa: E402

MAX_SIZES_LISTED = 10  # list the count per image size when there are at most this many sizes


# -- counting (one pass over the masks: segexp.data.scan) ---------------------------------------
def summarise(scan: MaskScan) -> dict:
    heights = np.repeat([h for h, _ in scan.sizes], list(scan.sizes.values()))
    widths = np.repeat([w for _, w in scan.sizes], list(scan.sizes.values()))
    total = sum(scan.pixels) + scan.ignored_pixels
    return {
        "num_images": scan.num_images,
        "class_names": list(scan.class_names),
        "pixels": list(scan.pixels),
        "frequency": [float(f) for f in scan.frequency()],
        "images_with_class": list(scan.images_with_class),
        "absent_classes": scan.absent_classes(),
        "ignored_pixels": scan.ignored_pixels,
        "ignored_fraction": scan.ignored_pixels / total if total else 0.0,
        "ignore_index": scan.ignore_index,
        "height": {"min": int(heights.min()), "median": float(np.median(heights)),
                   "max": int(heights.max())},
        "width": {"min": int(widths.min()), "median": float(np.median(widths)),
                  "max": int(widths.max())},
        "sizes": dict(sorted(scan.sizes.items(), key=lambda item: -item[1])),
        "inverse_frequency_weights": [float(w) for w in class_weights(scan, "inverse")],
        "median_frequency_weights": [float(w) for w in class_weights(scan, "median")],
    }


# -- reporting ----------------------------------------------------------------------------------
def format_report(stats: dict) -> str:
    names = stats["class_names"]
    width = max(len("class"), *(len(n) for n in names))
    lines = [f"{'class':<{width}} {'pixels':>12} {'fraction':>9} {'images':>7} "
             f"{'inv. freq':>9} {'med. freq':>9}"]
    for i, name in enumerate(names):
        lines.append(f"{name:<{width}} {stats['pixels'][i]:>12d} {stats['frequency'][i]:>9.4f} "
                     f"{stats['images_with_class'][i]:>7d} "
                     f"{stats['inverse_frequency_weights'][i]:>9.4f} "
                     f"{stats['median_frequency_weights'][i]:>9.4f}")
    h, w = stats["height"], stats["width"]
    lines += ["",
              f"images: {stats['num_images']}; height min/median/max {h['min']}/{h['median']:g}/"
              f"{h['max']}, width min/median/max {w['min']}/{w['median']:g}/{w['max']}"]
    if len(stats["sizes"]) <= MAX_SIZES_LISTED:
        lines.append("sizes (w x h: images): " + ", ".join(
            f"{sw}x{sh}: {n}" for (sh, sw), n in stats["sizes"].items()))
    else:
        common = list(stats["sizes"].items())[:5]
        lines.append(f"{len(stats['sizes'])} distinct sizes; most common (w x h: images): " + ", ".join(
            f"{sw}x{sh}: {n}" for (sh, sw), n in common))
    lines.append(f"ignored pixels (value {stats['ignore_index']}): {stats['ignored_pixels']} "
                 f"({100 * stats['ignored_fraction']:.2f} % of all pixels)")
    return "\n".join(lines)


def _list(values) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def weights_yaml(stats: dict, dataset_name: str, split: str, method: str, argv: list[str]) -> str:
    chosen, other = ("median", "inverse") if method == "median" else ("inverse", "median")
    key = {"median": "median_frequency_weights", "inverse": "inverse_frequency_weights"}
    title = {"median": "median frequency balancing (SegNet): median(f) / f_c",
             "inverse": "inverse frequency 1 / freq_c, present classes averaging 1"}
    names = ", ".join(stats["class_names"])
    lines = [
        f"# Class weights for dataset={dataset_name}, {split} split ({stats['num_images']} images), "
        "written by",
        f"#   python scripts/dataset_stats.py {' '.join(argv)}".rstrip(),
        f"# Classes in order: {names}",
        f"# Pixel frequencies: {_list(stats['frequency'])}",
        f"# Method: {title[chosen]}; absent classes weigh 0.",
        f"# Other method ({title[other]}):",
        f"#   class_weights: {_list(stats[key[other]])}",
        "# Use: copy `loss.class_weights=[...]` onto the train.py command line, or the list into",
        "# conf/loss/ce.yaml (class_weights).",
        "loss:",
        f"  class_weights: {_list(stats[key[chosen]])}",
    ]
    return "\n".join(lines) + "\n"


def bar_chart(stats: dict, colours, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, freq = stats["class_names"], stats["frequency"]
    face = [tuple(c / 255 for c in colour) for colour in colours]
    if len(names) <= 30:  # vertical bars
        fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(names) + 2), 4.5))
        ax.bar(range(len(names)), freq, color=face, edgecolor="black", linewidth=0.4)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=9)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel("fraction of labelled pixels")
        ax.grid(axis="y", alpha=0.3)
    else:  # many classes (ADE20K's 150): horizontal bars, one line per class
        fig, ax = plt.subplots(figsize=(8.0, 0.16 * len(names) + 1.5))
        ax.barh(range(len(names)), freq, color=face, edgecolor="black", linewidth=0.3)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_ylim(len(names) - 0.4, -0.6)
        ax.set_xlabel("fraction of labelled pixels")
        ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*",
                        help="config overrides as for train.py, e.g. dataset=stanford_background")
    parser.add_argument("--split", default="train", help="split to count (default: train)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="count only the first N images of the split (default: all)")
    parser.add_argument("--weights", choices=("median", "inverse"), default="median",
                        help="which weights go into loss.class_weights (default: median)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "outputs",
                        help="folder for stats_<dataset>_<split>.yaml/.png (default: outputs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)
    if args.max_images is not None and args.max_images < 1:
        parser.error("--max-images must be at least 1")

    cfg, dataset_name = compose_train_config(args.overrides)
    dataset = instantiate(cfg.dataset, split=args.split, transforms=None)
    if len(dataset) == 0:
        raise SegexpError(f"the {args.split} split of dataset '{type(dataset).__name__}' is empty "
                          f"(dataset.root={cfg.dataset.get('root')}). Check the folder layout.")
    scan = scan_masks(dataset, max_images=args.max_images, progress=not args.no_progress)
    scan.check_values(args.split)
    stats = summarise(scan)
    if stats["absent_classes"]:
        absent = stats["absent_classes"]
        shown = ", ".join(absent[:12]) + (f" and {len(absent) - 12} more" if len(absent) > 12 else "")
        warnings.warn(f"{len(absent)} class(es) never occur in the {stats['num_images']} images "
                      f"counted: {shown}; their weights are 0 (the loss ignores them).",
                      stacklevel=1)
    print(f"dataset={dataset_name}, {args.split} split, {stats['num_images']} of {len(dataset)} "
          "images, as stored (no transforms):")
    print(format_report(stats))

    stem = f"stats_{dataset_name}_{args.split}"
    yaml_path = args.out_dir / f"{stem}.yaml"
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    text = weights_yaml(stats, dataset_name, args.split, args.weights, argv)
    yaml_path.write_text(text)
    chosen = stats["median_frequency_weights" if args.weights == "median"
                   else "inverse_frequency_weights"]
    print(f"\nclass weights ({args.weights} frequency), for train.py:\n"
          f"  loss.class_weights={_list(chosen).replace(' ', '')}")
    png_path = bar_chart(stats, dataset.colours,
                         f"{dataset_name} {args.split}: class pixel frequencies "
                         f"({stats['num_images']} images)", args.out_dir / f"{stem}.png")
    print(f"Wrote {yaml_path} and {png_path}")
    stats.update(yaml=yaml_path, png=png_path)
    return stats


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *args, **kwargs: f"dataset_stats: warning: {message}\n"
    try:
        main()
    except (SegexpError, HydraException) as err:
        print(f"dataset_stats: error: {err}", file=sys.stderr)
        sys.exit(1)
