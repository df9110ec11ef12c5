"""Segment images, a folder of images or a video with a trained run.

    segexp-predict RUN_DIR photo.jpg
    segexp-predict RUN_DIR images/ --out predictions/ --checkpoint last
    segexp-predict RUN_DIR clip.mp4 --mode slide --crop 512 512 --scales 0.75 1.0 --flip

For each image ``NAME``, writes into ``--out`` (default ``RUN_DIR/predict``): ``NAME_mask.png``
(colourised prediction), ``NAME_overlay.png`` (prediction over the image) and ``NAME_index.png``
(raw class indices, 8-bit; 16-bit above 256 classes). A video gives ``NAME_overlay.mp4`` (mp4v;
``.avi`` with MJPG where this OpenCV cannot write mp4v), same frame rate and size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from segexp.cli import command
from segexp.data.base import IMAGE_EXTENSIONS, read_image
from segexp.errors import DataError, first_few
from segexp.inference import Segmenter
from segexp.visualize import save_png

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


def find_images(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"{folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    return images


def save_image_outputs(segmenter: Segmenter, image: np.ndarray, prediction: np.ndarray,
                       out_dir: Path, name: str) -> list[Path]:
    index = prediction.astype(np.uint8 if segmenter.num_classes <= 256 else np.uint16)
    index_path = out_dir / f"{name}_index.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(index_path), index):
        raise DataError(f"cannot write {index_path}.")
    return [save_png(segmenter.colourise(prediction), out_dir / f"{name}_mask.png"),
            save_png(segmenter.overlay(image, prediction), out_dir / f"{name}_overlay.png"),
            index_path]


def predict_images(segmenter: Segmenter, paths: list[Path], out_dir: Path) -> list[Path]:
    """Every readable image is predicted; unreadable or truncated ones are skipped and then
    reported together (the error names the first few), so one bad file costs no good output."""
    written, failed = [], []
    for path in tqdm(paths, desc="predict", unit="image"):
        try:
            image = read_image(path)
        except DataError as err:
            failed.append(str(err))
            continue
        written += save_image_outputs(segmenter, image, segmenter.predict(image), out_dir, path.stem)
    if failed:
        shown = first_few(failed, 3, sep=" | ")
        raise DataError(f"{len(failed)} of {len(paths)} images could not be read and were skipped "
                        f"(the outputs of the other {len(paths) - len(failed)} are in {out_dir}): "
                        f"{shown}")
    return written


def open_writer(stem_path: Path, fps: float, size: tuple[int, int]) -> tuple[cv2.VideoWriter, Path]:
    for suffix, codec in ((".mp4", "mp4v"), (".avi", "MJPG")):
        path = stem_path.with_name(stem_path.name + suffix)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size)
        if writer.isOpened():
            return writer, path
        writer.release()
    raise DataError(f"OpenCV cannot write a video here (tried mp4v .mp4 and MJPG .avi at "
                    f"{stem_path}); predict the frames as images instead.")


def predict_video(segmenter: Segmenter, path: Path, out_dir: Path) -> list[Path]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise DataError(f"cannot open video {path}: it is missing, damaged or in a format this "
                        "OpenCV build cannot decode.")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    writer, out_path, frames = None, None, 0
    try:
        with tqdm(total=total, desc="predict", unit="frame") as bar:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                image = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                if writer is None:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    writer, out_path = open_writer(out_dir / f"{path.stem}_overlay", fps,
                                                   (image.shape[1], image.shape[0]))
                overlay = segmenter.overlay(image, segmenter.predict(image))
                writer.write(cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
                frames += 1
                bar.update(1)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if frames == 0:
        raise DataError(f"video {path} has no readable frames.")
    return [out_path]


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("run_dir", type=Path, help="a run folder written by train.py")
    parser.add_argument("input", type=Path, help="an image, a folder of images or a video")
    parser.add_argument("--out", type=Path, default=None, help="output folder (RUN_DIR/predict)")
    parser.add_argument("--checkpoint", default="best", help="best, last or a checkpoint file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mode", choices=["whole", "slide"], default="whole")
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="slide window (default: the training crop)")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), default=None)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--flip", action="store_true")
    args = parser.parse_args(argv)

    source: Path = args.input
    if not source.exists():
        raise DataError(f"input {source} does not exist.")
    options = {"mode": args.mode, "stride": args.stride, "scales": args.scales, "flip": args.flip}
    segmenter = Segmenter.from_run(args.run_dir, args.checkpoint, args.device, **options,
                                   crop=args.crop if args.crop or args.mode != "slide" else
                                   _training_crop(args.run_dir))
    out_dir = args.out or args.run_dir / "predict"
    if source.is_dir():
        written = predict_images(segmenter, find_images(source), out_dir)
    elif source.suffix.lower() in VIDEO_SUFFIXES:
        written = predict_video(segmenter, source, out_dir)
    else:
        written = predict_images(segmenter, [source], out_dir)
    print(f"Wrote {len(written)} file(s) to {out_dir}")
    return written


def _training_crop(run_dir: Path) -> list[int]:
    from segexp.inference import load_run_config

    return [int(v) for v in load_run_config(run_dir).dataset.crop_size]


def cli() -> None:
    """The ``segexp-predict`` command (and ``python scripts/predict.py``)."""
    with torch.no_grad():  # not set_grad_enabled(False): the command may run inside a program
        command(main)


if __name__ == "__main__":
    cli()
