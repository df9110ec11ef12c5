"""Measure parameters and GFLOPs of every default model variant and write docs/models.md.

    python scripts/bench/model_table.py            # all models -> docs/models.md
    python scripts/bench/model_table.py --print    # print the table only

Models are built on the meta device (no memory, no weights) and FLOPs counted with
torch.utils.flop_counter on a 512x512 input (attention through SDPA's math backend so it is
counted). GFLOPs are multiply-accumulates x 1e-9, the convention of the papers' tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from tqdm import tqdm

from segexp.models.cost import model_cost

ROOT = Path(__file__).resolve().parents[2]

PUBLISHED = ROOT / "segexp" / "models" / "published.yaml"
# Every model with its default backbone (and the ADE20K class count), beyond the published ones.
DEFAULTS = [
    ("FCN R-50-D8", ["model=fcn", "backbone=resnet50_d8"]),
    ("PSPNet R-50-D8", ["model=pspnet", "backbone=resnet50_d8"]),
    ("DeepLabV3 R-50-D8", ["model=deeplabv3", "backbone=resnet50_d8"]),
    ("DeepLabV3+ R-50-D8", ["model=deeplabv3plus", "backbone=resnet50_d8"]),
    ("UPerNet R-50", ["model=upernet", "backbone=resnet50"]),
    ("U-Net R-18 (default run)", ["model=unet", "backbone=resnet18"]),
    ("CCNet R-50-D8", ["model=ccnet", "backbone=resnet50_d8"]),
    ("FastFCN (JPU + PSP) R-50", ["model=fastfcn", "backbone=resnet50"]),
    ("Lite-HRNet-18", ["model=litehrnet", "backbone=litehrnet_18"]),
    ("Lite-HRNet-30", ["model=litehrnet", "backbone=litehrnet_30"]),
    ("Segmenter ViT-S mask", ["model=segmenter", "backbone=vit_small"]),
    ("DINOv2 ViT-S/14 linear (frozen)", ["model=dinov2", "backbone=dinov2_vits14"]),
]


def rows() -> list[dict]:
    entries = yaml.safe_load(PUBLISHED.read_text())
    out = []
    for entry in tqdm(entries + [{"name": n, "overrides": o + ["dataset.num_classes=150"]}
                                 for n, o in DEFAULTS], desc="models"):
        params, gflops = model_cost(entry["overrides"])
        row = {**entry, "measured_params_m": params, "gflops_512": gflops}
        if "flops_size" in entry:
            row["measured_gflops_published_size"] = model_cost(entry["overrides"],
                                                            tuple(entry["flops_size"]))[1]
        out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| model | overrides | params (M) | published (M) | GFLOPs 512x512 | published GFLOPs (size) "
             "| measured at that size | source |", "|---|---|---|---|---|---|---|---|"]
    for r in table:
        published_flops = f"{r['gflops']} ({r['flops_size'][0]}x{r['flops_size'][1]})" \
            if "gflops" in r else "-"
        at_size = f"{r['measured_gflops_published_size']:.1f}" if "gflops" in r else "-"
        lines.append(f"| {r['name']} | `{' '.join(r['overrides'])}` | {r['measured_params_m']:.2f} "
                     f"| {r.get('params_m', '-')} | {r['gflops_512']:.1f} | {published_flops} "
                     f"| {at_size} | {r.get('source', 'measured here')} |")
    return "\n".join(lines)


HEADER = """# Models: parameters and GFLOPs

Measured by `python scripts/bench/model_table.py` (meta device; GFLOPs = multiply-accumulates x 1e-9 at
512x512, single scale, 150 classes unless the overrides say otherwise; auxiliary heads included, as
in the papers' counts). `tests/models/test_published.py` keeps every measured parameter count
within 2 % of the published figure.

"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--print", action="store_true", help="print instead of writing docs/models.md")
    args = parser.parse_args()
    table = markdown(rows())
    if args.print:
        print(table)
        return
    (ROOT / "docs" / "models.md").write_text(HEADER + table + "\n")
    print(f"Wrote {ROOT / 'docs' / 'models.md'}")


if __name__ == "__main__":
    main()
