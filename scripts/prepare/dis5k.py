"""Prepare DIS5K (dichotomous image segmentation) and check it.

    python scripts/prepare/dis5k.py --src ~/downloads [--dst data/DIS5K] [--check-per-subset 0]
        [--force] [--no-download]

DIS5K is shared through Google Drive (and Baidu Pan), which does not serve large files to a
plain download, so this script cannot fetch it. The manual step: open the Google Drive link in
https://github.com/xuebinqin/DIS (https://drive.google.com/file/d/1jOC2zK0GowBvEt03B7dGugCRDVAoeIqq/view),
download DIS5K.zip (about 5 GB; or `gdown 1jOC2zK0GowBvEt03B7dGugCRDVAoeIqq` if you have gdown)
into the --src folder, then run this script.

1. Uses an extracted <dst> (or <src>, <src>/DIS5K) holding DIS-TR/, DIS-VD/ and DIS-TE1..4/;
   otherwise unzips <src>/DIS5K.zip into <dst> (its top DIS5K/ folder becomes <dst>).
2. Checks every subset: images (im/*.jpg) paired with masks (gt/*.png) and the published counts
   (DIS-TR 3000, DIS-VD 470, DIS-TE1..4 500 each); and, for every mask (or
   --check-per-subset N evenly spaced ones), that it is the size of its image, that it is a
   0/255 mask (anti-aliased edges only: few values in between) and that thresholding at 128
   leaves a binary mask with foreground in it. Prints a summary; a second run finds its marker
   and skips everything (--force redoes it).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segexp.cli import run_prepare
from segexp.data.dis5k import (
    ARCHIVE,
    DRIVE_URL,
    SUBSET_SIZES,
    THRESHOLD,
    URL,
    DIS5KDataset,
    binarize,
    read_gt,
)
from segexp.data.prepare import (
    Marker,
    PrepareError,
    Summary,
    check_splits,
    extract,
    finish,
    obtain,
    parse_args,
    progress,
    say,
    skip_if_prepared,
)
from segexp.errors import DataError

SPLIT_OF = {"DIS-TR": "train", "DIS-VD": "val", "DIS-TE1": "test1", "DIS-TE2": "test2",
            "DIS-TE3": "test3", "DIS-TE4": "test4"}
# A 0/255 mask with anti-aliased edges has only a thin band of in-between values; more than this
# fraction of the pixels means a soft matte or a resampled/recompressed mask.
MAX_GREY_FRACTION = 0.1
MANUAL = (f"DIS5K is on Google Drive, which this script cannot download from: open {DRIVE_URL} "
          f"(linked from {URL}), download {ARCHIVE} into the --src folder and run this again (or "
          "unzip it yourself and pass its DIS5K folder as --dst).")


def add_options(parser) -> None:
    parser.add_argument("--check-per-subset", type=int, default=0, metavar="N",
                        help="masks read and checked per subset (default 0 = all of them)")


def is_extracted(folder: Path) -> bool:
    return all((folder / subset / "im").is_dir() and (folder / subset / "gt").is_dir()
               for subset in SUBSET_SIZES)


def spaced(items: list, count: int) -> list:
    if count <= 0 or len(items) <= count:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def unzip(archive: Path, dst: Path, force: bool) -> Path:
    """Unzip into ``dst``; the archive's top ``DIS5K/`` folder is moved up so ``dst`` is the
    dataset root."""
    extract(archive, dst, force=force)
    top = dst / "DIS5K"
    if not is_extracted(dst) and is_extracted(top):
        for child in sorted(top.iterdir()):
            if not (dst / child.name).exists():
                shutil.move(str(child), str(dst / child.name))
        if not any(top.iterdir()):
            top.rmdir()
    shutil.rmtree(dst / "__MACOSX", ignore_errors=True)
    return dst


def check_masks(dataset: DIS5KDataset, per_subset: int, subset: str, problems: list[str],
                seen: set[int]) -> None:
    from PIL import Image

    for image_path, gt_path in progress(spaced(dataset.samples, per_subset), desc=f"check {subset}"):
        try:
            gt = read_gt(gt_path)
        except DataError as error:
            problems.append(str(error))
            continue
        with Image.open(image_path) as image:
            width, height = image.size
        if (height, width) != gt.shape:
            problems.append(f"{gt_path} is {gt.shape[1]}x{gt.shape[0]} but its image "
                            f"{image_path.name} is {width}x{height}")
        grey = float(((gt > 0) & (gt < 255)).mean())
        if grey > MAX_GREY_FRACTION:
            problems.append(f"{gt_path}: {grey:.0%} of the pixels are neither 0 nor 255: not a "
                            "0/255 mask with anti-aliased edges (a soft matte, or resized?)")
        mask = binarize(gt, THRESHOLD)
        values = set(np.unique(mask).tolist())
        seen.update(values)
        if 1 not in values:
            problems.append(f"{gt_path} has no foreground pixel (>= {THRESHOLD}) after "
                            "thresholding")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__, "DIS5K", argv, extra=add_options)
    src, dst = args.src, args.dst
    candidates = (dst, src / "DIS5K", src)
    for folder in candidates:
        def still_valid(info: dict, folder: Path = folder) -> bool:
            found = {SPLIT_OF[s]: len(list((folder / s / "gt").glob("*.png"))) for s in SUBSET_SIZES}
            return found == info.get("counts")

        if skip_if_prepared(Marker(folder, "prepare_dis5k"), args.force, still_valid):
            return 0

    root = next((folder for folder in candidates if is_extracted(folder)), None)
    if root is not None:
        say(f"found extracted DIS5K at {root}")
    else:
        root = unzip(obtain(None, src / ARCHIVE, allow_download=False, manual=MANUAL), dst,
                     args.force)
        if not is_extracted(root):
            raise PrepareError(f"{ARCHIVE} did not unpack to {', '.join(SUBSET_SIZES)} (each with "
                               f"im/ and gt/) in {root}: is it the DIS5K archive? {MANUAL}")

    problems: list[str] = []
    seen: set[int] = set()
    counts, datasets = check_splits(lambda split: DIS5KDataset(split=split, root=root),
                                    SPLIT_OF.values(), problems)
    for subset, split in SPLIT_OF.items():
        if split in datasets:
            check_masks(datasets[split], args.check_per_subset, subset, problems, seen)
    if seen and not seen <= {0, 1}:
        problems.append(f"thresholded masks hold values {sorted(seen)}, expected 0 and 1")
    expected = {SPLIT_OF[s]: n for s, n in SUBSET_SIZES.items()}
    checked = "every mask" if args.check_per_subset <= 0 else \
        f"{args.check_per_subset} masks per subset"
    summary = Summary("DIS5K", root, counts=counts, expected=expected, values=sorted(seen),
                      allowed="0 (background), 1 (foreground)", problems=problems,
                      notes=[f"checked {checked}: size, 0/255 with anti-aliased edges, foreground "
                             f"present after thresholding at {THRESHOLD}"],
                      usage=f"python train.py dataset=dis5k dataset.root={root}")
    return finish(summary, Marker(root, "prepare_dis5k"))


if __name__ == "__main__":
    sys.exit(run_prepare(main))
