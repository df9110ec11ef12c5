"""segexp's models timed side by side with other libraries' implementations of the same architecture.

    python scripts/bench/peers.py --dry-run                              # list the pairs
    python scripts/bench/peers.py --device cpu --size 256 256 --iters 5 --warmup 2
    python scripts/bench/peers.py --pairs segformer_b0,fcn_r50 --device cuda --amp bf16 --channels-last
    python scripts/bench/peers.py --pairs upernet_convnext_t-smp \\
        --segexp-override upernet_convnext_t-smp:head.channels=256       # segexp at smp's decoder width

Each pair builds segexp's model (``segexp.models.build_model``) and a peer's (transformers,
torchvision or segmentation-models-pytorch "smp") with random weights, in one process, and times
both on the same random input, batch, precision, memory format and device:

- inference latency: eval mode, no grad, one forward of ``--batch`` images;
- training step: forward + cross entropy on random labels + backward + SGD step (momentum 0.9).
  No auxiliary head on either side (segexp's is switched off with ``model.aux_head=null``, the
  peers are built without theirs), the same ``F.cross_entropy`` for both;
- both sides return logits at the input resolution: where a peer returns them at 1/4
  (transformers' SegFormer) they are upsampled (bilinear) inside the timed call, as segexp does;
- segexp and the peer alternate, each going first in every other round, so a change of machine
  load hits both alike; ``--warmup`` untimed rounds, then the median of ``--iters`` timed ones;
- ratio = segexp / peer of the medians (below 1: segexp is faster), with the range of the
  rounds' own ratios beside it (``*_ratio_min``/``*_ratio_max``) to show the load's noise;
- peak memory: the peak of the live tensors of one extra, untimed training step (weights,
  gradients, optimizer state, activations, temporaries), tracked per model by torch's
  ``MemTracker`` on any device (``mem_kind=tensor_peak``);
- params and GFLOPs (multiply-accumulates x 1e-9, batch 1, ``segexp.profiling.count_gflops``)
  of both, so a difference in size is visible next to a difference in time.

The peers are benchmark-only dependencies: a pair whose peer package is missing gets a
"skipped: install ..." row and the other pairs still run. Nothing is downloaded: every model is
built from a config with random weights. Prints a table and writes it as CSV to ``--out`` and as
JSON beside it (same name, ``.json``, with the exact command and the library versions). Timings
depend on the machine and its load; the tests check the columns, never the figures.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import math
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from segexp.cli import command
from segexp.cli.benchmark import AMP, fmt, write
from segexp.config import compose_train_config
from segexp.errors import SegexpError
from segexp.models import build_model
from segexp.models.mask_classification import MaskPredictions
from segexp.profiling import count_gflops, count_params, median_time
from segexp.runtime import autocast, resolve_device

ROOT = Path(__file__).resolve().parents[2]

DEFAULT_OUT = ROOT / "outputs" / "benchmark" / "peers.csv"
# What to install for each peer (the versions these pairs were written against).
PEER_INSTALL = {"transformers": "transformers==5.23.0", "torchvision": "torchvision==0.29.1",
                "segmentation_models_pytorch": "segmentation-models-pytorch==0.6.0"}
PEER_DISTRIBUTIONS = {"transformers": "transformers", "torchvision": "torchvision",
                      "segmentation_models_pytorch": "segmentation-models-pytorch"}
COLUMNS = ["pair", "architecture", "peer", "num_classes", "size", "batch", "device", "amp",
           "channels_last", "segexp_params_m", "peer_params_m", "segexp_gflops", "peer_gflops",
           "segexp_train_ms", "peer_train_ms", "train_ratio", "train_ratio_min", "train_ratio_max",
           "segexp_latency_ms", "peer_latency_ms", "latency_ratio", "latency_ratio_min",
           "latency_ratio_max", "segexp_peak_mb", "peer_peak_mb", "memory_ratio", "mem_kind", "status",
           "segexp_overrides", "peer_config", "note"]


# -- peers: each builder imports its package itself, so a missing one fails only its own pairs ---

def _smp():
    return importlib.import_module("segmentation_models_pytorch")


def _transformers():
    return importlib.import_module("transformers")


def _torchvision_segmentation():
    return importlib.import_module("torchvision.models.segmentation")


def hf_upernet_convnext_tiny(num_classes: int) -> nn.Module:
    tf = _transformers()
    backbone = tf.ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768],
                                 out_features=["stage1", "stage2", "stage3", "stage4"],
                                 drop_path_rate=0.4)
    return tf.UperNetForSemanticSegmentation(tf.UperNetConfig(
        backbone_config=backbone, num_labels=num_classes, use_auxiliary_head=False))


def hf_mask2former_swin_tiny(num_classes: int) -> nn.Module:
    tf = _transformers()
    backbone = tf.SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                             window_size=7, drop_path_rate=0.3,
                             out_features=["stage1", "stage2", "stage3", "stage4"])
    return tf.Mask2FormerForUniversalSegmentation(tf.Mask2FormerConfig(
        backbone_config=backbone, num_labels=num_classes))


# SegFormer encoders as in the paper (Table 6 of Xie et al.): widths, depths, decoder width.
MIT = {"b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256), "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768)}


def hf_segformer(variant: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        tf = _transformers()
        widths, depths, decoder = MIT[variant]
        return tf.SegformerForSemanticSegmentation(tf.SegformerConfig(
            hidden_sizes=widths, depths=depths, decoder_hidden_size=decoder, num_labels=num_classes))
    return build


def smp_segformer(variant: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        return _smp().Segformer(encoder_name=f"mit_{variant}", encoder_weights=None, classes=num_classes,
                                decoder_segmentation_channels=MIT[variant][2])
    return build


def smp_upernet_convnext_tiny(num_classes: int) -> nn.Module:
    # Extra keywords reach timm.create_model: the same stochastic depth as segexp's recipe.
    return _smp().UPerNet(encoder_name="tu-convnext_tiny", encoder_weights=None, classes=num_classes,
                          drop_path_rate=0.4)


def smp_unet_resnet50(num_classes: int) -> nn.Module:
    return _smp().Unet(encoder_name="resnet50", encoder_weights=None, classes=num_classes)


def smp_pspnet_resnet50_d8(num_classes: int) -> nn.Module:
    # smp's default PSPNet stops the ResNet after layer2; the paper's (and segexp's) runs all of it,
    # dilated to output stride 8, and upsamples the logits by 8.
    return _smp().PSPNet(encoder_name="resnet50", encoder_weights=None, classes=num_classes,
                         encoder_depth=5, output_stride=8, upsampling=8)


def torchvision_model(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        return getattr(_torchvision_segmentation(), name)(weights=None, weights_backbone=None,
                                                          num_classes=num_classes, aux_loss=False)
    return build


def logits_of(output) -> torch.Tensor:
    """Logits from the peers' outputs: a tensor (smp), a dict (torchvision) or a
    transformers output object."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "out" in output:
        return output["out"]
    return output.logits


def full_resolution(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    if logits.shape[-2:] == images.shape[-2:]:
        return logits
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class Pair:
    architecture: str       # e.g. "segformer_b0": selects every peer of it with --pairs
    peer_name: str          # e.g. "smp": selects every pair of that peer with --pairs
    peer_module: str        # the package to import (a missing one skips the pair)
    segexp_overrides: tuple[str, ...]
    build_peer: Callable[[int], nn.Module]
    peer_config: str
    num_classes: int        # the benchmark the architecture is usually reported on
    note: str

    @property
    def name(self) -> str:
        return f"{self.architecture}-{self.peer_name}"


NO_AUX = "model.aux_head=null"
UPERNET = ("model=upernet", "backbone=convnext_tiny", NO_AUX)
PAIRS = [
    Pair("upernet_convnext_t", "transformers", "transformers", UPERNET, hf_upernet_convnext_tiny,
         "UperNetForSemanticSegmentation(ConvNextConfig tiny, drop_path_rate=0.4, "
         "use_auxiliary_head=False)", 150,
         "same layers (checkpoint parity: tests/convert/test_hf_upernet.py); segexp adds MMSeg's dropout 0.1 "
         "before the classifier (training only; transformers has none)"),
    Pair("upernet_convnext_t", "smp", "segmentation_models_pytorch", UPERNET,
         smp_upernet_convnext_tiny,
         "smp.UPerNet('tu-convnext_tiny', drop_path_rate=0.4)", 150,
         "smp's decoder is 256 wide, segexp's 512 (MMSeg/paper recipe; head.channels=256 matches "
         "smp's size); smp upsamples the 1/4-resolution logits with align_corners=True and has no "
         "dropout before the classifier"),
    Pair("segformer_b0", "transformers", "transformers", ("model=segformer", "backbone=mit_b0"),
         hf_segformer("b0"), "SegformerForSemanticSegmentation(b0 config, decoder 256)", 150,
         "same architecture; transformers returns 1/4-resolution logits, upsampled (bilinear) "
         "inside the timed call"),
    Pair("segformer_b0", "smp", "segmentation_models_pytorch", ("model=segformer", "backbone=mit_b0"),
         smp_segformer("b0"), "smp.Segformer('mit_b0', decoder_segmentation_channels=256)", 150,
         "same architecture; smp upsamples the logits with align_corners=True and has no dropout "
         "before the classifier"),
    Pair("segformer_b2", "transformers", "transformers",
         ("model=segformer", "backbone=mit_b2", "head.channels=768"), hf_segformer("b2"),
         "SegformerForSemanticSegmentation(b2 config, decoder 768)", 150,
         "same architecture; transformers returns 1/4-resolution logits, upsampled (bilinear) "
         "inside the timed call"),
    Pair("segformer_b2", "smp", "segmentation_models_pytorch",
         ("model=segformer", "backbone=mit_b2", "head.channels=768"), smp_segformer("b2"),
         "smp.Segformer('mit_b2', decoder_segmentation_channels=768)", 150,
         "same architecture (smp's default decoder width 256 raised to the paper's 768); smp "
         "upsamples the logits with align_corners=True and has no dropout before the classifier"),
    Pair("mask2former_swin_t", "transformers", "transformers",
         ("model=mask2former", "backbone=swin_tiny"), hf_mask2former_swin_tiny,
         "Mask2FormerForUniversalSegmentation(SwinConfig tiny, drop_path_rate=0.3)", 150,
         "same architecture (checkpoint parity: tests/models/test_mask2former.py); both give per-pixel "
         "scores (masks upsampled, then class x mask) inside the timed call; the training step "
         "times cross entropy on those scores, not the Hungarian-matched criterion"),
    Pair("deeplabv3_r50", "torchvision", "torchvision",
         ("model=deeplabv3_torchvision", "backbone=resnet50_d8", NO_AUX),
         torchvision_model("deeplabv3_resnet50"), "deeplabv3_resnet50(aux_loss=False)", 21,
         "same architecture, output stride 8 (checkpoint parity: tests/test_weights.py)"),
    Pair("fcn_r50", "torchvision", "torchvision",
         ("model=fcn_torchvision", "backbone=resnet50_d8", NO_AUX),
         torchvision_model("fcn_resnet50"), "fcn_resnet50(aux_loss=False)", 21,
         "same architecture, output stride 8 (checkpoint parity: tests/test_weights.py)"),
    Pair("unet_r50", "smp", "segmentation_models_pytorch", ("model=unet", "backbone=resnet50"),
         smp_unet_resnet50, "smp.Unet('resnet50')", 19,
         "different decoders: segexp's is 128/64/32 wide over the maps at strides 32-4 (2x2 "
         "up-convs, logits at 1/4 then bilinear); smp's is 256/128/64/32/16 over every map with "
         "nearest upsampling and a fifth block at full resolution (head.in_index=null "
         "head.decoder_channels=[256,128,64,32] head.upsample=bilinear head.full_resolution=true "
         "matches its size)"),
    Pair("pspnet_r50", "smp", "segmentation_models_pytorch",
         ("model=pspnet", "backbone=resnet50_d8", NO_AUX), smp_pspnet_resnet50_d8,
         "smp.PSPNet('resnet50', encoder_depth=5, output_stride=8, upsampling=8)", 150,
         "smp set to the paper's dilated ResNet-50 at output stride 8 (its default stops after "
         "layer2); smp's bottleneck is a 1x1 conv (segexp/MMSeg: 3x3) and its classifier 3x3 "
         "(segexp: 1x1)"),
]


def select_pairs(tokens: list[str]) -> list[Pair]:
    """Pairs named by full name (``segformer_b0-smp``), architecture (``segformer_b0``) or peer
    (``smp``), in the table's order."""
    unknown = [t for t in tokens if not any(t in (p.name, p.architecture, p.peer_name) for p in PAIRS)]
    if unknown:
        raise ValueError(f"unknown pair(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(p.name for p in PAIRS)} (or an architecture / peer name)")
    return [p for p in PAIRS if any(t in (p.name, p.architecture, p.peer_name) for t in tokens)]


def parse_segexp_overrides(items: list[str]) -> dict[str, list[str]]:
    """``PAIR:OVERRIDE`` items -> {pair name: [override, ...]}."""
    extra: dict[str, list[str]] = {}
    names = {p.name for p in PAIRS}
    for item in items:
        name, sep, override = item.partition(":")
        if not sep or "=" not in override or name not in names:
            raise ValueError(f"--segexp-override {item!r}: expected PAIR:KEY=VALUE with PAIR one of "
                             f"{', '.join(sorted(names))}")
        extra.setdefault(name, []).append(override)
    return extra


# -- measuring ------------------------------------------------------------------------------------

def alternate(fns: dict[str, Callable[[], None]], device: torch.device, iters: int,
              warmup: int) -> dict[str, list[float]]:
    """Seconds of each call of each function, per round; the functions are called in turn and
    the first to run swaps every round, so neither side always runs on the caches the other left
    behind."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(iters):
        for name in names if round_index % 2 == 0 else names[::-1]:
            times[name].append(median_time(fns[name], device, iters=1, warmup=0))
    return times


def tensor_peak_mb(step: Callable[[], None], model: nn.Module, optimizer: torch.optim.Optimizer,
                   device: torch.device) -> float:
    """Peak MiB of this model's live tensors over one training step (weights, gradients,
    optimizer state, activations); other models in the process are not counted."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    peaks = tracker.get_tracker_snapshot("peak")
    return sum(stats["Total"] for dev, stats in peaks.items()
               if torch.device(dev).type == device.type) / 2**20


@dataclass
class Contender:
    model: nn.Module
    logits: Callable[[torch.Tensor], torch.Tensor]


def build_contenders(pair: Pair, num_classes: int, extra_overrides: list[str]
                     ) -> tuple[Contender, Contender, list[str]]:
    """segexp's model and the peer's, each built from the same seed."""
    overrides = [*pair.segexp_overrides, f"model.num_classes={num_classes}", *extra_overrides]
    torch.manual_seed(0)
    segexp_model = build_model(compose_train_config(overrides)[0], pretrained=False)  # as the peer's
    torch.manual_seed(0)
    peer_model = pair.build_peer(num_classes)

    def peer_logits(images: torch.Tensor) -> torch.Tensor:
        output = peer_model(images)
        if hasattr(output, "masks_queries_logits"):  # mask classification: per-pixel scores as
            # transformers' semantic post-processing (and segexp's Segmentor) compute them
            return MaskPredictions(output.class_queries_logits, output.masks_queries_logits
                                   ).semantic_logits(images.shape[-2:])
        return full_resolution(logits_of(output), images)

    return Contender(segexp_model, segexp_model), Contender(peer_model, peer_logits), overrides


def measure_pair(pair: Pair, num_classes: int, size: tuple[int, int], batch: int,
                 device: torch.device, amp: str, channels_last: bool, iters: int, warmup: int,
                 extra_overrides: list[str]) -> dict:
    segexp, peer, overrides = build_contenders(pair, num_classes, extra_overrides)
    sides = {"segexp": segexp, "peer": peer}
    precision = AMP[amp]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    row: dict = {"segexp_overrides": " ".join(overrides)}
    for side_name, side in sides.items():
        side.model.to(device=device, memory_format=memory_format)
        row[f"{side_name}_params_m"] = count_params(side.model) / 1e6
        row[f"{side_name}_gflops"] = count_gflops(side.model, size, device)

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=generator).to(device, memory_format=memory_format)
    masks = torch.randint(0, num_classes, (batch, *size), generator=generator).to(device)

    def inference(side: Contender) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast(device, precision):
                side.logits(images)
        return run

    for side in sides.values():
        side.model.eval()
    latency = alternate({name: inference(side) for name, side in sides.items()}, device, iters, warmup)

    def training(side: Contender) -> tuple[Callable[[], None], torch.optim.Optimizer]:
        optimizer = torch.optim.SGD([p for p in side.model.parameters() if p.requires_grad],
                                    lr=1e-3, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "16")

        def step() -> None:
            with autocast(device, precision):
                loss = F.cross_entropy(side.logits(images).float(), masks)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        return step, optimizer

    for side in sides.values():
        side.model.train()
    steps = {name: training(side) for name, side in sides.items()}
    train = alternate({name: step for name, (step, _) in steps.items()}, device, iters, warmup)

    for side_name, (step, optimizer) in steps.items():
        try:
            row[f"{side_name}_peak_mb"] = tensor_peak_mb(step, sides[side_name].model, optimizer, device)
        except Exception as err:  # noqa: BLE001 -- a private torch tool: lose the column, not the row
            row[f"{side_name}_peak_mb"] = math.nan
            row["mem_kind"] = f"unavailable ({type(err).__name__})"
    row.setdefault("mem_kind", "tensor_peak")

    for kind, times in (("train", train), ("latency", latency)):
        for side_name in sides:
            row[f"{side_name}_{kind}_ms"] = 1000 * statistics.median(times[side_name])
        row[f"{kind}_ratio"] = row[f"segexp_{kind}_ms"] / row[f"peer_{kind}_ms"]
        # Each round's own ratio shows how much the machine's load moved the figures.
        per_round = [s / p for s, p in zip(times["segexp"], times["peer"], strict=True)]
        row[f"{kind}_ratio_min"], row[f"{kind}_ratio_max"] = min(per_round), max(per_round)
    row["memory_ratio"] = row["segexp_peak_mb"] / row["peer_peak_mb"]
    return row


# -- output ---------------------------------------------------------------------------------------

def _both(row: dict, key: str, spec: str) -> str:
    return f"{fmt(row.get(f'segexp_{key}'), spec)} / {fmt(row.get(f'peer_{key}'), spec)}"


def _ratio(row: dict, kind: str) -> str:
    return (f"**{row[f'{kind}_ratio']:.2f}** ({row[f'{kind}_ratio_min']:.2f}-"
            f"{row[f'{kind}_ratio_max']:.2f})")


def format_table(rows: list[dict]) -> str:
    """Markdown; a ratio is followed by the range of the rounds' own ratios."""
    lines = ["| pair | classes | params M (segexp / peer) | GFLOPs (segexp / peer) | "
             "train step ms (segexp / peer) | train ratio (rounds) | latency ms (segexp / peer) | "
             "latency ratio (rounds) | peak MB (segexp / peer) | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['pair']} | {r['num_classes']} | | | | | | | | {r['status']} |")
            continue
        lines.append(f"| {r['pair']} | {r['num_classes']} | {_both(r, 'params_m', '.1f')} | "
                     f"{_both(r, 'gflops', '.2f')} | {_both(r, 'train_ms', '.1f')} | "
                     f"{_ratio(r, 'train')} | {_both(r, 'latency_ms', '.1f')} | "
                     f"{_ratio(r, 'latency')} | {_both(r, 'peak_mb', '.0f')} | {r['note']} |")
    return "\n".join(lines)


def _version(module: str) -> str | None:
    try:
        return importlib.metadata.version(PEER_DISTRIBUTIONS.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="bench/peers.py", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="all",
                        help="comma-separated pair, architecture or peer names (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="list the pairs, measure nothing")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                        help="input height and width, multiples of 32 (default: 512 512)")
    parser.add_argument("--batch", type=int, default=2,
                        help="batch size of both inference and training (default: 2)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="one class count for every pair (default: each pair's own)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--amp", choices=list(AMP), default="none",
                        help="autocast dtype for both sides (fp16 needs CUDA; default: none = float32)")
    parser.add_argument("--channels-last", action="store_true",
                        help="both models and the input in channels-last memory format")
    parser.add_argument("--iters", type=int, default=10, help="timed rounds (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--segexp-override", action="append", default=[], metavar="PAIR:KEY=VALUE",
                        help="an extra config override for segexp's side of one pair (repeatable), "
                             "e.g. upernet_convnext_t-smp:head.channels=256")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"CSV file; the JSON goes beside it (default: {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)

    tokens = [t.strip() for t in args.pairs.split(",") if t.strip()]
    try:
        pairs = PAIRS if tokens in ([], ["all"]) else select_pairs(tokens)
        extra = parse_segexp_overrides(args.segexp_override)
    except ValueError as err:
        parser.error(str(err))
    if args.dry_run:
        for pair in pairs:
            print(f"{pair.name}\tclasses {pair.num_classes}\tsegexp: {' '.join(pair.segexp_overrides)}"
                  f"\tpeer: {pair.peer_config}")
        return [{"pair": p.name, "architecture": p.architecture, "peer": p.peer_name,
                 "num_classes": p.num_classes, "segexp_overrides": " ".join(p.segexp_overrides),
                 "peer_config": p.peer_config, "note": p.note} for p in pairs]

    height, width = args.size
    if height < 32 or width < 32 or height % 32 or width % 32:
        parser.error(f"--size {height} {width}: both must be positive multiples of 32 (the "
                     "backbones' total stride)")
    if args.batch < 2:
        parser.error("--batch must be at least 2: BatchNorm after global pooling (PSP, ASPP) "
                     "needs more than one sample per batch in training")
    if args.iters < 1 or args.warmup < 0:
        parser.error("need --iters >= 1 and --warmup >= 0")
    if args.num_classes is not None and args.num_classes < 2:
        parser.error("--num-classes must be at least 2")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device, option="--device")
    except SegexpError as err:
        parser.error(str(err))
    if args.amp == "fp16" and device.type != "cuda":
        parser.error("--amp fp16 needs a CUDA device; use --amp bf16 or none on the CPU")

    load_before = _load_average()
    rows = []
    progress = tqdm(pairs, desc="pairs", disable=len(pairs) < 2)
    for pair in progress:
        progress.set_postfix_str(pair.name)
        num_classes = args.num_classes or pair.num_classes
        row = {"pair": pair.name, "architecture": pair.architecture, "peer": pair.peer_name,
               "num_classes": num_classes, "size": f"{height}x{width}", "batch": args.batch,
               "device": device.type, "amp": args.amp, "channels_last": args.channels_last,
               "peer_config": pair.peer_config, "note": pair.note, "status": "ok",
               "segexp_overrides": " ".join(pair.segexp_overrides)}
        if extra.get(pair.name):  # the note describes the default pair: say what was changed
            row["note"] = f"segexp side with {' '.join(extra[pair.name])}; " + pair.note
        try:
            importlib.import_module(pair.peer_module)
        except ImportError:
            row["status"] = f"skipped: install {PEER_INSTALL[pair.peer_module]} (benchmark only)"
            rows.append(row)
            continue
        try:
            row.update(measure_pair(pair, num_classes, (height, width), args.batch, device, args.amp,
                                    args.channels_last, args.iters, args.warmup, extra.get(pair.name, [])))
        except (SegexpError, ImportError, RuntimeError, ValueError) as err:  # e.g. out of memory
            row["status"] = "failed: " + str(err).strip().splitlines()[0][:200]
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    meta = {"command": "python scripts/bench/peers.py " + shlex.join(argv),
            "device": device.type, "device_name": _device_name(device),
            "threads": torch.get_num_threads(), "size": f"{height}x{width}", "batch": args.batch,
            "amp": args.amp, "channels_last": args.channels_last,
            "iters": args.iters, "warmup": args.warmup,
            "load_average_1min": {"before": load_before, "after": _load_average()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "timm": _version("timm"), "torchvision": _version("torchvision"),
                         "transformers": _version("transformers"),
                         "segmentation_models_pytorch": _version("segmentation_models_pytorch")},
            "timing": "segexp and peer alternate (first in turn); median of iters rounds after warmup "
                      "rounds; ratio = segexp / peer of the medians; *_ratio_min/max: the range of "
                      "the rounds' own segexp / peer ratios",
            "memory": "tensor_peak: peak MiB of the model's live tensors (weights, gradients, "
                      "optimizer state, activations) over one training step, torch MemTracker"}
    print()
    print(format_table(rows))
    print(f"\n{device.type} ({meta['device_name']}, {meta['threads']} threads), size {height}x{width}, "
          f"batch {args.batch}, amp {args.amp}{', channels-last' if args.channels_last else ''}, "
          f"median of {args.iters} after {args.warmup} warm-up; ratio = segexp / peer "
          "(in brackets: the range of the rounds' own ratios)")
    csv_path, json_path = write(rows, args.out, meta, COLUMNS)
    print(f"Wrote {csv_path} and {json_path}")
    return rows


if __name__ == "__main__":
    command(main)
