"""Feeding SAE training: from a recorded store, or streamed from the model, several SAEs per pass.

``ModelStream`` runs the model over texts a *chunk* at a time (documents in a seeded order until
``chunk_tokens`` tokens), shuffles the chunk's tokens and hands out batches. The batch of step s is a
function of (texts, seed, s) alone, so a resumed run recomputes only the chunk it stopped in and
replays the same batches bit for bit; memory is one chunk, whatever the token count. Every site the
SAEs need is read in the same forward pass, so ``train_many`` trains SAEs on several sites, widths or
k from one stream.

``store_feed`` gives the store's shuffled reader (``Store.batches``) in the trainer's terms.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Sequence

import torch

from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.sae.train import SAETrainConfig, SAETrainer, SAETrainResult, describe

__all__ = ["ModelStream", "store_feed", "train_many"]


class ModelStream:
    """Batches of ``sites`` streamed from ``model`` over ``texts``: ``stream(step)`` → ``{site: [B, width]}``.

    ``stream.site(name)`` and ``stream.pair(inputs, targets)`` are the per-SAE views the trainer takes.
    Epochs restart the texts in a new seeded order; a chunk's tokens beyond a whole number of batches
    are skipped."""

    def __init__(self, model, texts: Sequence[str], sites: Sequence[str], *, batch_size: int = 4096,
                 chunk_tokens: int = 1 << 17, seed: int = 0, docs_per_forward: int = 8,
                 max_length: int | None = None, progress: bool = False):
        self.texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not self.texts:
            raise ActlabError("the stream needs at least one non-empty text")
        self.model, self.sites = model, model.resolve(list(sites))
        self.batch_size, self.seed, self.docs_per_forward = int(batch_size), int(seed), int(docs_per_forward)
        if chunk_tokens < batch_size:
            raise ActlabError(f"chunk_tokens ({chunk_tokens}) must be at least batch_size ({batch_size})")
        self.chunk_tokens, self.max_length, self.progress = int(chunk_tokens), max_length, progress
        ids = model.tokenizer(self.texts, add_special_tokens=True)["input_ids"]
        self.lengths = [len(x) for x in ids]
        self.tokens = sum(self.lengths)
        if self.tokens < batch_size:
            raise ActlabError(f"the texts hold {self.tokens} tokens, fewer than one batch ({batch_size}); give more "
                              "text or a smaller batch")
        self._epochs: dict[int, tuple[list[list[int]], list[int]]] = {}
        self._cache: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None

    @property
    def widths(self) -> dict[str, int]:
        return {s: self.model.sites[s] for s in self.sites}

    def _plan(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """The epoch's chunks (document indices) and the cumulative batch count at the end of each."""
        if epoch not in self._epochs:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.texts), generator=gen).tolist()
            chunks, current, count = [], [], 0
            for doc in order:
                current.append(doc)
                count += self.lengths[doc]
                if count >= self.chunk_tokens:
                    chunks.append(current)
                    current, count = [], 0
            if count >= self.batch_size:
                chunks.append(current)
            ends, total = [], 0
            for chunk in chunks:
                total += sum(self.lengths[d] for d in chunk) // self.batch_size
                ends.append(total)
            self._epochs = {epoch: (chunks, ends)}  # one epoch's plan is enough
        return self._epochs[epoch]

    @property
    def batches_per_epoch(self) -> int:
        return self._plan(0)[1][-1]

    def _chunk(self, epoch: int, index: int, docs: list[int]) -> dict[str, torch.Tensor]:
        if self._cache is not None and self._cache[0] == (epoch, index):
            return self._cache[1]
        texts = [self.texts[d] for d in docs]
        acts = self.model.collect(texts, self.sites, positions="all", batch_size=self.docs_per_forward,
                                  max_length=self.max_length, progress=self.progress,
                                  description=f"recording chunk {index}").acts
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 65_537 + index)
        n = next(iter(acts.values())).shape[0]
        perm = torch.randperm(n, generator=gen)
        shuffled = {site: acts[site][perm].float() for site in self.sites}
        self._cache = ((epoch, index), shuffled)
        return shuffled

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        per_epoch = self.batches_per_epoch
        if per_epoch < 1:
            raise ActlabError("the texts make no whole batch per chunk; lower batch_size or raise chunk_tokens")
        epoch, within = divmod(int(step), per_epoch)
        chunks, ends = self._plan(epoch)
        index = bisect_right(ends, within)
        first = ends[index - 1] if index else 0
        acts = self._chunk(epoch, index, chunks[index])
        j = (within - first) * self.batch_size
        n = next(iter(acts.values())).shape[0]
        if j + self.batch_size <= n:
            return {site: t[j:j + self.batch_size] for site, t in acts.items()}
        rows = torch.arange(j, j + self.batch_size) % n  # the chunk ran short of its planned tokens: wrap
        return {site: t[rows] for site, t in acts.items()}

    def site(self, name: str):
        """The trainer's batches for an SAE on ``name``: a function step -> tensor."""
        self._check(name)
        return lambda step: self(step)[name]

    def pair(self, inputs: str, targets: str):
        """The trainer's batches for a transcoder from ``inputs`` to ``targets``: step -> (x, y)."""
        self._check(inputs)
        self._check(targets)

        def get(step: int):
            batch = self(step)
            return batch[inputs], batch[targets]

        return get

    def _check(self, name: str) -> None:
        if name not in self.sites:
            raise ActlabError(f"the stream records {self.sites}, not '{name}'; add it to the stream's sites")

    def epochs_for(self, steps: int) -> float:
        return steps / max(self.batches_per_epoch, 1)


def store_feed(store, site: str | tuple[str, str], batch_size: int, steps: int, *, seed: int = 0):
    """The store's shuffled minibatches for ``steps`` steps (as many epochs as that takes, whole batches
    only): a re-iterable the trainer can resume. ``site`` is a pair (inputs, targets) for a transcoder."""
    keys = list(site) if isinstance(site, tuple) else site
    epochs = max(1, math.ceil(steps / max(store.n_tokens // batch_size, 1)))
    if store.n_tokens < batch_size:
        raise ActlabError(f"the store holds {store.n_tokens} tokens, fewer than one batch ({batch_size})")
    reader = store.batches(keys, batch_size, seed=seed, epochs=epochs, drop_last=True, dtype=torch.float32)
    return reader if isinstance(keys, str) else _Pairs(reader, keys)


class _Pairs:
    """A re-iterable of (inputs, targets) from a reader of two keys."""

    def __init__(self, reader, keys: list[str]):
        self.reader, self.keys = reader, keys

    def __iter__(self):
        for batch in self.reader:
            yield batch[self.keys[0]], batch[self.keys[1]]


def train_many(stream: ModelStream, jobs: dict[str, tuple[str | tuple[str, str], SAETrainConfig]], *,
               checkpoint_root=None, progress: bool = False) -> dict[str, SAETrainResult]:
    """Train several SAEs from one stream, one forward pass per chunk for all: ``jobs`` maps a name to
    ``(site, config)`` (``site`` a pair (inputs, targets) for a transcoder). Every config must use the
    stream's batch size; checkpoints go to ``checkpoint_root/name``."""
    from pathlib import Path

    trainers = {}
    for name, (site, config) in jobs.items():
        if config.batch_size != stream.batch_size:
            raise ActlabError(f"SAE '{name}' has batch_size {config.batch_size}, the stream {stream.batch_size}; "
                              "SAEs trained from one stream share its batch size")
        feed = stream.pair(*site) if isinstance(site, tuple) else stream.site(site)
        d_in = stream.widths[site[0] if isinstance(site, tuple) else site]
        d_out = stream.widths[site[1]] if isinstance(site, tuple) else None
        directory = Path(checkpoint_root) / name if checkpoint_root is not None else None
        trainers[name] = SAETrainer(feed, d_in, config, d_out=d_out, checkpoint_dir=directory)
    total = sum(t.config.steps for t in trainers.values())
    with progress_bar("SAEs", total, unit="step", enabled=progress) as bar:
        bar.advance(sum(t.run.step for t in trainers.values()))
        while not all(t.done for t in trainers.values()):
            step = min(t.run.step for t in trainers.values() if not t.done)
            for name, trainer in trainers.items():  # lockstep: every SAE uses the chunk in memory
                if not trainer.done and trainer.run.step == step:
                    stats = trainer.step()
                    if stats is not None:
                        bar.update(description=f"{name} " + describe(stats))
                    bar.advance(1)
    return {name: t.result() for name, t in trainers.items()}
