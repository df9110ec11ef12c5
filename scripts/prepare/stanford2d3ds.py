"""Prepare Stanford 2D-3D-Semantics (2D perspective images) and check the extracted tree.

    python scripts/prepare/stanford2d3ds.py --src ~/downloads [--dst data/stanford2d3ds]
        [--check-per-area 50] [--force] [--no-download]

The dataset sits behind a licence form, so this script cannot download the images. The manual
step: fill in the form at https://goo.gl/forms/2YSPaO2UKmn5Td5m2 (linked from
http://3Dsemantics.stanford.edu), then from the "noXYZ" folder (110 GB; the "withXYZ" variant
adds 650 GB of global_xyz images the loader does not use) download the area archives
area_1_no_xyz.tar, area_2_no_xyz.tar, area_3_no_xyz.tar, area_4_no_xyz.tar, area_5a_no_xyz.tar,
area_5b_no_xyz.tar and area_6_no_xyz.tar (any area_*.tar / .tar.gz name works) into the --src
folder, then run this script. Fold 1 (the usual benchmark: test on area 5) needs all of them;
a subset of areas works with dataset.allow_missing_areas=true.

1. Uses an extracted <dst> (or <src>) holding area_N/ folders; otherwise extracts every
   area_*.tar in <src> into <dst>.
2. Puts assets/semantic_labels.json (from https://github.com/alexsax/2D-3D-Semantics: the label
   list is not in the archives) into the dataset root: copied from <src> if it is there,
   downloaded otherwise (--no-download: stops with the manual step).
3. Checks the tree: images and semantic labels per area (each rgb paired with its semantic
   image), the fold splits, and for --check-per-area evenly spaced semantic images per area that
   every encoded index is in the label list (or the missing-data value 0x0D0D0D) and that the
   mapped labels are within 0..13; prints a summary. A second run finds its marker and skips
   everything (--force redoes it).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segexp.cli import run_prepare
from segexp.data.prepare import (
    Marker,
    PrepareError,
    Summary,
    extract,
    finish,
    obtain,
    parse_args,
    progress,
    say,
    skip_if_prepared,
)
from segexp.data.stanford2d3ds import (
    FOLDS,
    FORM,
    LABELS_FILE,
    LABELS_URL,
    MISSING_LABEL,
    OBJECT_CLASSES,
    RGB_SUFFIX,
    SEMANTIC_SUFFIX,
    URL,
    Stanford2D3DSDataset,
    find_areas,
    label_lut,
    load_labels,
)
from segexp.errors import DataError

TOTAL_IMAGES = 70496  # the paper's count of perspective RGB images over the six areas
ARCHIVE_PATTERNS = ("area_*.tar", "area_*.tar.gz", "area_*.tgz")
MANUAL = (f"2D-3D-S needs its licence form, so the images cannot be downloaded here: fill in "
          f"{FORM} (see {URL}), download the noXYZ area archives (area_1_no_xyz.tar ... "
          "area_6_no_xyz.tar, area 5 as area_5a and area_5b) into the --src folder and run this "
          "again (or extract them into one folder yourself and pass it as --dst).")
CLASS_NAMES = ("unlabelled", *OBJECT_CLASSES)
# The original semantic images hold label indices and 0x0D0D0D only; an image with more than this
# fraction of other colours is not one of them.
MAX_FOREIGN_FRACTION = 0.01


def locate(folder: Path) -> Path | None:
    """``folder`` if it holds area_N/ folders, else its one child that does (an archive that
    unpacks into a top folder), else None."""
    if find_areas(folder):
        return folder
    children = [c for c in sorted(folder.iterdir()) if c.is_dir()] if folder.is_dir() else []
    return next((c for c in children if find_areas(c)), None)


def add_options(parser) -> None:
    parser.add_argument("--check-per-area", type=int, default=50, metavar="N",
                        help="semantic images decoded and checked per area folder (default 50; "
                             "0 = all, slow: 1080x1080 each)")


def labels_file(root: Path, src: Path, allow_download: bool) -> Path:
    target = root / LABELS_FILE
    if target.is_file():
        return target
    for candidate in (src / LABELS_FILE, src / "semantic_labels.json",
                      src / "2D-3D-Semantics" / LABELS_FILE):
        if candidate.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(candidate, target)
            say(f"copied {candidate} -> {target}")
            return target
    return obtain(LABELS_URL, target, allow_download=allow_download,
                  manual=f"Download {LABELS_URL} to {target} and run this again.")


def spaced(items: list, count: int) -> list:
    if count <= 0 or len(items) <= count:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def check_area(folder: Path, lut: np.ndarray, per_area: int, problems: list[str],
               seen: set[int], foreign: list[int]) -> int:
    """Pairing and decoding checks of one area folder; returns its image count. ``foreign[0]``
    counts the pixels whose index is outside the label list (they load as unlabelled)."""
    import cv2

    rgb_dir, semantic_dir = folder / "data" / "rgb", folder / "data" / "semantic"
    if not rgb_dir.is_dir() or not semantic_dir.is_dir():
        problems.append(f"{folder} lacks data/rgb/ or data/semantic/ (re-extract its archive)")
        return 0
    images = sorted(rgb_dir.glob(f"*{RGB_SUFFIX}"))
    labels = {p.name[: -len(SEMANTIC_SUFFIX)] for p in semantic_dir.glob(f"*{SEMANTIC_SUFFIX}")}
    names = [p.name[: -len(RGB_SUFFIX)] for p in images]
    unpaired = sorted(set(names) - labels)
    if unpaired:
        problems.append(f"{folder.name}: {len(unpaired)} image(s) without a semantic image, e.g. "
                        f"{unpaired[0]}{RGB_SUFFIX}")
    if not images:
        problems.append(f"{folder.name}: no *{RGB_SUFFIX} images in {rgb_dir}")
    paired = [n for n in names if n in labels]
    for name in progress(spaced(paired, per_area), desc=f"check {folder.name}"):
        path = semantic_dir / f"{name}{SEMANTIC_SUFFIX}"
        encoded = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if encoded is None:
            problems.append(f"cannot read {path}")
            continue
        rgb = encoded[..., ::-1]
        index = ((rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8)
                 | rgb[..., 2].astype(np.int32))
        bad = (index >= len(lut)) & (index != MISSING_LABEL)
        if bad.mean() > MAX_FOREIGN_FRACTION:
            problems.append(f"{path}: {bad.mean():.1%} of the pixels have a colour that is neither "
                            f"an index into {LABELS_FILE} ({len(lut)} labels) nor the missing "
                            f"value 0x0D0D0D (e.g. index {int(index[bad][0])}): not an original "
                            "*_semantic.png (resized, recompressed or a semantic_pretty image?), "
                            "or a label list of another version")
        elif bad.any():
            foreign[0] += int(bad.sum())
        known = index < len(lut)
        mapped = np.zeros(index.shape, np.int32)
        mapped[known] = lut[index[known]]
        seen.update(np.unique(mapped).tolist())
    return len(images)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__, "stanford2d3ds", argv, extra=add_options)
    src, dst = args.src, args.dst
    for folder in {locate(dst) or dst: None, locate(src) or src: None}:
        def still_valid(info: dict, folder: Path = folder) -> bool:
            found = {p.name: len(list((p / "data" / "rgb").glob(f"*{RGB_SUFFIX}")))
                     for paths in find_areas(folder).values() for p in paths}
            return found == info.get("counts") and (folder / LABELS_FILE).is_file()

        if skip_if_prepared(Marker(folder, "prepare_stanford2d3ds"), args.force, still_valid):
            return 0

    root = next((found for folder in (dst, src) if (found := locate(folder)) is not None), None)
    archives = sorted({p for pattern in ARCHIVE_PATTERNS for p in src.glob(pattern) if p.is_file()})
    if root is not None:
        say(f"found extracted area folders in {root}")
        extracted = {p.name for paths in find_areas(root).values() for p in paths}
        pending = [a for a in archives if a.name.split("_no_xyz")[0].split(".")[0] not in extracted]
        for archive in pending:  # archives of areas not extracted yet
            extract(archive, root, force=args.force)
    else:
        if not archives:
            raise PrepareError(f"no area_*.tar archives in {src} and no area_N/ folders in {dst} "
                               f"or {src}. {MANUAL}")
        for archive in archives:
            extract(archive, dst, force=args.force)
        root = locate(dst)
        if root is None:
            raise PrepareError(f"the archives in {src} did not unpack to area_N/ folders in {dst}: "
                               f"are they the 2D-3D-S area archives? {MANUAL}")

    lut = label_lut(load_labels(labels_file(root, src, not args.no_download)))
    say(f"{LABELS_FILE}: {len(lut)} labels")

    counts: dict[str, int] = {}
    problems: list[str] = []
    notes: list[str] = []
    seen: set[int] = set()
    foreign = [0]
    areas = find_areas(root)
    for number in sorted(areas):
        for folder in areas[number]:
            counts[folder.name] = check_area(folder, lut, args.check_per_area, problems, seen,
                                             foreign)
    if foreign[0]:
        notes.append(f"{foreign[0]} checked pixel(s) hold an index outside the label list; they "
                     "load as unlabelled")
    missing = [n for n in range(1, 7) if n not in areas]
    if missing:
        notes.append(f"area(s) {', '.join(map(str, missing))} missing: folds that use them need "
                     "dataset.allow_missing_areas=true")
    total = sum(counts.values())
    notes.append(f"{total} images in all (the full dataset has {TOTAL_IMAGES})")
    for fold in FOLDS:
        sizes = []
        for split in ("train", "test"):
            try:
                sizes.append(str(len(Stanford2D3DSDataset(split=split, root=root, fold=fold,
                                                          allow_missing_areas=True))))
            except DataError:
                sizes.append("-")
        notes.append(f"fold {fold}: train {sizes[0]} / test {sizes[1]} images "
                     f"(train areas {FOLDS[fold][0]}, test areas {FOLDS[fold][1]})")
    names = [CLASS_NAMES[v] for v in sorted(seen) if 0 <= v < len(CLASS_NAMES)]
    if seen:
        notes.append(f"classes seen in the checked images: {', '.join(names)}")
    out_of_range = sorted(v for v in seen if not 0 <= v < len(CLASS_NAMES))
    if out_of_range:
        problems.append(f"mapped labels outside 0..13: {out_of_range}")
    summary = Summary("Stanford 2D-3D-S (2D)", root, counts=counts, values=sorted(seen),
                      allowed="0..13 (0 = unlabelled)", problems=problems, notes=notes,
                      usage=f"python train.py dataset=stanford2d3ds dataset.root={root}"
                            + (" dataset.allow_missing_areas=true" if missing else ""))
    return finish(summary, Marker(root, "prepare_stanford2d3ds"))


if __name__ == "__main__":
    sys.exit(run_prepare(main))
