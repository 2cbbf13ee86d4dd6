"""Which device a rank computes on: ``cuda`` means this rank's own GPU (``cuda:LOCAL_RANK``).

Why: ``torchrun`` starts one process per GPU and every process gets the same command line; a bare
``--device cuda`` would put every rank on GPU 0, and NCCL moves tensors on the current device, so
the rank's GPU is also made current. Anything else (``cpu``, ``cuda:3``, a device map) is kept.
"""

from __future__ import annotations

import torch

from actlab.dist.env import Rank

__all__ = ["rank_device"]


def rank_device(device: str, rank: Rank) -> str:
    if rank.world_size > 1 and device == "cuda":
        device = f"cuda:{rank.local_rank}"
    if device.startswith("cuda:") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(device))
    return device
