"""Data-parallel SAE training: the few places where one step's arithmetic spans the whole batch.

The trainer calls a *sync* object at those places (``train._step``, ``_initialise``, ``SAETrainer``).
``LocalSync`` is one process and is the old arithmetic itself; ``RankSync`` makes W ranks, each holding
``batch_size / W`` rows of every step, compute the step of the whole batch:

- the loss is a sum over rows divided by batch-wide quantities (the FVU's and AuxK's total variance, the
  JumpReLU L0 penalty's row count), so each rank divides its rows' sum by the batch-wide quantity and
  the ranks' gradients **sum** to the whole batch's gradient (one all-reduce of every gradient);
- the dead-latent counters advance by the batch's rows and reset where a latent fired on any rank, so
  the dead set (and AuxK's choice of dead latents) is the same on every rank;
- BatchTopK's threshold takes the smallest kept activation over all ranks (its top ``k·B`` is per rank:
  BatchTopK alone is not the 2B step, see docs/sae.md);
- the initial input scale and decoder bias come from the data of every rank (unless every rank reads
  the same tensor, whose first rows already are the single-process sample);
- the weights, Adam moments and counters start from rank 0's (fresh or resumed) and only rank 0 writes
  checkpoints; every rank resumes from that one file.

Because every rank applies the same summed gradient to the same weights, the ranks stay identical; the
weights equal one process's on the whole batch up to float32 summation order (see the tests).
"""

from __future__ import annotations

import torch

from actlab.dist.env import current, is_distributed
from actlab.dist.merge import all_gather_fixed, all_max, all_min, all_sum, broadcast_
from actlab.errors import ActlabError

__all__ = ["LocalSync", "RankSync", "make_sync"]


class LocalSync:
    """One process: every hook is the identity (bit for bit the single-process trainer)."""

    is_main = True
    world_size = 1

    def local(self, batch):
        return batch

    def centred_sq(self, t: torch.Tensor) -> torch.Tensor:
        return (t - t.mean(0)).pow(2).sum()

    def row_share(self, n: int) -> float:
        return 1.0

    def gradients(self, sae) -> None:
        pass

    def rows(self, n: int) -> int:
        return n

    def fired(self, fired: torch.Tensor) -> torch.Tensor:
        return fired

    def kept(self, kept: torch.Tensor) -> torch.Tensor:
        return kept

    def best(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum over the ranks."""
        return t

    def logged(self, loss: torch.Tensor, fvu: torch.Tensor, active: torch.Tensor, n: int) -> dict:
        return {"loss": loss.item(), "fvu": fvu.item(), "l0": active.item() / n}

    def row_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t.mean(0)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def init_rows(self, n: int) -> int:
        return n

    def start(self, run) -> None:
        pass


class RankSync(LocalSync):
    """W ranks of one ``torch.distributed`` job, each with its share of every step's batch.

    ``slice_batches``: every rank's data yields the whole batch (a tensor source: the same seeded
    permutation everywhere), and rank r keeps rows ``[r·B/W, (r+1)·B/W)``; otherwise each rank's data
    yields its own rows already (a stream over the rank's documents). ``shared_init``: the data of the
    initialisation is the same on every rank (nothing to combine)."""

    def __init__(self, slice_batches: bool, shared_init: bool):
        rank = current()
        self.rank, self.world_size, self.is_main = rank.rank, rank.world_size, rank.is_main
        self.slice_batches, self.shared_init = slice_batches, shared_init

    def local(self, batch):
        if not self.slice_batches:
            return batch
        x, y = batch
        n = x.shape[0]
        if n % self.world_size:
            raise ActlabError(f"batch_size {n} does not split over {self.world_size} ranks: use a multiple of "
                              f"{self.world_size}")
        part = n // self.world_size
        rows = slice(self.rank * part, (self.rank + 1) * part)
        return (x[rows], x[rows]) if y is x else (x[rows], y[rows])

    @torch.no_grad()
    def centred_sq(self, t: torch.Tensor) -> torch.Tensor:
        mean = all_sum(t.sum(0)) / self.rows(t.shape[0])
        return all_sum((t - mean).pow(2).sum())

    def row_share(self, n: int) -> float:
        return n / self.rows(n)

    def gradients(self, sae) -> None:
        params = [p for p in sae.parameters()]
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int64)
        if not all(torch.equal(present, other) for other in all_gather_fixed(present)):
            raise ActlabError("the ranks' SAE steps touched different parameters; every rank must train the same "
                              "SAE configuration")
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = all_sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def rows(self, n: int) -> int:
        return int(all_sum(torch.tensor([n], dtype=torch.int64)))

    def fired(self, fired: torch.Tensor) -> torch.Tensor:
        return all_max(fired.to(torch.int64)) > 0

    def kept(self, kept: torch.Tensor) -> torch.Tensor:
        positive = kept[kept > 0]
        low = positive.min() if positive.numel() else torch.tensor(float("inf"), dtype=kept.dtype)
        low = all_min(low.reshape(1).to(kept.dtype))
        return low if bool(torch.isfinite(low).all()) else low[:0]

    def best(self, t: torch.Tensor) -> torch.Tensor:
        return all_max(t)

    def logged(self, loss, fvu, active, n: int) -> dict:
        total = all_sum(torch.stack([loss.detach().double(), fvu.detach().double(), active.double(),
                                     torch.tensor(float(n), dtype=torch.float64)]))
        return {"loss": float(total[0]), "fvu": float(total[1]), "l0": float(total[2] / total[3])}

    def row_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.shared_init:
            return t.mean(0)
        return all_sum(t.sum(0)) / self.rows(t.shape[0])

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.shared_init else all_sum(t)

    def init_rows(self, n: int) -> int:
        return n if self.shared_init else self.rows(n)

    def start(self, run) -> None:
        """Every rank continues from rank 0's state: the same step (else the checkpoint folder is not
        shared), then rank 0's weights, buffers, Adam moments and counters."""
        step = torch.tensor([run.step, run.adam.t], dtype=torch.int64)
        if not torch.equal(all_min(step), all_max(step)):
            raise ActlabError("the ranks resumed from different checkpoints (or only some found one): give every "
                              "rank the same checkpoint folder (a shared filesystem)")
        with torch.no_grad():
            for t in [*run.sae.state_dict().values(), *run.adam.m.values(), *run.adam.v.values(), run.since_fired]:
                broadcast_(t)


def make_sync(distributed: bool, data_mode: str) -> LocalSync:
    """The sync object of a trainer: ``RankSync`` when asked for and a process group of several is up."""
    if not distributed or not is_distributed():
        return LocalSync()
    return RankSync(slice_batches=data_mode == "tensor", shared_init=data_mode == "tensor")


# ------------------------------------------------------------------ each rank's data
class RankSlices:
    """A re-iterable of whole batches (a store's shuffled reader) seen as this rank's rows of each: rank r
    of W keeps rows ``[r·B/W, (r+1)·B/W)``, so the ranks together train on exactly the single-process batch."""

    def __init__(self, batches, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def _part(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n % self.world_size:
            raise ActlabError(f"batch_size {n} does not split over {self.world_size} ranks: use a multiple of "
                              f"{self.world_size}")
        part = n // self.world_size
        return x[self.rank * part:(self.rank + 1) * part]

    def __iter__(self):
        for batch in self.batches:
            yield tuple(self._part(t) for t in batch) if isinstance(batch, tuple) else self._part(batch)


def rank_texts(texts: list, batch_size: int) -> tuple[list, int]:
    """This rank's share of the texts (strided) and its rows per step, for a stream of its own."""
    rank = current()
    if rank.world_size == 1:
        return texts, batch_size
    if batch_size % rank.world_size:
        raise ActlabError(f"--batch-size {batch_size} does not split over {rank.world_size} ranks: use a multiple "
                          f"of {rank.world_size}")
    share = [texts[i] for i in rank.share(len(texts))]
    if not share:
        raise ActlabError(f"{len(texts)} texts cannot feed {rank.world_size} ranks: give more texts or fewer ranks")
    return share, batch_size // rank.world_size


def agreed_steps(steps: int) -> int:
    """The fewest steps any rank's data allows (every rank must take the same number of steps)."""
    return int(all_min(torch.tensor([steps], dtype=torch.int64)))
