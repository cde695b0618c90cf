"""Rank and world size of the current process, read without importing a framework.

Every rank traces its own shard and writes its own files, so nothing here communicates: the only
question is which shard this process is.
"""

from __future__ import annotations

import os
import sys


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world_size) from an initialised torch.distributed group, else RANK/WORLD_SIZE, else (0, 1)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        dist = getattr(torch, "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ.get(size_var, "1"))
    return 0, 1
