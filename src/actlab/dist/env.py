"""Who am I in a ``torch.distributed`` job: rank and world size from ``torchrun``'s environment.

Why a module of its own: every distributed verb (record, stats, SAE training) needs the same three
answers — am I one of several processes, which one, and is the process group up — and must behave
exactly as the single-process code when it is not. Nothing here starts processes: ``torchrun`` (or
``torch.multiprocessing`` in tests) does that; this module only reads what it set and joins the group.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from actlab.errors import ActlabError

__all__ = ["Rank", "current", "init", "is_distributed", "barrier", "torchrun_env"]


@dataclass(frozen=True)
class Rank:
    """This process's place in the job (rank 0 of 1 outside a distributed run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    def share(self, n: int) -> range:
        """Indices ``0..n-1`` this rank owns: a strided share (rank, rank + world, ...), disjoint across ranks."""
        return range(self.rank, n, self.world_size)


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ActlabError(f"environment variable {name}={value!r} is not an integer (set by torchrun; unset it to run alone)") from None


def torchrun_env() -> Rank:
    """The rank the environment describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), checked."""
    world = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local = _int_env("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ActlabError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world} (need 0 <= RANK < WORLD_SIZE)")
    return Rank(rank, world, local)


def is_distributed() -> bool:
    """True when a process group with more than one member is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current() -> Rank:
    """This process's rank: from the live process group if there is one, else rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return Rank(rank, dist.get_world_size(), _int_env("LOCAL_RANK", rank))
    return Rank()


def default_backend() -> str:
    """NCCL when this process has a GPU to use, gloo otherwise (CPU tensors only)."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


@contextlib.contextmanager
def init(backend: str | None = None) -> Iterator[Rank]:
    """Join the process group ``torchrun`` describes for the duration of the block, then leave it.

    Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) this is a no-op that yields rank 0 of 1, so a
    command written for several processes runs unchanged in one. A group already up (started by the
    caller) is used as it is and left up.
    """
    if dist.is_available() and dist.is_initialized():
        yield current()
        return
    env = torchrun_env()
    if env.world_size == 1:
        yield env
        return
    if not dist.is_available():
        raise ActlabError("this torch build has no torch.distributed: run with one process (unset WORLD_SIZE)")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ActlabError(f"WORLD_SIZE={env.world_size} but {', '.join(missing)} is not set: start the job with torchrun")
    dist.init_process_group(backend or default_backend(), rank=env.rank, world_size=env.world_size)
    try:
        yield env
    except BaseException:
        dist.destroy_process_group()
        raise
    # leave together: a rank that tears gloo down while another still talks to it (rank 0 writing the
    # output) could abort at exit ("terminate called without an active exception", 1 run in 3)
    dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()
