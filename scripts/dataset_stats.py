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

``--check`` scans a layout before training instead (the train and val splits, and ``--split``
if it names another): pairs found per split and the folders they come from; for
``dataset=folder`` the unpaired files on either side (the first few named, with counts, and the
suffix options that would pair them); the mask value histogram (values as loaded, after
``mask_map`` / the palette: pixels and images per value); image sizes; every unreadable file,
size mismatch or out-of-range value; and, as a warning, validation images that are also training
images (the same file or a copy). It writes nothing and exits 1 when the layout is broken:

    python scripts/dataset_stats.py dataset=folder dataset.root=data/DRIVE ... --check
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import open_dict
from tqdm import tqdm

from segexp.atomic import write_text
from segexp.cli import command
from segexp.config import compose_train_config, instantiate
from segexp.data.folder import FolderLayout
from segexp.data.overlap import validation_images_in_training
from segexp.data.scan import MaskScan, class_weights, scan_masks
from segexp.errors import SegexpError, first_few

ROOT = Path(__file__).resolve().parents[1]

MAX_SIZES_LISTED = 10  # list the count per image size when there are at most this many sizes
FOLDER_TARGET = "segexp.data.folder.FolderDataset"
NAMES_SHOWN = 5  # unpaired files and sample errors named in the --check report


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


# -- checking a layout (--check) ------------------------------------------------------------------
def check_split(cfg, split: str, max_images: int | None, progress: bool) -> tuple[list, list, Any]:
    """Report lines and problems for one split, and its dataset (None if it cannot be built)."""
    lines, problems, options = [], [], {}
    if cfg.dataset.get("_target_") == FOLDER_TARGET:
        layout = FolderLayout.from_options(cfg.dataset)
        try:
            scan = layout.scan(split)
        except SegexpError as err:
            return [f"{split}: the layout cannot be read."], [f"{split}: {err}"], None
        lines.append(scan.describe())
        for label, files in (("image(s) without a mask", [p.name for p in scan.unpaired_images]),
                             ("mask(s) without an image", [p.name for p in scan.unpaired_masks]),
                             ("image file(s) no suffix option accepts",
                              [str(p.relative_to(layout.root)) for p in scan.rejected]),
                             (f"entr(ies) of {scan.list_file} naming no file",
                              scan.missing_entries)):
            if files:
                lines.append(f"  {len(files)} {label}: {first_few(files, NAMES_SHOWN)}")
        if scan.problems:
            problems.append(f"{split}: {layout.describe_unpaired(scan)}")
        if scan.missing_entries:
            problems.append(f"{split}: {scan.list_file} names {len(scan.missing_entries)} entries "
                            f"with no file: {first_few(scan.missing_entries, NAMES_SHOWN)}")
        if not scan.pairs:
            if not problems:
                problems.append(f"{split}: no image in {scan.image_dir} has a mask in "
                                f"{scan.mask_dir}.")
            return lines, problems, None
        options["allow_unpaired"] = True  # read the pairs there are; the unpaired are reported
    folder_log = logging.getLogger("segexp.data.folder")
    level = folder_log.level
    folder_log.setLevel(logging.ERROR)  # its warnings repeat what the report says
    try:
        dataset = instantiate(cfg.dataset, split=split, transforms=None, **options)
    except SegexpError as err:
        return lines + [f"{split}: the dataset cannot be built."], problems + [f"{split}: {err}"], None
    finally:
        folder_log.setLevel(level)
    if not lines:
        lines.append(f"{split} split: {len(dataset)} samples ({type(dataset).__name__})")
    inferred = (" (inferred from the masks: largest value + 1; set dataset.class_names to name "
                "them)" if cfg.dataset.get("num_classes", 0) is None
                and cfg.dataset.get("class_names") is None
                and cfg.dataset.get("classes_file") is None else "")
    names = first_few(list(dataset.class_names), NAMES_SHOWN)
    lines.append(f"  {dataset.num_classes} classes: {names}{inferred}")
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    pixels, images, sizes, errors = Counter(), Counter(), Counter(), []
    for i in tqdm(range(n), desc=f"{split} split", unit="img", disable=not progress):
        try:
            sample = dataset.load(i)
            dataset.check_sample(sample)
        except SegexpError as err:
            errors.append(str(err))
            continue
        values, counts = np.unique(np.asarray(sample.mask), return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            pixels[value] += count
            images[value] += 1
        sizes[(int(sample.image.shape[1]), int(sample.image.shape[0]))] += 1
    read = f"{n} of {len(dataset)}" if n < len(dataset) else f"all {n}"
    lines.append(f"  read {read} samples; mask values (after mask_map / palette; "
                 f"{dataset.ignore_index} = ignore), pixels in images:")
    for value in sorted(pixels):
        name = ("ignore" if value == dataset.ignore_index else
                dataset.class_names[value] if 0 <= value < dataset.num_classes else "OUT OF RANGE")
        lines.append(f"    {value:>5} {name:<16} {pixels[value]:>12} px in {images[value]} image(s)")
    if sizes:
        lines.append("  image sizes (w x h: images): " + first_few(
            [f"{w}x{h}: {c}" for (w, h), c in sizes.most_common()], MAX_SIZES_LISTED))
    if errors:
        lines.append(f"  {len(errors)} sample(s) cannot be used; the first: {errors[0]}")
        problems += [f"{split}: {error}" for error in errors[:NAMES_SHOWN]]
        if len(errors) > NAMES_SHOWN:
            problems.append(f"{split}: ... and {len(errors) - NAMES_SHOWN} more unusable samples")
    return lines, problems, dataset


def check_layout(cfg, splits: list[str], max_images: int | None = None,
                 progress: bool = True) -> dict:
    """``--check``: every split's report; ``ok`` is False when any split has a problem."""
    lines, problems, datasets = [], [], {}
    for split in splits:
        split_lines, split_problems, dataset = check_split(cfg, split, max_images, progress)
        lines += split_lines
        problems += split_problems
        datasets[split] = dataset
        if split == "train" and dataset is not None and cfg.dataset.get("num_classes", 0) is None:
            with open_dict(cfg):  # as in training: val takes the count the train split inferred
                cfg.dataset.num_classes = dataset.num_classes
    if datasets.get("train") is not None and datasets.get("val") is not None:
        # What training warns about (not a broken layout, so not a problem: exit 0).
        shared = validation_images_in_training(datasets["train"], datasets["val"])
        if shared:
            lines.append(f"warning: {len(shared)} of the {len(datasets['val'])} validation images "
                         f"are also training images, the same file or a copy (the first: "
                         f"{shared[0]}): validation scores on them are not held out.")
    if not problems:
        lines.append("check: OK, the " + ", ".join(splits) + " splits are readable and paired.")
    return {"ok": not problems, "report": "\n".join(lines), "problems": problems}


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
    parser.add_argument("--check", action="store_true",
                        help="scan the layout (train and val) and report pairs, unpaired files, "
                             "mask values and sizes; exit 1 when it is broken; writes nothing")
    args = parser.parse_intermixed_args(argv)
    if args.max_images is not None and args.max_images < 1:
        parser.error("--max-images must be at least 1")

    cfg, dataset_name = compose_train_config(args.overrides)
    if args.check:
        splits = ["train", "val"] + ([args.split] if args.split not in ("train", "val") else [])
        result = check_layout(cfg, splits, args.max_images, progress=not args.no_progress)
        print(f"dataset={dataset_name}, dataset.root={cfg.dataset.get('root')}:")
        print(result["report"])
        if result["problems"]:
            print(f"segexp: error: the layout is broken ({len(result['problems'])} "
                  "problem(s)):\n" + "\n".join(f"  - {p}" for p in result["problems"]),
                  file=sys.stderr)
        return result
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
    write_text(yaml_path, text)
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
    warnings.formatwarning = lambda message, *args, **kwargs: f"segexp: warning: {message}\n"
    # A check that finds problems reports them itself and ends with exit status 1.
    command(lambda argv: 0 if main(argv).get("ok", True) else 1)
