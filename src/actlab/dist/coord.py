"""Coordinating the ranks of one job on the CPU: broadcast, gather and barriers that fail instead of hang.

Why a gloo group of its own: the verbs only exchange a few small Python objects (a plan hash, a list of
shard numbers), whatever backend the job's main group uses, and a barrier on NCCL waits until its
watchdog fires when a peer dies. On gloo a peer that exits closes its sockets, so the survivors' next
collective raises at once (tested), and a peer that hangs is an error after ``timeout``. Either way
the survivors get a ``PeerLost`` that says what happened and how to go on. Alone (world size 1) every
call returns immediately and nothing is created.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from actlab.dist.env import Rank, is_distributed
from actlab.errors import ActlabError

__all__ = ["Coordinator", "PeerLost", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = timedelta(minutes=30)  # how long a barrier waits for a rank that neither finishes nor exits


class PeerLost(ActlabError):
    """Another rank of the job stopped (it exited, was killed, or did not answer within the timeout)."""


def timeout_from_env() -> timedelta:
    """``ACTLAB_DIST_TIMEOUT`` (seconds) when set, else ``DEFAULT_TIMEOUT``."""
    value = os.environ.get("ACTLAB_DIST_TIMEOUT")
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise ActlabError(f"ACTLAB_DIST_TIMEOUT={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ActlabError(f"ACTLAB_DIST_TIMEOUT must be a positive number of seconds, not {value}")
    return timedelta(seconds=seconds)


class Coordinator:
    """Small collectives among the ranks of the live process group (a context manager)."""

    def __init__(self, rank: Rank, timeout: timedelta | None = None):
        self.rank = rank
        self.timeout = timeout or timeout_from_env()
        self.group = None
        if rank.world_size > 1:
            if not is_distributed():
                raise ActlabError(f"rank {rank.rank} of {rank.world_size} but no process group is up: "
                                  "run inside actlab.dist.init() (torchrun sets the environment)")
            self.group = dist.new_group(backend="gloo", timeout=self.timeout)

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc) -> None:
        if self.group is not None:
            try:
                dist.destroy_process_group(self.group)
            except Exception:  # noqa: BLE001 - a group broken by a lost peer may refuse to be destroyed
                pass
            self.group = None

    def _lost(self, what: str, error: Exception) -> PeerLost:
        why = " ".join(str(error).split())[:200]
        return PeerLost(f"rank {self.rank.rank} of {self.rank.world_size}: another rank stopped while {what} "
                        f"(it exited, was killed, or did not answer within {self.timeout}; {why})")

    def broadcast(self, obj, what: str, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank."""
        if self.group is None:
            return obj
        box = [obj if self.rank.rank == src else None]
        try:
            dist.broadcast_object_list(box, src=src, group=self.group)
        except RuntimeError as e:
            raise self._lost(what, e) from None
        return box[0]

    def gather(self, obj, what: str) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.group is None:
            return [obj]
        out: list = [None] * self.rank.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as e:
            raise self._lost(what, e) from None
        return out

    def barrier(self, what: str) -> None:
        if self.group is None:
            return
        try:
            dist.barrier(group=self.group)
        except RuntimeError as e:
            raise self._lost(what, e) from None
