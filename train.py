"""Train a segmentation model from a composed config.

    python train.py                                   # FCN / ResNet-18 on the synthetic dataset
    python train.py model=upernet backbone=convnext_tiny dataset=stanford_background
    python train.py -m model=fcn,unet,pspnet,deeplabv3,upernet trainer=debug
    python train.py --help                            # config groups and options
    torchrun --nproc_per_node=4 train.py ...          # distributed data parallel, one folder
"""

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from segexp.engine import distributed
from segexp.engine.experiment import run_training
from segexp.errors import SegexpError

log = logging.getLogger("train")


def explained_error(err: BaseException) -> SegexpError | None:
    """The SegexpError behind an exception (Hydra wraps errors raised while instantiating)."""
    while err is not None:
        if isinstance(err, SegexpError):
            return err
        err = err.__cause__ or err.__context__
    return None


def message_of(err: SegexpError) -> str:
    """The explanation alone: an error re-raised from a DataLoader worker carries the worker's
    traceback in its text, whose last line is the original message."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(("segexp.", type(err).__name__)) else last
    return text


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run_training(cfg)
    except Exception as err:
        known = explained_error(err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return failed_job(err, known)
        if known is None:
            raise
        print(f"segexp: error: {message_of(known)}", file=sys.stderr)
        sys.exit(1)


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
        summary.write_text(json.dumps({"status": "failed", "error": message}, indent=2))
    return float("-inf")


def dist_backend_override(argv: list[str]) -> str:
    """``trainer.dist_backend=...`` from the command line: the group is joined before Hydra runs."""
    values = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("trainer.dist_backend=")]
    return values[-1] if values else "auto"


if __name__ == "__main__":
    info = distributed.share_start_time(dist_backend_override(sys.argv[1:]))
    if info.rank > 0:  # rank 0 writes .hydra/ and the log; the others only report problems
        sys.argv += ["hydra.output_subdir=null", "hydra.job_logging.root.level=WARNING"]
    try:
        main()
    finally:
        distributed.cleanup()
