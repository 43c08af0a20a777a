"""Which rank of a job this process is, from the launcher's environment, and how a rank leaves an error to rank 0.

Torch-free, so the command line knows it before torch loads: a Ctrl-C then is told once, by rank 0.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple


class JobRanks(NamedTuple):
    """This process's place in a job: its rank, the job's process count, and its rank on this node."""

    rank: int
    world_size: int
    local_rank: int


def job_ranks() -> JobRanks | None:
    """Where this process stands in the job a launcher (``torch.distributed.run``) started it in, from the variables
    the launcher sets; ``None`` for a process started on its own."""
    if "WORLD_SIZE" not in os.environ:
        return None
    return JobRanks(int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", "0")))


def is_secondary_rank() -> bool:
    """Whether this process is a rank other than 0 of a multi-process job (by the launcher's environment)."""
    ranks = job_ranks()
    return ranks is not None and ranks.world_size > 1 and ranks.rank > 0


def defer_to_rank0(grace_s: float = 5.0) -> None:
    """Before a worker other than rank 0 tells an error: wait ``grace_s`` for the launcher to stop it.

    An error that every rank meets alike (a setting, the data, the loss) is told by rank 0, whose exit makes the
    launcher stop the others meanwhile; an error of this rank alone is still told, after the wait.
    """
    time.sleep(grace_s)
