"""Which devices a rank computes on when ``torchrun`` starts several ranks on one machine.

Why: ``torchrun`` starts one process per GPU and every process gets the same command line, so a bare
``--device cuda`` would put every rank on GPU 0. So ``cuda`` means the rank's own GPU,
``cuda:LOCAL_RANK``, and that GPU is made current (NCCL's collectives run there). Device maps are
restricted to the rank's slice of the GPUs where they are resolved, in ``models.placement`` (which
reads torchrun's environment itself: the models layer imports nothing above the engine). Alone on its
machine, or without GPUs, a rank keeps what it was given. ``choose_device`` is a pure function of
(local rank, ranks on the machine, visible GPUs), tested with made-up counts.
"""

from __future__ import annotations

import os

import torch

from actlab.dist.env import Rank
from actlab.errors import ActlabError

__all__ = ["choose_device", "rank_device", "local_world_size"]


def local_world_size(rank: Rank) -> int:
    """Ranks on this machine: torchrun's ``LOCAL_WORLD_SIZE`` (else all the ranks, the cautious guess)."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    try:
        return int(value) if value else rank.world_size
    except ValueError:
        raise ActlabError(f"LOCAL_WORLD_SIZE={value!r} is not an integer (set by torchrun)") from None


def choose_device(device: str, local_rank: int, local_world: int, n_gpus: int) -> str:
    """``device`` for one of ``local_world`` ranks on a machine showing ``n_gpus`` GPUs: a bare ``cuda`` is
    the rank's own GPU (``cuda:LOCAL_RANK``; ``cuda:0`` when each rank sees one GPU); anything else is kept."""
    if device != "cuda" or local_world <= 1 or n_gpus == 0:
        return device
    if n_gpus == 1:
        return "cuda:0"
    if local_rank >= n_gpus:
        raise ActlabError(f"LOCAL_RANK={local_rank} has no GPU of its own: this machine shows {n_gpus} GPUs for "
                          f"{local_world} ranks; start at most {n_gpus} ranks per machine (--nproc-per-node {n_gpus})")
    return f"cuda:{local_rank}"


def rank_device(device: str, rank: Rank) -> str:
    """``choose_device`` for this process. The chosen GPU is made current, and with several ranks the rank's
    own GPU is also when it computes on the CPU or a map: NCCL moves tensors on the current GPU, and two
    ranks on one GPU is an NCCL error."""
    if not torch.cuda.is_available():
        return device
    current = device
    if rank.world_size > 1:
        local_world, n_gpus = local_world_size(rank), torch.cuda.device_count()
        device = choose_device(device, rank.local_rank, local_world, n_gpus)
        try:
            current = device if device.startswith("cuda:") else choose_device("cuda", rank.local_rank, local_world,
                                                                                n_gpus)
        except ActlabError:  # more ranks than GPUs, computing elsewhere: leave the current GPU alone
            pass
    if current.startswith("cuda:"):
        torch.cuda.set_device(torch.device(current))
    return device


