"""Prepare Cityscapes (fine annotations): unpack the two zips and write *_gtFine_labelTrainIds.png.

    python scripts/prepare/cityscapes.py --src ~/downloads [--dst data/cityscapes] [--force]

Cityscapes needs a (free) login, so this script cannot download it. The manual step: log in at
https://www.cityscapes-dataset.com/downloads/, download gtFine_trainvaltest.zip (241 MB) and
leftImg8bit_trainvaltest.zip (11 GB) into the --src folder, then run this script.

1. Uses an extracted <dst> (or <src>) holding leftImg8bit/ and gtFine/; otherwise unzips both
   archives from <src> into <dst>.
2. Converts every gtFine/<split>/<city>/<name>_gtFine_labelIds.png (train, val and test) to
   <name>_gtFine_labelTrainIds.png with the official id -> trainId table (19 classes, 255 ignore;
   the table in segexp/data/cityscapes.py), as cityscapesScripts' createTrainIdLabelImgs does.
3. Checks every split with the loader, reads every labelTrainIds file (values 0..18, 255) and
   prints a summary. A second run finds its marker and skips everything (--force redoes it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segexp.cli import run_prepare
from segexp.data.base import IGNORE_INDEX, read_mask
from segexp.data.cityscapes import (
    EVALUATED_IDS,
    LABEL_ID_SUFFIX,
    SPLITS,
    TRAIN_ID_SUFFIX,
    URL,
    CityscapesDataset,
    label_ids_to_train_ids,
)
from segexp.data.prepare import (
    Marker,
    PrepareError,
    Summary,
    check_splits,
    extract,
    finish,
    label_values,
    parse_args,
    progress,
    say,
    skip_if_prepared,
)

ARCHIVES = ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip")
EXPECTED = {"train": 2975, "val": 500, "test": 1525}
ALLOWED = set(range(len(EVALUATED_IDS))) | {IGNORE_INDEX}
MANUAL = (f"Cityscapes needs a free login, so this script cannot download it: log in at {URL}, "
          f"download {ARCHIVES[0]} and {ARCHIVES[1]} into the --src folder and run this again "
          "(or extract both into one folder yourself and pass it as --dst).")


def is_extracted(folder: Path) -> bool:
    return (folder / "leftImg8bit").is_dir() and (folder / "gtFine").is_dir()


def write_png(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")  # not matched by *.png if a run is interrupted
    Image.fromarray(mask.astype(np.uint8)).save(tmp, format="PNG")
    tmp.replace(path)


def convert(root: Path, force: bool) -> tuple[int, int]:
    """Write ``*_gtFine_labelTrainIds.png`` beside every ``*_gtFine_labelIds.png``; returns
    (written, already there)."""
    sources = sorted((root / "gtFine").glob(f"*/*/*{LABEL_ID_SUFFIX}"))
    written = kept = 0
    for source in progress(sources, desc="labelIds -> labelTrainIds"):
        target = source.with_name(source.name[: -len(LABEL_ID_SUFFIX)] + TRAIN_ID_SUFFIX)
        if target.is_file() and not force:
            kept += 1
            continue
        write_png(target, label_ids_to_train_ids(read_mask(source), source=str(source)))
        written += 1
    return written, kept


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__, "cityscapes", argv)
    src, dst = args.src, args.dst
    for folder in (dst, src):
        def still_valid(info: dict, folder: Path = folder) -> bool:
            found = sum(1 for _ in (folder / "gtFine").glob(f"*/*/*{TRAIN_ID_SUFFIX}"))
            return found == sum(info.get("counts", {}).values())

        if skip_if_prepared(Marker(folder, "prepare_cityscapes"), args.force, still_valid):
            return 0

    zips = [src / name for name in ARCHIVES]
    if (all((dst / f".segexp_extracted_{name}").is_file() for name in ARCHIVES)
            and is_extracted(dst) and not args.force):
        say(f"{' and '.join(ARCHIVES)} already extracted into {dst}: skipping the extraction")
        root = dst
    elif all(path.is_file() for path in zips):
        for archive in zips:
            extract(archive, dst, force=args.force)
        root = dst
        if not is_extracted(root):
            raise PrepareError(f"{' and '.join(ARCHIVES)} did not unpack to {root}/leftImg8bit and "
                               f"{root}/gtFine: are they the Cityscapes trainvaltest zips? {MANUAL}")
    else:
        root = next((folder for folder in (dst, src) if is_extracted(folder)), None)
        if root is None:
            missing = " and ".join(str(path) for path in zips if not path.is_file())
            raise PrepareError(f"{missing} not found. {MANUAL}")
        say(f"found extracted Cityscapes at {root}: using it in place")

    written, kept = convert(root, args.force)
    say(f"labelTrainIds: {written} written, {kept} already there")

    present = [split for split in SPLITS if (root / "leftImg8bit" / split).is_dir()]
    notes = [f"no {split} split ({root / 'leftImg8bit' / split} is missing)"
             for split in SPLITS if split not in present]
    problems: list[str] = []
    counts, datasets = check_splits(
        lambda split: CityscapesDataset(split=split, root=root, num_classes=None), present, problems)
    counts = {split: counts.get(split, 0) for split in SPLITS}
    for split, dataset in datasets.items():
        unconverted = [label for _, label, convert_ in dataset.samples if convert_]
        if unconverted:
            problems.append(f"split {split}: {len(unconverted)} frame(s) without labelTrainIds, "
                            f"e.g. {unconverted[0]}")
    train_ids = sorted((root / "gtFine").glob(f"*/*/*{TRAIN_ID_SUFFIX}"))
    values, value_problems = label_values(train_ids, ALLOWED, desc="check labelTrainIds")
    summary = Summary("Cityscapes (gtFine)", root, counts=counts, expected=EXPECTED, values=values,
                      allowed="0..18, 255", problems=problems + value_problems, notes=notes,
                      usage=f"python train.py dataset=cityscapes dataset.root={root}")
    return finish(summary, Marker(root, "prepare_cityscapes"))


if __name__ == "__main__":
    sys.exit(run_prepare(main))
