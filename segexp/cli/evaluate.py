"""Evaluate a trained run's checkpoint on a split, with the run's saved config.

    segexp-eval outputs/2026-11-22/10-00-00_fcn_resnet18_synthetic
    segexp-eval RUN_DIR --checkpoint last --split val dataset.root=/data/x
    segexp-eval RUN_DIR --mode slide --crop 512 512 --stride 341 341
    segexp-eval RUN_DIR --scales 0.5 1.0 1.5 --flip --show-dir vis/

Inference modes and test-time augmentation follow MMSegmentation (see segexp/inference.py):
``whole`` pads each image to the backbone's size divisor; ``slide`` averages overlapping windows;
``--scales``/``--flip`` average the softmax of the resized / mirrored views.

Prints the per-class table and writes ``eval_<split>_<checkpoint>.json`` and a PNG of
predictions into the run folder. When images of the evaluated split are also training images
(the same file or a copy, :mod:`segexp.data.overlap`), it says so and the JSON records the count
(``images_also_in_training``): such a score is not a held-out one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from segexp.atomic import write_json
from segexp.cli import command
from segexp.config import instantiate
from segexp.data.base import pad_collate
from segexp.data.overlap import validation_images_in_training
from segexp.errors import SegexpError
from segexp.inference import (
    InferenceOptions,
    evaluate_loader,
    load_run_config,
    load_trained_model,
)
from segexp.inference import checkpoint_path as run_checkpoint
from segexp.loggers.base import json_safe
from segexp.metrics import format_table
from segexp.reports import save_confusion_matrix
from segexp.runtime import resolve_device
from segexp.visualize import colourise, denormalise, prediction_grid, save_png


def images_also_in_training(cfg, split: str, dataset) -> int | None:
    """How many images of the evaluated split the run's training split also holds, said when
    any; None when the training split cannot be read here (e.g. only the val data is present)."""
    if split == "train":
        return len(dataset)
    try:
        train_set = instantiate(cfg.dataset, split="train", transforms=None)
    except SegexpError as err:
        print(f"(not checked whether the {split} images are also training images: the training "
              f"split cannot be read here: {str(err).splitlines()[0]})")
        return None
    shared = validation_images_in_training(train_set, dataset)
    if shared:
        print(f"warning: {len(shared)} of the {len(dataset)} {split} images are also training "
              f"images, the same file or a copy (the first: {shared[0]}): this score is not a "
              "held-out one.")
    return len(shared)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder written by train.py")
    parser.add_argument("--checkpoint", default="best",
                        help="best, last, or a checkpoint file (default: best)")
    parser.add_argument("--split", default="val", help="dataset split to evaluate (default: val)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--mode", choices=["whole", "slide"], default="whole",
                        help="whole images (padded to the size divisor) or sliding windows")
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="slide window size (default: the training crop, dataset.crop_size)")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="slide stride (default: two thirds of the window)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="test-time scales relative to the val size, e.g. 0.5 1.0 1.5")
    parser.add_argument("--flip", action="store_true", help="add horizontally flipped views")
    parser.add_argument("--show-dir", type=Path, default=None,
                        help="write a colourised prediction and an overlay per image here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. dataset.root=PATH")
    args = parser.parse_args(argv)

    cfg = OmegaConf.merge(load_run_config(args.run_dir), OmegaConf.from_dotlist(args.overrides))
    checkpoint_path = run_checkpoint(args.run_dir, args.checkpoint)
    device = resolve_device(args.device, option="--device")

    dataset = instantiate(cfg.dataset, split=args.split, transforms=instantiate(cfg.transforms.val))
    also_trained_on = images_also_in_training(cfg, args.split, dataset)
    model, _ = load_trained_model(checkpoint_path, cfg)
    model.to(device)
    crop = args.crop
    if args.mode == "slide" and crop is None:
        crop = [int(v) for v in cfg.dataset.crop_size]
    options = InferenceOptions(mode=args.mode, crop=crop, stride=args.stride,
                               scales=args.scales, flip=args.flip,
                               precision=str(cfg.trainer.precision))
    # Saved predictions must not include the padding pad_collate adds to batch images of
    # different sizes: one image per batch then.
    batch_size = 1 if args.show_dir else (args.batch_size or cfg.trainer.val_batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        num_workers=cfg.trainer.num_workers, collate_fn=pad_collate)
    on_prediction = None
    if args.show_dir:
        args.show_dir.mkdir(parents=True, exist_ok=True)
        colours = dataset.colours

        def on_prediction(index, image, mask, prediction):
            mask_rgb = colourise(prediction.cpu().numpy(), colours)
            picture = denormalise(image)
            overlay = (picture * 0.5 + mask_rgb * 0.5).round().astype("uint8")
            save_png(mask_rgb, args.show_dir / f"{index:05d}_pred.png")
            save_png(overlay, args.show_dir / f"{index:05d}_overlay.png")

    matrix, samples = evaluate_loader(model, loader, dataset.num_classes, device, options,
                                      dataset.ignore_index, num_vis=cfg.trainer.num_vis_images,
                                      progress=True, on_prediction=on_prediction)
    results = matrix.compute()
    print(f"{checkpoint_path} on the {args.split} split ({len(dataset)} images):")
    print(format_table(results, list(dataset.class_names)))
    tag = f"{args.split}_{checkpoint_path.stem}"
    if args.mode != "whole":
        tag += f"_{args.mode}"
    if options.views != [(1.0, False)]:
        tag += "_tta"
    out = args.run_dir / f"eval_{tag}.json"
    inference = {"mode": options.mode, "crop": options.crop, "stride": options.stride,
                 "scales": list(options.scales), "flip": options.flip}
    write_json(out, json_safe({"checkpoint": str(checkpoint_path), "split": args.split,
                               "num_images": len(dataset), "inference": inference,
                               "images_also_in_training": also_trained_on, **results}), indent=2)
    if samples:
        save_png(prediction_grid(samples, dataset.colours, list(dataset.class_names)),
                 args.run_dir / f"eval_{tag}.png")
    save_confusion_matrix(matrix.mat.cpu().numpy(), list(dataset.class_names),
                          args.run_dir / f"eval_{tag}_confusion_matrix.png",
                          f"confusion matrix, {args.split} split, {checkpoint_path.name}")
    if args.show_dir:
        print(f"Wrote {len(dataset)} predictions to {args.show_dir}")
    print(f"Wrote {out}")
    return results


def cli() -> None:
    """The ``segexp-eval`` command (and ``python scripts/evaluate.py``)."""
    with torch.no_grad():  # not set_grad_enabled(False): the command may run inside a program
        command(main)


if __name__ == "__main__":
    cli()
