"""Look at what the model will be trained on: augmented samples of a split, with their masks.

    python scripts/browse_dataset.py                                   # synthetic, train split
    python scripts/browse_dataset.py dataset=stanford_background --num 8 --seed 1
    python scripts/browse_dataset.py dataset=cityscapes dataset.root=/data/cityscapes --split val
    python scripts/browse_dataset.py dataset=ade20k transforms=none --out ade.png

Takes the same overrides as train.py, builds the split with its transforms (the train pipeline
for ``--split train``, the val pipeline otherwise), draws ``--num`` samples (which ones and their
augmentation are fixed by ``--seed``) and writes one PNG: a grid of ``--cols`` tiles per row,
each tile the augmented image (denormalised) beside the same image under its colourised mask,
then a legend of the class colours (black = ignored pixels, e.g. crop padding). The default
output is ``outputs/browse_<dataset>_<split>.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torchvision.transforms import v2

from segexp.cli import command
from segexp.config import compose_train_config, instantiate
from segexp.errors import SegexpError
from segexp.runtime import seed_for
from segexp.visualize import colourise, denormalise, header, legend, save_png

ROOT = Path(__file__).resolve().parents[1]

# Layout of the grid (tests check the PNG size against it): every tile is a caption strip of
# CAPTION pixels above [image | overlay], followed by GAP white pixels right and below.
CAPTION = 18
GAP = 4
ALPHA = 0.6  # mask opacity in the overlay
IGNORE_COLOUR = (0, 0, 0)




def normalisation(pipeline) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of the pipeline's (last) ``Normalize``; none: the image is already 0..1."""
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    stack = [pipeline]
    while stack:
        t = stack.pop(0)
        if isinstance(t, v2.Normalize):
            mean, std = tuple(t.mean), tuple(t.std)
        stack.extend(getattr(t, "transforms", []) or [])
    return mean, std


def build_split(cfg: DictConfig, split: str):
    """The split's dataset with its transforms: the train pipeline for train, val otherwise."""
    pipeline = instantiate(cfg.transforms.train if split == "train" else cfg.transforms.val)
    dataset = instantiate(cfg.dataset, split=split, transforms=pipeline)
    if len(dataset) == 0:
        raise SegexpError(f"the {split} split of dataset '{type(dataset).__name__}' is empty "
                          f"(dataset.root={cfg.dataset.get('root')}). Check the folder layout.")
    return dataset, pipeline


def pick(length: int, num: int, seed: int) -> list[int]:
    """``num`` sample indices fixed by ``seed``: distinct while the split has enough."""
    rng = np.random.default_rng(seed)
    if num <= length:
        return sorted(int(i) for i in rng.choice(length, size=num, replace=False))
    return [int(i) for i in rng.integers(0, length, size=num)]


def tile(image: np.ndarray, mask: np.ndarray, palette, ignore_index: int, title: str,
         height: int, width: int) -> np.ndarray:
    """[image | overlay] under a caption, padded to ``height`` x ``width`` (one sample's size)."""
    colours = colourise(mask, palette, ignore_index)
    overlay = (image * (1 - ALPHA) + colours * ALPHA).astype(np.uint8)
    overlay[mask == ignore_index] = IGNORE_COLOUR
    pair = np.concatenate([image, overlay], axis=1)
    h, w = pair.shape[:2]
    pair = np.pad(pair, ((0, height - h), (0, 2 * width - w), (0, 0)), constant_values=255)
    caption = header([title, "mask"], width, 2 * width, CAPTION)
    return np.pad(np.concatenate([caption, pair], axis=0), ((0, GAP), (0, GAP), (0, 0)),
                  constant_values=255)


def browse_grid(dataset, pipeline, indices: list[int], seed: int, cols: int) -> np.ndarray:
    mean, std = normalisation(pipeline)
    samples = []
    for k, index in enumerate(indices):
        image, mask = dataset[(index, seed_for(seed, k))]  # augmentation seeded per drawn sample
        samples.append((index, denormalise(image, mean, std), mask.numpy()))
    height = max(s[1].shape[0] for s in samples)
    width = max(s[1].shape[1] for s in samples)
    tiles = [tile(image, mask, dataset.colours, dataset.ignore_index,
                  f"#{index} {image.shape[1]}x{image.shape[0]}", height, width)
             for index, image, mask in samples]
    blank = np.full_like(tiles[0], 255)
    tiles += [blank] * (-len(tiles) % cols)
    rows = [np.concatenate(tiles[i:i + cols], axis=1) for i in range(0, len(tiles), cols)]
    grid = np.concatenate(rows, axis=0)
    names = [*dataset.class_names, "ignore"]
    colours = [*dataset.colours, IGNORE_COLOUR]
    return np.concatenate([grid, legend(names, colours, grid.shape[1])], axis=0)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*",
                        help="config overrides as for train.py, e.g. dataset=stanford_background")
    parser.add_argument("--split", default="train", help="split to draw from (default: train)")
    parser.add_argument("--num", type=int, default=16, help="samples to draw (default: 16)")
    parser.add_argument("--cols", type=int, default=4, help="tiles per grid row (default: 4)")
    parser.add_argument("--seed", type=int, default=0,
                        help="fixes which samples are drawn and their augmentation (default: 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default: outputs/browse_<dataset>_<split>.png)")
    args = parser.parse_intermixed_args(argv)
    if args.num < 1 or args.cols < 1:
        parser.error("--num and --cols must be at least 1")

    cfg, dataset_name = compose_train_config(args.overrides)
    dataset, pipeline = build_split(cfg, args.split)
    indices = pick(len(dataset), args.num, args.seed)
    with torch.no_grad():
        grid = browse_grid(dataset, pipeline, indices, args.seed, min(args.cols, args.num))
    out = args.out or ROOT / "outputs" / f"browse_{dataset_name}_{args.split}.png"
    save_png(grid, out)
    print(out)
    return out


if __name__ == "__main__":
    command(main)
