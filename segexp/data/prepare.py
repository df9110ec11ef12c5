"""Shared pieces of the ``scripts/prepare/<dataset>.py`` scripts: the command line, downloads and
archive extraction with progress bars, an idempotence marker, label checks and the summary.

Every prepare script follows the same steps::

    args = parse_args(__doc__, "ade20k", argv)    # --src, --dst, --force, --no-download
    marker = Marker(root, "prepare_ade20k")        # <root>/.segexp_prepare_ade20k.json
    if skip_if_prepared(marker, args.force, still_valid):
        return 0                                   # done before: says so, prints the summary
    root = find_or_extract(ARCHIVE, URL, args.src, args.dst, "ADEChallengeData2016", is_tree,
                           allow_download=not args.no_download, force=args.force, manual=MANUAL)
    ... convert with progress(items, desc=...) ...
    values, problems = label_values(label_paths, allowed={0, ..., 150})
    summary = Summary("ADE20K", root, counts={"train": ...}, expected=EXPECTED, values=values,
                      allowed="0..150", problems=problems, usage="python train.py dataset=...")
    return finish(summary, marker)   # prints; writes the marker, or PrepareError if checks failed

and ends with ``if __name__ == "__main__": sys.exit(run_prepare(main))``
(:func:`segexp.cli.run_prepare`, segexp's one command wrapper), which prints a
:class:`PrepareError` as one message (exit status 1) instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from segexp.atomic import write_json
from segexp.errors import DataError

CHUNK = 1 << 20


class PrepareError(DataError):
    """A preparation step cannot be done; the message says what to do instead."""


# -- command line ---------------------------------------------------------------------------------
def data_dir(name: str) -> Path:
    """Where the dataset configs look by default: ``$SEGEXP_DATA/<name>`` (``./data/<name>``)."""
    return Path(os.environ.get("SEGEXP_DATA", "data")) / name


def parse_args(doc: str | None, name: str, argv: Sequence[str] | None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """``--src`` (required: the folder holding, or receiving, the downloads), ``--dst`` (default
    ``$SEGEXP_DATA/<name>``), ``--force`` (redo every step) and ``--no-download``."""
    doc = doc or ""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0] if doc.strip() else None,
                                     epilog="\n".join(doc.strip().splitlines()[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True,
                        help="folder holding the downloaded archives (or their extracted folders); "
                             "what is missing and downloadable is downloaded into it")
    parser.add_argument("--dst", type=Path, default=None,
                        help=f"folder to prepare the dataset in (default: $SEGEXP_DATA/{name}, "
                             f"i.e. {data_dir(name)}, where conf/dataset looks)")
    parser.add_argument("--force", action="store_true",
                        help="redo every step even if a previous run completed it")
    parser.add_argument("--no-download", action="store_true",
                        help="never download: stop with the manual steps instead")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.dst = args.dst if args.dst is not None else data_dir(name)
    return args


def say(message: str) -> None:
    """A status line, printed so it does not break an active progress bar."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None,
             unit: str = "file", **kwargs) -> tqdm:
    """The progress bar every step uses (on stderr)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, mininterval=0.5,
                file=sys.stderr, **kwargs)


# -- downloads and archives ---------------------------------------------------------------------
def download(url: str, dest: Path, *, desc: str | None = None, timeout: float = 60.0,
             quiet: bool = False) -> Path:
    """Download ``url`` to ``dest`` with a byte progress bar (none if ``quiet``). Writes
    ``<dest>.part`` and renames it when complete, resumes a ``.part`` left by an interrupted run
    (HTTP Range), and skips the download when ``dest`` already exists. Any ``urllib`` URL works
    (``file://`` included)."""
    dest = Path(dest)
    if dest.is_file():
        if not quiet:
            say(f"{dest} already downloaded: skipping the download")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "segexp-prepare/1.0"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    if not quiet:
        say(f"downloading {url} -> {dest}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if start and getattr(response, "status", None) != 206:
                start = 0  # the server ignored the range: start again
            length = response.headers.get("Content-Length")
            total = int(length) + start if length and length.isdigit() else None
            with open(part, "ab" if start else "wb") as out, \
                    progress(desc=desc or dest.name, total=total, unit="B", unit_scale=True,
                             unit_divisor=1024, initial=start, disable=quiet) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        raise PrepareError(f"downloading {url} failed: {error}. Check the network (a partial "
                           f"{part.name} is kept and resumed by the next run), or download it "
                           f"yourself to {dest}.") from error
    if total is not None and part.stat().st_size != total:
        raise PrepareError(f"downloading {url} stopped at {part.stat().st_size} of {total} bytes; "
                           "run again to resume.")
    part.replace(dest)
    return dest


def download_many(jobs: Sequence[tuple[str, Path]], desc: str, workers: int = 8) -> int:
    """Download many small files ``(url, dest)`` in parallel threads with one progress bar
    (files); files already there are skipped. Returns how many were downloaded."""
    todo = [(url, Path(dest)) for url, dest in jobs if not Path(dest).is_file()]
    if len(todo) < len(jobs):
        say(f"{len(jobs) - len(todo)} of {len(jobs)} file(s) already downloaded: skipping them")
    with ThreadPoolExecutor(max_workers=workers) as pool, progress(desc=desc, total=len(todo)) as bar:
        futures = [pool.submit(download, url, dest, quiet=True) for url, dest in todo]
        try:
            for future in as_completed(futures):
                future.result()
                bar.update(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return len(todo)


def obtain(url: str | None, dest: Path, *, allow_download: bool, manual: str) -> Path:
    """``dest`` if it exists; otherwise download it from ``url`` (when there is one and downloads
    are allowed); otherwise stop with the ``manual`` instructions."""
    dest = Path(dest)
    if dest.is_file():
        say(f"found {dest}")
        return dest
    if url is None or not allow_download:
        raise PrepareError(f"{dest} not found. {manual}")
    return download(url, dest)


def _inside(root: Path, name: str) -> bool:
    target = (root / name).resolve()
    return target == root or root in target.parents


def extract(archive: Path, dst: Path, *, force: bool = False) -> bool:
    """Unpack a zip or tar(.gz) archive into ``dst`` with a progress bar (bytes). A marker
    ``dst/.segexp_extracted_<archive name>`` records completion: a second call skips (returns
    False) unless ``force``. Members that would land outside ``dst`` are refused."""
    archive, dst = Path(archive), Path(dst)
    marker = dst / f".segexp_extracted_{archive.name}"
    if marker.is_file() and not force:
        say(f"{archive.name} already extracted into {dst}: skipping the extraction")
        return False
    dst.mkdir(parents=True, exist_ok=True)
    root = dst.resolve()
    say(f"extracting {archive} -> {dst}")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            bad = [m.filename for m in members if not _inside(root, m.filename)]
            if bad:
                raise PrepareError(f"{archive} holds paths outside the target folder ({bad[0]}); "
                                   "refusing to extract it.")
            with progress(desc=f"extract {archive.name}", total=sum(m.file_size for m in members),
                          unit="B", unit_scale=True, unit_divisor=1024) as bar:
                for member in members:
                    zf.extract(member, dst)
                    bar.update(member.file_size)
    elif tarfile.is_tarfile(archive):
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with open(archive, "rb") as raw, \
                progress(desc=f"extract {archive.name}", total=archive.stat().st_size, unit="B",
                         unit_scale=True, unit_divisor=1024) as bar, \
                tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:  # streamed: one pass over the (compressed) file
                if not _inside(root, member.name):
                    raise PrepareError(f"{archive} holds a path outside the target folder "
                                       f"({member.name}); refusing to extract it.")
                tar.extract(member, dst, **safe)
                bar.update(raw.tell() - bar.n)
    else:
        raise PrepareError(f"{archive} is neither a zip nor a tar archive (an interrupted or failed "
                           "download?). Delete it and run again.")
    write_json(marker, {"archive": str(archive), "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    return True


def find_or_extract(archive_name: str, url: str | None, src: Path, dst: Path, tree: str,
                    is_tree: Callable[[Path], bool], *, allow_download: bool, manual: str,
                    force: bool = False) -> Path:
    """The extracted folder ``tree`` (a path relative to where the archive unpacks) of a dataset
    archive, found or made, in this order: ``dst/tree`` when an earlier run extracted the archive
    there completely (its marker); the archive in ``src``, extracted into ``dst``; a folder that
    is already extracted (``dst/tree``, then ``src/tree``), used in place; the archive downloaded
    into ``src`` from ``url`` and extracted (or a :class:`PrepareError` with ``manual``)."""
    src, dst = Path(src), Path(dst)
    if (dst / f".segexp_extracted_{archive_name}").is_file() and is_tree(dst / tree) and not force:
        say(f"{archive_name} already extracted into {dst}: skipping the extraction")
        return dst / tree
    if not (src / archive_name).is_file():
        for folder in (dst / tree, src / tree):
            if is_tree(folder):
                say(f"found extracted {folder}: using it in place")
                return folder
    archive = obtain(url, src / archive_name, allow_download=allow_download, manual=manual)
    extract(archive, dst, force=force)
    if not is_tree(dst / tree):
        raise PrepareError(f"{archive} did not unpack to the expected {dst / tree}: a different or "
                           f"damaged file? Delete it and run again. {manual}")
    return dst / tree


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header."""
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def check_splits(load: Callable[[str], Any], splits: Iterable[str], problems: list[str], *,
                 sizes: bool = False) -> tuple[dict[str, int], dict[str, Any]]:
    """Each split through its loader (``load(split)``: the dataset class, as training builds it):
    returns the image count per split (0 where the loader refuses the split, its reason added
    to ``problems``) and the datasets that loaded. ``sizes``: also check that each image and its
    annotation have the same size (from the file headers)."""
    counts: dict[str, int] = {}
    loaded: dict[str, Any] = {}
    for split in splits:
        try:
            dataset = load(split)
        except DataError as error:
            problems.append(f"split {split}: {error}")
            counts[split] = 0
            continue
        counts[split], loaded[split] = len(dataset), dataset
        if sizes:
            for image, annotation in progress(dataset.samples, desc=f"check sizes ({split})"):
                if image_size(image) != image_size(annotation):
                    problems.append(f"{annotation} is {image_size(annotation)} but {image} is "
                                    f"{image_size(image)} (width, height)")
    return counts, loaded


def copy_files(pairs: Sequence[tuple[Path, Path]], desc: str, link: bool = False) -> int:
    """Copy ``(source, target)`` pairs with a progress bar, skipping targets that already exist
    with the same size; with ``link`` a hard link is tried first (no second copy on the same
    file system). Returns how many were copied or linked."""
    copied = 0
    for source, target in progress(pairs, desc=desc):
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            if not link:
                raise OSError
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
        copied += 1
    return copied


# -- idempotence ---------------------------------------------------------------------------------
class Marker:
    """``<folder>/.segexp_<name>.json``: written last, after a run's checks passed; holds the
    summary so a second run can say what is there without redoing anything."""

    def __init__(self, folder: Path, name: str) -> None:
        self.path = Path(folder) / f".segexp_{name}.json"

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def write(self, info: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **info}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def skip_if_prepared(marker: Marker, force: bool,
                     still_valid: Callable[[dict], bool] = lambda info: True) -> bool:
    """True (and says so, with the stored summary) when a previous run completed and
    ``still_valid(info)`` agrees that its outputs are still there; False when work is needed."""
    info = marker.read()
    if info is None:
        return False
    if force:
        say(f"--force: redoing the preparation recorded in {marker.path}")
        marker.remove()
        return False
    if not still_valid(info):
        say(f"{marker.path} records a completed run but its outputs changed: preparing again")
        marker.remove()
        return False
    say(f"already prepared on {info.get('time', '?')} (marker {marker.path}): nothing to do, "
        "skipping every step. --force redoes them.")
    if info.get("summary"):
        say(info["summary"])
    return True


# -- checks and summary --------------------------------------------------------------------------
def read_label(path: Path) -> np.ndarray:
    """A label PNG's values (palette PNGs: their indices), for the checks."""
    from segexp.data.base import read_mask

    return read_mask(path)


def label_values(paths: Sequence[Path], allowed: Iterable[int], desc: str = "check labels",
                 reader: Callable[[Path], np.ndarray] = read_label) -> tuple[list[int], list[str]]:
    """Read every label file (progress bar); returns the sorted values found and one problem per
    value outside ``allowed`` (naming a file that holds it)."""
    allowed = set(allowed)
    found: set[int] = set()
    first_file: dict[int, Path] = {}
    for path in progress(paths, desc=desc):
        for value in np.unique(reader(path)).tolist():
            if value not in found:
                found.add(value)
                first_file[value] = path
    problems = [f"label value {value} (e.g. in {first_file[value]}) is outside {describe(allowed)}"
                for value in sorted(found - allowed)]
    return sorted(found), problems


def describe(values: Iterable[int]) -> str:
    """``{0, 1, ..., 20, 255}`` -> ``0..20, 255``."""
    values = sorted(set(values))
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(f"{a}..{b}" if b > a + 1 else (f"{a}, {b}" if b > a else f"{a}") for a, b in runs)


@dataclass
class Summary:
    """What a prepare script leaves behind, checked: samples per split (beside the full
    dataset's counts), label values found, problems (errors) and notes (warnings)."""

    title: str
    root: Path
    counts: dict[str, int]
    expected: dict[str, int] = field(default_factory=dict)
    values: list[int] = field(default_factory=list)
    allowed: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    usage: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"== {self.title}: {self.root}", f"{'split':<12}{'samples':>9}{'full dataset':>15}"]
        for split, count in self.counts.items():
            full = self.expected.get(split)
            flag = "" if full is None or full == count else "  (differs)"
            lines.append(f"{split:<12}{count:>9}{'' if full is None else full:>15}{flag}")
        if self.values:
            lines.append(f"label values found: {describe(self.values)}"
                         + (f" (allowed: {self.allowed})" if self.allowed else ""))
        lines += [f"note: {note}" for note in self.notes]
        lines += [f"PROBLEM: {problem}" for problem in self.problems]
        lines.append("checks passed." if self.ok else f"{len(self.problems)} problem(s).")
        if self.usage and self.ok:
            lines.append(f"use it with: {self.usage}")
        return "\n".join(lines)

    def differing(self) -> list[str]:
        return [split for split, count in self.counts.items()
                if split in self.expected and self.expected[split] != count]


def finish(summary: Summary, marker: Marker, **info) -> int:
    """Print the summary; on success write the marker (with the summary and ``info``) and return
    0, otherwise raise :class:`PrepareError` listing the problems (no marker: a re-run redoes)."""
    if summary.differing() and summary.ok:
        summary.notes.append(f"{', '.join(summary.differing())} differ from the full dataset's "
                             "counts: fine for a subset, otherwise a download is incomplete.")
    text = summary.text()
    say(text)
    if not summary.ok:
        raise PrepareError(f"{summary.title}: the checks of {summary.root} failed:\n- "
                           + "\n- ".join(summary.problems))
    marker.write({"summary": text, "counts": summary.counts, "values": summary.values, **info})
    return 0
