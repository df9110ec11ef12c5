"""Train a segmentation model from a composed config (``segexp-train`` = ``python train.py``).

    segexp-train                                      # U-Net / ResNet-18 on the synthetic dataset
    segexp-train model=upernet backbone=convnext_tiny dataset=stanford_background
    segexp-train -m model=fcn,unet,pspnet,deeplabv3,upernet trainer=debug
    segexp-train --help                               # config groups and options
    torchrun --nproc_per_node=4 -m segexp.cli.train ...   # distributed data parallel, one folder

The configs are the repository's ``conf/`` (:data:`segexp.config.CONF_DIR`), whatever the working
directory; run folders go under ``outputs/`` of the working directory.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from segexp.atomic import write_json, write_text
from segexp.cli import explained_error, message_of, print_error
from segexp.config import CONF_DIR, require_conf_dir
from segexp.engine.launch import Launch, started_as_one_of_several
from segexp.errors import SegexpError

log = logging.getLogger("train")


# An absolute config_path: Hydra reads it as is, so the console command, `python train.py` and
# `python -m segexp.cli.train` compose the same conf/. The job name comes from this module's name
# ("train": train.log in the run folder) whichever of them started it.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    # The engine (torch, torchvision, timm: seconds to import) loads here, once Hydra has composed
    # the config: --help, --cfg and a mistyped option answer without it.
    from segexp.engine.experiment import run_training

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    keep_config_history(run_dir)
    try:
        return run_training(cfg, run_dir, hydra_launch())
    except Exception as err:
        known = explained_error(err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return failed_job(err, known)
        if known is None:
            raise
        print_error(message_of(known))
        sys.exit(1)


def hydra_launch() -> Launch:
    """What the engine needs to know of Hydra's runtime (it never reads it itself): the option
    chosen in each config group, the command line's overrides, and the sweep of a multirun job."""
    hc = HydraConfig.get()
    group = job_num = None
    if hc.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hc.sweep.dir)
        group, job_num = f"sweep-{sweep_dir.parent.name}_{sweep_dir.name}", hc.job.num
    choices = {str(k): str(v) for k, v in hc.runtime.choices.items() if v is not None}
    return Launch(choices=choices, overrides=tuple(hc.overrides.task), sweep_group=group,
                  job_num=job_num)


def keep_config_history(run_dir: Path) -> None:
    """Hydra rewrites ``.hydra/`` at every start in a folder (a resume too, even one refused for a
    wrong override): copy this start's files to ``.hydra/history/<NN>_<time>/`` so the first run's
    config and each resume's are all kept."""
    hydra_dir = run_dir / ".hydra"
    # Before the process group starts: rank 0 of a torchrun / SLURM job copies, the others not.
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    if not (hydra_dir / "config.yaml").is_file() or rank != "0":
        return
    history = hydra_dir / "history"
    number = len([p for p in history.iterdir() if p.is_dir()]) if history.is_dir() else 0
    target = history / f"{number:02d}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        if (hydra_dir / name).is_file():
            write_text(target / name, (hydra_dir / name).read_text())


def failed_job(err: Exception, known: SegexpError | None) -> float:
    """A failed sweep job must not end the sweep (Hydra's basic launcher stops at the first
    exception): record it in metrics.json (run_training has already, unless the build failed)
    and score it -inf, worse than any metric (all maximised), which Optuna also accepts (NaN it
    does not)."""
    message = message_of(known) if known else f"{type(err).__name__}: {err}"
    log.error(f"segexp: error: {message}", exc_info=known is None)
    summary = Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
    if not summary.exists():
        summary.parent.mkdir(parents=True, exist_ok=True)
        write_json(summary, {"status": "failed", "error": message}, indent=2)
    return float("-inf")


def dist_backend_override(argv: list[str]) -> str:
    """``trainer.dist_backend=...`` from the command line: the group is joined before Hydra runs."""
    values = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("trainer.dist_backend=")]
    return values[-1] if values else "auto"


def cli() -> None:
    """The ``segexp-train`` command (and ``python train.py``): Hydra reads ``sys.argv``."""
    try:
        require_conf_dir()
    except SegexpError as err:
        print_error(str(err))
        sys.exit(1)
    distributed = None
    if started_as_one_of_several():
        from segexp.engine import distributed

        info = distributed.share_start_time(dist_backend_override(sys.argv[1:]))
        if info.rank > 0:  # rank 0 writes .hydra/ and the log; the others only report problems
            sys.argv += ["hydra.output_subdir=null", "hydra.job_logging.root.level=WARNING"]
    try:
        main()
    finally:
        if distributed is not None:
            distributed.cleanup()


if __name__ == "__main__":
    cli()
