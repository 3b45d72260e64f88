"""Scaling out through the launchers people already use, not our own cluster code.

``torchrun --nproc_per_node N -m polar search …`` (or any launcher that sets ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK``, e.g. SLURM through torchrun) starts N copies; each takes the
questions ``k`` with ``k % WORLD_SIZE == RANK`` on the GPU named by ``LOCAL_RANK`` and writes its
own shard file. Ranks never exchange tensors: the only collective is one barrier at the end (over
gloo, so it works on CPU-only hosts and never touches the GPUs) after which rank 0 merges the
shards. Without a rendezvous address (plain ``--shard i/n`` runs, or a launcher that sets only
the rank variables) the last shard to finish merges instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def launch_from_env(env: dict[str, str] | None = None) -> Launch:
    """Rank layout from the launcher's environment (single process when unset)."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Launch()
    return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))


def can_rendezvous(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return launch_from_env(env).is_distributed and "MASTER_ADDR" in env and "MASTER_PORT" in env


def join_group() -> bool:
    """Join the launcher's process group (gloo) if there is one to join; True when joined.

    The timeout is long (``POLAR_DIST_TIMEOUT_HOURS``, default 24) because ranks reach the final
    barrier as far apart in time as their shards are in length.
    """
    import torch.distributed as dist

    if not can_rendezvous() or not dist.is_available():
        return False
    if not dist.is_initialized():
        hours = float(os.environ.get("POLAR_DIST_TIMEOUT_HOURS", "24"))
        dist.init_process_group("gloo", timeout=timedelta(hours=hours))
    return True


def wait_for_all_ranks() -> None:
    """Barrier across ranks (no-op outside a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def parse_shard(text: str | None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); without it, RANK/WORLD_SIZE (set by torchrun) or (0, 1)."""
    env = os.environ if env is None else env
    if text is None:
        launch = launch_from_env(env)
        return launch.rank, launch.world_size
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like 2/8 (shard 2 of 8), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def default_device(device: str | None) -> str | None:
    """Under torchrun each rank takes the GPU named by LOCAL_RANK."""
    if device is not None:
        return device
    local = os.environ.get("LOCAL_RANK")
    if local is not None:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(local)}"
    return None
