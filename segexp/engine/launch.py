"""How a run was started, as its entry point tells the engine.

The engine never reads Hydra's runtime: ``train.py`` (:func:`segexp.cli.train.hydra_launch`)
turns it into a :class:`Launch`, and a notebook or another launcher passes its own, or none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Launch:
    # The option picked in each config group (model, head, backbone, dataset, loss...): for run
    # tags and for messages that name what the user chose (`loss=ce`). Empty: a config built in
    # code, named by its `_target_`s instead.
    choices: Mapping[str, str] = field(default_factory=dict)
    # The command line's overrides: a resume that names nothing but itself (and trainer.* values)
    # runs with the config recorded in its checkpoint (experiment.config_for_resume). None: no
    # command line (a config built in code), which is used as given.
    overrides: tuple[str, ...] | None = None
    # One job of a sweep (multirun): its group (the W&B group) and number.
    sweep_group: str | None = None
    job_num: int | None = None

    def choice(self, group: str) -> str | None:
        return self.choices.get(group) or None


def cluster_tasks() -> int:
    """The tasks of a SLURM job or of the submitit launcher (1 outside one)."""
    return max(int(os.environ.get("SLURM_NTASKS", "1")),
               int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")))


def started_as_one_of_several() -> bool:
    """Whether torchrun, SLURM or submitit started this process as one rank of several: read
    from the environment alone, so the command line answers ``--help`` and config errors
    without loading torch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or cluster_tasks() > 1
