"""Prepare ADE20K SceneParsing (ADEChallengeData2016: 20210 train / 2000 val images, 150 classes).

    python scripts/prepare/ade20k.py --src ~/downloads [--dst data/ade20k] [--force] [--no-download]

1. Uses an extracted <dst>/ADEChallengeData2016 (or <src>/ADEChallengeData2016, used in place);
   otherwise unzips <src>/ADEChallengeData2016.zip into <dst>, downloading it first when it is
   missing (923 MB, http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip).
2. Checks both splits with the loader (every image has its annotation), reads every annotation
   (values 0..150; 0 = "other", ignored by the loader) and prints a summary. Nothing needs
   converting: the loader shifts the labels on the fly. A second run finds its marker and skips
   everything (--force redoes it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from segexp.cli import run_prepare
from segexp.data.ade20k import CLASS_NAMES, SPLIT_FOLDERS, URL, ADE20KDataset
from segexp.data.prepare import (
    Marker,
    Summary,
    check_splits,
    find_or_extract,
    finish,
    label_values,
    parse_args,
    skip_if_prepared,
)

ARCHIVE = "ADEChallengeData2016.zip"
FOLDER = "ADEChallengeData2016"
EXPECTED = {"train": 20210, "val": 2000}
ALLOWED = set(range(len(CLASS_NAMES) + 1))


def is_extracted(folder: Path) -> bool:
    return (folder / "images").is_dir() and (folder / "annotations").is_dir()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__, "ade20k", argv)
    candidates = (args.dst / FOLDER, args.src / FOLDER)
    for folder in candidates:
        def still_valid(info: dict, folder: Path = folder) -> bool:
            found = sum(1 for split in SPLIT_FOLDERS.values()
                        for _ in (folder / "annotations" / split).glob("*.png"))
            return found == sum(info.get("counts", {}).values())

        if skip_if_prepared(Marker(folder, "prepare_ade20k"), args.force, still_valid):
            return 0

    root = find_or_extract(ARCHIVE, URL, args.src, args.dst, FOLDER, is_extracted,
                           allow_download=not args.no_download, force=args.force,
                           manual=f"Download {URL} into {args.src} and run this again.")

    problems: list[str] = []
    counts, datasets = check_splits(lambda split: ADE20KDataset(split=split, root=root, num_classes=None),
                                    SPLIT_FOLDERS, problems, sizes=True)
    annotations = [annotation for d in datasets.values() for _, annotation in d.samples]
    values, value_problems = label_values(annotations, ALLOWED, desc="check annotations")
    summary = Summary("ADE20K (ADEChallengeData2016)", root, counts=counts, expected=EXPECTED,
                      values=values, allowed="0..150, 0 = other", problems=problems + value_problems,
                      usage=f"python train.py dataset=ade20k dataset.root={root}")
    return finish(summary, Marker(root, "prepare_ade20k"))


if __name__ == "__main__":
    sys.exit(run_prepare(main))
