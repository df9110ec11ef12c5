"""segexp's defaults against a plain PyTorch loop, at equal wall-clock time on equal CPU.

    python scripts/bench/learning.py --root ../shared/datasets/stanford_background/iccv09Data --minutes 20
    python scripts/bench/learning.py --root ... --minutes 5 --segexp-args loss=ohem   # a variant
    python scripts/bench/learning.py --root ... --sides loop --minutes 5             # one side only

Two processes train side by side, each pinned to its own CPU core (``taskset``, one thread), for
the same number of minutes, from scratch (``--pretrained`` gives both sides ImageNet encoders where
the weights can be had):

- **segexp**: ``python train.py dataset=stanford_background dataset.root=<root>
  trainer.max_time=<minutes>m`` and nothing else (``--segexp-args`` adds overrides for experiments);
- **loop**: the plain loop a user would write with segmentation-models-pytorch (a benchmark-only
  dependency): its U-Net/ResNet-18, AdamW lr 1e-3, poly decay (power 0.9) over the time budget,
  random rescale 0.75-1.5, 256x256 crops, horizontal flip, batch 8, cross entropy, two loader
  workers as segexp's default. :func:`plain_loop` is all of it.

Both final models (segexp's ``last.pt``, not the best validation, since the validation split is
the held-out split here) are then evaluated by the same function on Stanford Background's
held-out split (segexp's fixed 142-image ``val``; 143 before 2026-12-03, one of them a copy of
a training image) at full resolution: each image as stored, ImageNet-normalised, padded to a
multiple of 32, mIoU over the 8 classes. Prints both mIoU figures, per-class IoU, iterations
and images seen, and the ratio segexp / loop; writes them as JSON to ``--out`` (with the exact
command). The figures depend on the machine; recorded ones are
in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from segexp.cli import command
from segexp.data.stanford_background import StanfordBackgroundDataset, read_regions
from segexp.inference import Segmenter
from segexp.metrics import ConfusionMatrix, format_table
from segexp.profiling import cpu_model

ROOT = Path(__file__).resolve().parents[2]

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
NUM_CLASSES = 8
IGNORE = 255


# -- the plain loop -------------------------------------------------------------------------------
class LoopData(torch.utils.data.Dataset):
    """Stanford Background read by hand: random rescale 0.75-1.5, 256x256 crop, flip."""

    def __init__(self, root: Path, ids: list[str], crop: int = 256, seed: int = 0) -> None:
        self.root, self.ids, self.crop, self.seed = root, ids, crop, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image = cv2.cvtColor(cv2.imread(str(self.root / "images" / f"{self.ids[i]}.jpg")),
                             cv2.COLOR_BGR2RGB)
        mask = read_regions(self.root / "labels" / f"{self.ids[i]}.regions.txt").astype(np.uint8)
        scale = rng.uniform(0.75, 1.5)
        h, w = mask.shape
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        pad_h, pad_w = max(0, self.crop - mask.shape[0]), max(0, self.crop - mask.shape[1])
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=0)
        mask = cv2.copyMakeBorder(mask, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=IGNORE)
        y = rng.integers(0, mask.shape[0] - self.crop + 1)
        x = rng.integers(0, mask.shape[1] - self.crop + 1)
        image, mask = image[y:y + self.crop, x:x + self.crop], mask[y:y + self.crop, x:x + self.crop]
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image = (image.astype(np.float32) / 255.0 - MEAN) / STD
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), torch.from_numpy(mask.astype(np.int64))


def plain_loop(root: Path, seconds: float, out: Path, pretrained: bool = False) -> None:
    """U-Net/ResNet-18 from segmentation-models-pytorch, AdamW 1e-3, poly over the time budget."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    ids = StanfordBackgroundDataset.split_ids(
        [p.name.split(".")[0] for p in (root / "images").glob("*.jpg")], "train")
    data = LoopData(root, ids)
    model = smp.Unet("resnet18", encoder_weights="imagenet" if pretrained else None,
                     classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start, steps, epoch = time.perf_counter(), 0, 0
    model.train()
    while time.perf_counter() - start < seconds:
        data.epoch = epoch
        loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, drop_last=True,
                                             num_workers=2)
        for images, masks in loader:
            progress = min(1.0, (time.perf_counter() - start) / seconds)
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * (1 - progress) ** 0.9
            loss = F.cross_entropy(model(images), masks, ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if steps % 20 == 0:
                print(f"[loop] step {steps} loss {loss.item():.4f} "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
            if time.perf_counter() - start >= seconds:
                break
        epoch += 1
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    (out / "loop.json").write_text(json.dumps(
        {"iters": steps, "images_seen": steps * 8, "train_s": time.perf_counter() - start}))


# -- the shared evaluation ------------------------------------------------------------------------
@torch.no_grad()
def evaluate_full_resolution(model: torch.nn.Module, root: Path) -> dict:
    """mIoU over the held-out split, every image as stored (padded to a multiple of 32)."""
    dataset = StanfordBackgroundDataset("val", root=root)
    matrix = ConfusionMatrix(NUM_CLASSES, ignore_index=IGNORE)
    model.eval()
    for i in range(len(dataset)):
        sample = dataset.load(i)
        image = (sample.image.astype(np.float32) / 255.0 - MEAN) / STD
        x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % 32, 0, (-h) % 32))
        logits = model(x)[..., :h, :w]
        matrix.update(logits.argmax(1), torch.from_numpy(sample.mask.astype(np.int64))[None])
    return matrix.compute()


def _pinned(core: int | None, command: list[str]) -> list[str]:
    return (["taskset", "-c", str(core)] if core is not None else []) + command


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True,
                        help="Stanford Background's iccv09Data folder (images/, labels/)")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--sides", default="segexp,loop", help="which sides to train")
    parser.add_argument("--cores", default="0,1", help="CPU core of each side (segexp, loop)")
    parser.add_argument("--segexp-args", default="", help="extra train.py overrides (experiments)")
    parser.add_argument("--pretrained", action="store_true",
                        help="ImageNet encoders on both sides (needs the weights)")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_learning")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: <work>/results.json)")
    parser.add_argument("--evaluate", type=Path, default=None, metavar="WORK_DIR",
                        help="evaluate the runs of an earlier benchmark folder instead of training")
    parser.add_argument("--loop-only", action="store_true", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    if args.loop_only:
        torch.set_num_threads(1)
        plain_loop(args.root, seconds, args.work / "loop", args.pretrained)
        return {}

    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = args.evaluate or args.work / stamp
    sides = [s for s in args.sides.split(",") if s]
    cores = [int(c) for c in args.cores.split(",")] if args.cores else [None, None]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    children = {}
    if args.evaluate:  # the runs are there already: their commands are in their folders
        sides = [side for side in sides if (work / side).is_dir()]
    if "segexp" in sides and not args.evaluate:
        command = [sys.executable, str(ROOT / "train.py"), "dataset=stanford_background",
                   f"dataset.root={args.root}", f"trainer.max_time={args.minutes}m",
                   f"hydra.run.dir={work / 'segexp'}", "trainer.progress_bar=false",
                   *(["backbone.pretrained=true"] if args.pretrained else []),
                   *shlex.split(args.segexp_args)]
        children["segexp"] = (command, subprocess.Popen(_pinned(cores[0], command), env=env,
                                                        cwd=ROOT, stdout=subprocess.DEVNULL))
    if "loop" in sides and not args.evaluate:
        command = [sys.executable, __file__, "--loop-only", "--root", str(args.root),
                   "--minutes", str(args.minutes), "--work", str(work),
                   *(["--pretrained"] if args.pretrained else [])]
        children["loop"] = (command, subprocess.Popen(_pinned(cores[-1], command), env=env, cwd=ROOT,
                                                      stdout=subprocess.DEVNULL))
    for name, (command, process) in children.items():
        if process.wait() != 0:
            raise SystemExit(f"the {name} side failed: {shlex.join(command)}")

    results: dict = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
                     "minutes": args.minutes, "machine": os.uname().machine,
                     "cpu": cpu_model(), "sides": {}}
    class_names = list(StanfordBackgroundDataset.class_names)
    if "segexp" in sides:
        run_dir = work / "segexp"
        segmenter = Segmenter.from_run(run_dir, checkpoint="last", device="cpu")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        scores = evaluate_full_resolution(segmenter.model, args.root)
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text() \
            if (run_dir / ".hydra" / "overrides.yaml").is_file() else ""
        results["sides"]["segexp"] = {
            "overrides": [line[2:] for line in overrides.splitlines() if line.startswith("- ")],
            "mIoU": scores["mIoU"],
            "IoU": dict(zip(class_names, scores["IoU"], strict=True)),
            "iters": metrics["iters"], "images_seen": metrics["images_seen"],
            "budget_used_s": metrics.get("budget", {}).get("used_s")}
        print("segexp (last.pt, full resolution):\n" + format_table(scores, class_names))
    if "loop" in sides:
        import segmentation_models_pytorch as smp

        model = smp.Unet("resnet18", encoder_weights=None, classes=NUM_CLASSES)
        model.load_state_dict(torch.load(work / "loop" / "model.pt", weights_only=True))
        info = json.loads((work / "loop" / "loop.json").read_text())
        scores = evaluate_full_resolution(model, args.root)
        results["sides"]["loop"] = {"mIoU": scores["mIoU"],
                                    "IoU": dict(zip(class_names, scores["IoU"], strict=True)),
                                    **info}
        print("plain loop (full resolution):\n" + format_table(scores, class_names))
    if len(results["sides"]) == 2:
        results["ratio"] = results["sides"]["segexp"]["mIoU"] / max(results["sides"]["loop"]["mIoU"], 1e-9)
    for name, side in results["sides"].items():
        print(f"{name}: mIoU {100 * side['mIoU']:.2f} % after {side['iters']} iterations "
              f"({side['images_seen']} images)")
    if "ratio" in results:
        print(f"segexp / loop mIoU: {results['ratio']:.3f}")
    out = args.out or work / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    command(main)
