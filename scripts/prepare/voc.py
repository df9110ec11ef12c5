"""Prepare PASCAL VOC 2012 and its SBD-augmented train_aug split (10,582 images) for dataset=voc_aug.

    python scripts/prepare/voc.py --src ~/downloads [--dst data/voc] [--force] [--no-download]

1. VOC2012: uses an extracted <dst>/VOCdevkit/VOC2012 (or <src>/VOCdevkit/VOC2012, prepared in
   place); otherwise extracts <src>/VOCtrainval_11-May-2012.tar into <dst>, downloading it first
   when it is missing (2 GB, http://host.robots.ox.ac.uk/pascal/VOC/voc2012/).
2. SBD (Hariharan et al., ICCV 2011): uses an extracted benchmark_RELEASE/ in <src> or <dst>;
   otherwise extracts <src>/benchmark.tgz into <dst>, downloading it first (1.4 GB).
3. Writes VOC2012/SegmentationClassAug/<id>.png, grayscale class-index PNGs (0..20, 255 ignore):
   VOC's own SegmentationClass label where the image has one, else SBD's
   dataset/cls/<id>.mat (GTcls.Segmentation). So train_aug trains on the official VOC labels for
   VOC train images and on SBD's for the rest, as MMSegmentation's voc_aug set-up does.
4. Writes ImageSets/Segmentation/train_aug.txt: (SBD train + SBD val + VOC train) minus VOC val,
   sorted (10,582 ids for the full data). Images SBD has but JPEGImages lacks are copied over.
5. Checks every split with the loader, reads every label written (values 0..20, 255) and prints
   a summary. A second run finds its marker and skips everything (--force redoes it).

Reading SBD's MATLAB v5 .mat files needs scipy (scipy.io.loadmat).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segexp.cli import run_prepare
from segexp.data.base import IGNORE_INDEX, read_mask
from segexp.data.prepare import (
    Marker,
    PrepareError,
    Summary,
    check_splits,
    copy_files,
    find_or_extract,
    finish,
    label_values,
    parse_args,
    progress,
    say,
    skip_if_prepared,
)
from segexp.data.voc import AUG_LABELS, CLASS_NAMES, SPLITS, VOCDataset, read_split_list

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"
SBD_URL = ("http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
           "benchmark.tgz")
SBD_ARCHIVE = "benchmark.tgz"
SBD_PAGE = "http://home.bharathh.info/pubs/codes/SBD/download.html"
EXPECTED = {"train": 1464, "val": 1449, "trainval": 2913, "train_aug": 10582}
ALLOWED = set(range(len(CLASS_NAMES))) | {IGNORE_INDEX}


def train_aug_ids(sbd_train: Sequence[str], sbd_val: Sequence[str], voc_train: Sequence[str],
                  voc_val: Sequence[str]) -> list[str]:
    """The standard train_aug list: (SBD train + SBD val + VOC train) minus VOC val, sorted."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def read_sbd_cls(path: Path) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``dataset/cls/<id>.mat`` (MATLAB v5): class indices 0..20."""
    try:
        from scipy.io import loadmat
    except ImportError as error:
        raise PrepareError("reading SBD's .mat label files needs scipy (scipy.io.loadmat): "
                           "pip install scipy, then run this again.") from error
    try:
        gt = loadmat(str(path))["GTcls"]
        segmentation = np.asarray(gt[0, 0]["Segmentation"])
    except (OSError, ValueError, KeyError, IndexError, TypeError, NotImplementedError) as error:
        raise PrepareError(f"cannot read GTcls.Segmentation from {path} ({error}): a damaged "
                           f"download? Delete {SBD_ARCHIVE} and benchmark_RELEASE/ and run again."
                           ) from error
    if segmentation.ndim != 2:
        raise PrepareError(f"GTcls.Segmentation of {path} has shape {segmentation.shape}, expected "
                           "a 2-D label matrix. Re-extract benchmark.tgz.")
    return segmentation


def is_voc(folder: Path) -> bool:
    return (folder / "JPEGImages").is_dir() and (folder / "SegmentationClass").is_dir()


def is_sbd(folder: Path) -> bool:
    return (folder / "dataset" / "cls").is_dir()


def find_voc(src: Path, dst: Path, allow_download: bool, force: bool) -> Path:
    return find_or_extract(
        VOC_ARCHIVE, VOC_URL, src, dst, "VOCdevkit/VOC2012", is_voc, allow_download=allow_download,
        force=force, manual=f"Download {VOC_ARCHIVE} from {VOC_URL} (or a mirror) into {src}, then "
                            "run this again.")


def find_sbd(src: Path, dst: Path, allow_download: bool, force: bool) -> Path:
    return find_or_extract(
        SBD_ARCHIVE, SBD_URL, src, dst, "benchmark_RELEASE", is_sbd, allow_download=allow_download,
        force=force, manual=f"Download {SBD_ARCHIVE} from {SBD_URL} (page: {SBD_PAGE}) into {src}, "
                            "then run this again.")


def read_list(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise PrepareError(f"{what} list {path} not found: re-extract its archive.")
    return read_split_list(path)


def write_png(path: Path, mask: np.ndarray) -> None:
    """A grayscale class-index PNG, written atomically (an interrupted run leaves no half file)."""
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")  # not matched by *.png if a run is interrupted
    Image.fromarray(mask.astype(np.uint8)).save(tmp, format="PNG")
    tmp.replace(path)


def convert_labels(voc_root: Path, sbd_root: Path, force: bool) -> tuple[int, int, list[str]]:
    """SegmentationClassAug/<id>.png for every VOC-labelled and every SBD image; returns
    (written, already there, problems)."""
    voc_labels = {p.stem: p for p in (voc_root / "SegmentationClass").glob("*.png")}
    sbd_labels = {p.stem: p for p in (sbd_root / "dataset" / "cls").glob("*.mat")}
    out = voc_root / AUG_LABELS
    out.mkdir(exist_ok=True)
    written = kept = 0
    problems: list[str] = []
    ids = sorted(set(voc_labels) | set(sbd_labels))
    for image_id in progress(ids, desc=f"write {AUG_LABELS}"):
        target = out / f"{image_id}.png"
        if target.is_file() and not force:
            kept += 1
            continue
        if image_id in voc_labels:
            mask = read_mask(voc_labels[image_id])
        else:
            mask = read_sbd_cls(sbd_labels[image_id])
        bad = sorted(set(np.unique(mask).tolist()) - ALLOWED)
        if bad:
            source = voc_labels.get(image_id) or sbd_labels[image_id]
            problems.append(f"{source} holds label values {bad[:5]}, outside 0..20, 255")
            continue
        write_png(target, mask)
        written += 1
    return written, kept, problems


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__, "voc", argv)
    src, dst = args.src, args.dst
    allow_download = not args.no_download
    for root in (dst / "VOCdevkit" / "VOC2012", src / "VOCdevkit" / "VOC2012"):
        marker = Marker(root, "prepare_voc")

        def still_valid(info: dict, root: Path = root) -> bool:
            aug = root / AUG_LABELS
            return ((root / "ImageSets" / "Segmentation" / "train_aug.txt").is_file() and aug.is_dir()
                    and sum(1 for _ in aug.glob("*.png")) == info.get("aug_files"))

        if skip_if_prepared(marker, args.force, still_valid):
            return 0

    voc_root = find_voc(src, dst, allow_download, args.force)
    sbd_root = find_sbd(src, dst, allow_download, args.force)
    lists = voc_root / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_list(lists / "train.txt", "VOC"), read_list(lists / "val.txt", "VOC")
    sbd_train = read_list(sbd_root / "dataset" / "train.txt", "SBD")
    sbd_val = read_list(sbd_root / "dataset" / "val.txt", "SBD")

    written, kept, problems = convert_labels(voc_root, sbd_root, args.force)
    say(f"{AUG_LABELS}: {written} label PNG(s) written, {kept} already there")

    ids = train_aug_ids(sbd_train, sbd_val, voc_train, voc_val)
    missing = [i for i in ids if not (voc_root / "JPEGImages" / f"{i}.jpg").is_file()]
    copyable = [(sbd_root / "dataset" / "img" / f"{i}.jpg", voc_root / "JPEGImages" / f"{i}.jpg")
                for i in missing if (sbd_root / "dataset" / "img" / f"{i}.jpg").is_file()]
    if copyable:
        copy_files(copyable, desc="copy SBD images")
        say(f"copied {len(copyable)} image(s) JPEGImages lacked from SBD's dataset/img/")
    (lists / "train_aug.txt").write_text("".join(f"{i}\n" for i in ids))
    say(f"wrote {lists / 'train_aug.txt'}: {len(ids)} ids = (SBD train {len(sbd_train)} + SBD val "
        f"{len(sbd_val)} + VOC train {len(voc_train)}) minus VOC val {len(voc_val)}")

    # Verify: each split through the loader (every listed image and label exists), the rule, and
    # the value range of every label file written.
    counts, _ = check_splits(lambda split: VOCDataset(split=split, root=voc_root, num_classes=None),
                             SPLITS, problems)
    overlap = set(ids) & set(voc_val)
    if overlap:
        problems.append(f"train_aug shares {len(overlap)} id(s) with VOC val, e.g. {sorted(overlap)[0]}")
    aug_files = sorted((voc_root / AUG_LABELS).glob("*.png"))
    values, value_problems = label_values(aug_files, ALLOWED, desc=f"check {AUG_LABELS}")
    summary = Summary("PASCAL VOC 2012 + SBD (train_aug)", voc_root, counts=counts,
                      expected=EXPECTED, values=values, allowed="0..20, 255",
                      problems=problems + value_problems,
                      notes=[f"{AUG_LABELS}: {len(aug_files)} label PNGs (12031 for the full data)"],
                      usage=f"python train.py dataset=voc_aug dataset.root={voc_root}")
    return finish(summary, Marker(voc_root, "prepare_voc"), aug_files=len(aug_files))


if __name__ == "__main__":
    sys.exit(run_prepare(main))
