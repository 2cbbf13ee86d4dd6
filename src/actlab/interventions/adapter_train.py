"""Training low-rank residual adapters (ReFT-style) by backpropagation through a frozen model.

``train_adapter`` learns a :class:`LowRankAdapter` at one site, ``h <- h + Rᵀ (W h + b − R h)``
(the LoReFT form, Wu et al. 2024), with the language-modelling loss of the model's next-token
predictions (``actlab.engine.likelihood.token_nll``):

* ``data`` as a list of texts: cross-entropy on every token (but the first, which nothing predicts);
* ``data`` as ``(prompt, completion)`` pairs: cross-entropy on the completion tokens only. Prompts
  are left-padded and completions right-padded, so every prompt ends at the same column, exactly
  as ``Model.generate`` lays a batch out. During training the engine is told where the prompt ends,
  so an adapter with ``positions="generated"`` (or ``"prompt"``) acts during training on the same
  tokens it will act on at generation time. With ``positions="all"`` (the default) the adapter acts
  on prompt and completion tokens alike, as it will on prompt and generated tokens.

Parameters and their initialisation: ``R`` [rank, width] gets orthonormal rows (QR of a seeded
Gaussian matrix), ``W = R`` and ``b = 0``, so the initial change is exactly zero and the model starts
from its own behaviour. Internally ``W`` is trained as ``R + ΔW`` with AdamW's decoupled weight
decay on ``ΔW`` and ``b`` only, which pulls the adapter toward "no change" rather than toward
``W = 0`` (which would erase the subspace). ``R`` is kept orthonormal by re-projecting it after
every optimiser step (QR of ``Rᵀ`` with the signs fixed so the projection is the nearest
orthonormal frame and moves continuously); this keeps ``Rᵀ R`` a projection, as LoReFT requires,
without a parametrisation module.

The model's weights are frozen during training (their ``requires_grad`` flags are restored
afterwards) and only the adapter's tensors reach the optimiser. A fraction of the examples is held
out; the held-out loss is evaluated every ``eval_every`` steps, training stops after ``patience``
evaluations without improvement, and the best adapter is returned. The options are one
:class:`AdapterConfig`, saved as ``params["config"]``.
"""

from __future__ import annotations

import math
import random
import time

import torch

from actlab.engine.edits import POSITION_MODES
from actlab.engine.grad import frozen_weights
from actlab.engine.likelihood import Example, encode_lm_data, mean_nll, token_nll
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.interventions.adapter_config import AdapterConfig
from actlab.interventions.types import LowRankAdapter

__all__ = ["AdapterConfig", "encode_lm_data", "init_adapter", "orthonormal_rows", "train_adapter"]


def _signed_q(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """QR's Q with column signs fixed by R's diagonal, so the frame is unique and moves continuously."""
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs


def orthonormal_rows(rank: int, width: int, seed: int = 0) -> torch.Tensor:
    """[rank, width] with orthonormal rows: QR of a seeded Gaussian matrix."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(width, rank, generator=gen))
    return _signed_q(q, r).T.contiguous()


def init_adapter(model, site: str, rank: int = 4, *, seed: int = 0, positions: str = "all") -> LowRankAdapter:
    """An untrained adapter: orthonormal R, W = R, b = 0, so its change is exactly zero."""
    names = model.resolve(site)
    if len(names) != 1:
        raise ActlabError(f"an adapter edits one site; {site!r} selects {len(names)} ({', '.join(names[:4])}...)")
    site = names[0]
    width = model.sites[site]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= width:
        raise ActlabError(f"rank must be an integer from 1 to the width of '{site}' ({width}), not {rank!r}")
    if positions not in POSITION_MODES:
        raise ActlabError(f"positions must be one of {POSITION_MODES}, not {positions!r}")
    R = orthonormal_rows(rank, width, seed)
    return LowRankAdapter(site=site, R=R, W=R.clone(), b=torch.zeros(rank), positions=positions,
                          model=model.identity(), params={"rank": rank})


def principal_basis(model, site: str, examples: list[Example], m: int) -> torch.Tensor:
    """[m, width]: the top-``m`` principal directions (orthonormal rows) of ``site`` over the examples' tokens.

    Why: a random-start adapter writes into low-variance directions of the stream, which another model's
    stream does not follow (Command-V pastes it poorly, docs/transfer.md); confining ``R`` to the directions
    the data varies along keeps the edit where the two models correspond. The first token of each example
    is left out: its activations are often far larger than the rest (massive activations) and would take
    the top directions."""
    batch = model.collect([list(p) + list(t) for p, t in examples], site, positions="all")
    rows = batch.acts[site][batch.positions > 0].double()
    if rows.shape[0] < 2:
        raise ActlabError(f"subspace={m} needs at least 2 tokens after the first in the training data")
    _, _, vh = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)
    if vh.shape[0] < m:
        raise ActlabError(f"subspace={m} asks for more principal directions than the {vh.shape[0]} the data has; "
                          "lower subspace or add data")
    return vh[:m].float().contiguous()


class _Trainable:
    """The adapter's leaves on the model's device: ``R`` (kept orthonormal), ``ΔW`` (W = R + ΔW) and ``b``.
    With a ``basis`` P ([m, width], orthonormal rows) ``R = R_m P`` and only ``R_m`` [rank, m] is trained."""

    def __init__(self, adapter: LowRankAdapter, device, config: AdapterConfig, basis: torch.Tensor | None = None):
        self.adapter = adapter
        self.P = None if basis is None else basis.to(device)
        R0 = adapter.R if basis is None else orthonormal_rows(adapter.rank, basis.shape[0], config.seed)
        self.R_free = R0.to(device).requires_grad_(True)
        self.dW = torch.zeros(adapter.R.shape, device=device, requires_grad=True)
        self.b = torch.zeros(adapter.rank, device=device, requires_grad=True)
        self.opt = torch.optim.AdamW([{"params": [self.R_free], "weight_decay": 0.0},
                                      {"params": [self.dW, self.b], "weight_decay": config.weight_decay}],
                                     lr=config.lr)

    @property
    def R(self) -> torch.Tensor:
        return self.R_free if self.P is None else self.R_free @ self.P

    def sync(self) -> None:
        R = self.R
        self.adapter.R, self.adapter.W, self.adapter.b = R, R + self.dW, self.b

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        return self.R.detach().clone(), self.dW.detach().clone(), self.b.detach().clone()

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():  # back to the orthonormal frame nearest-by-QR to R's rows
            q, r = torch.linalg.qr(self.R_free.T)
            self.R_free.copy_(_signed_q(q, r).T)


def _split(examples: list[Example], config: AdapterConfig, rng: random.Random) -> tuple[list[Example], list[Example]]:
    """(train, held-out) in a seeded random order; at least one example is trained on."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    n_val = int(round(len(examples) * config.val_fraction)) if len(examples) >= 2 else 0
    n_val = min(n_val, len(examples) - 1)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


class _Loop:
    """The optimisation: minibatches in reshuffled epochs, held-out evaluations, the best adapter kept."""

    def __init__(self, model, leaves: _Trainable, config: AdapterConfig, prompt_known: bool, rng: random.Random):
        self.model, self.leaves, self.config, self.prompt_known, self.rng = model, leaves, config, prompt_known, rng
        self.step = self.best_step = 0
        self.train_loss = math.nan
        self.best_val: float | None = math.inf
        self.best = leaves.snapshot()

    def held_out(self, val: list[Example]) -> float:
        return mean_nll(self.model, val, batch_size=self.config.batch_size, prompt_length_known=self.prompt_known)

    def batch_loss(self, batch: list[Example]) -> torch.Tensor:
        with torch.enable_grad():
            self.leaves.sync()
            total, n_tok = token_nll(self.model, batch, batch_size=len(batch), prompt_length_known=self.prompt_known,
                                     grad=True)
            loss = total / max(1, n_tok)
        if not torch.isfinite(loss):
            raise ActlabError(f"the adapter's training loss became {float(loss)} at step {self.step}; "
                              "check the data for NaN/inf or lower lr")
        return loss

    def evaluate(self, val: list[Example], bar) -> bool:
        """One held-out evaluation; True when training should stop (patience used up)."""
        with torch.no_grad():
            self.leaves.sync()
        v = self.held_out(val)
        if not math.isfinite(v):
            raise ActlabError(f"the adapter's held-out loss became {v} at step {self.step}; lower lr")
        bar.update(description=f"training adapter (held-out loss {v:.3f})")
        if v < self.best_val - 1e-6:
            self.best_val, self.best_step, self.bad = v, self.step, 0
            self.best = self.leaves.snapshot()
            return False
        self.bad += 1
        return bool(self.config.patience and self.bad >= self.config.patience)

    def run(self, train: list[Example], val: list[Example], progress: bool) -> None:
        cfg = self.config
        self.bad = 0
        cursor = len(train)
        with progress_bar("training adapter", cfg.steps, unit="step", enabled=progress) as bar:
            for self.step in range(1, cfg.steps + 1):
                if cursor + cfg.batch_size > len(train):
                    self.rng.shuffle(train)
                    cursor = 0
                batch = train[cursor : cursor + cfg.batch_size]
                cursor += cfg.batch_size
                loss = self.batch_loss(batch)
                self.leaves.step(loss)
                self.train_loss = float(loss.detach())
                bar.advance(1)
                if val and (self.step % cfg.eval_interval == 0 or self.step == cfg.steps) and self.evaluate(val, bar):
                    break


def train_adapter(model, data, site: str, config: AdapterConfig | None = None, *, progress: bool = False,
                  basis: torch.Tensor | None = None, **overrides) -> LowRankAdapter:
    """Train a rank-``rank`` LoReFT adapter at ``site`` on texts or (prompt, completion) pairs.

    Options: ``config`` and/or keywords of :class:`AdapterConfig` (``rank``, ``steps``, ``lr``,
    ``batch_size``, ...). Returns the adapter with the lowest held-out loss; ``params`` records
    ``rank``, ``steps_run``, ``best_step``, ``val_loss`` (best), ``val_loss_before`` (the model
    without adapter), ``train_seconds``, ``n_examples`` (and the train / held-out split), ``data``
    ("texts" or "pairs"), the optimiser settings and the whole ``config``. ``basis`` ([m, width], orthonormal
    rows) keeps ``R`` inside the given directions instead (e.g. ``transfer.paste.shared_basis``).
    """
    if not model.has_lm_head:
        raise ActlabError(f"{model.sitemap.model_class} has no language-model head: adapters are trained with "
                          "the next-token loss, so load a causal LM")
    config = AdapterConfig.with_overrides(config, overrides)
    adapter = init_adapter(model, site, config.rank, seed=config.seed, positions=config.positions)
    kind, examples = encode_lm_data(model, data, max_tokens=config.max_tokens)
    if kind == "texts" and config.positions != "all":
        raise ActlabError(f"positions={config.positions!r} needs (prompt, completion) pairs: plain texts have no "
                          "prompt part; use positions='all'")
    rng = random.Random(config.seed)
    train, val = _split(examples, config, rng)
    if config.subspace > adapter.width:
        raise ActlabError(f"subspace ({config.subspace}) cannot exceed the width of '{adapter.site}' ({adapter.width})")
    if basis is not None:
        basis = torch.as_tensor(basis, dtype=torch.float32)
        if basis.ndim != 2 or basis.shape[1] != adapter.width or not adapter.rank <= basis.shape[0]:
            raise ActlabError(f"basis must be [m, {adapter.width}] with m >= the rank ({adapter.rank}), not "
                              f"{list(basis.shape)}")
    elif config.subspace:
        basis = principal_basis(model, adapter.site, train, config.subspace)
    leaves = _Trainable(adapter, model.device, config, basis)
    loop = _Loop(model, leaves, config, kind == "pairs", rng)
    start = time.perf_counter()
    with frozen_weights(model):
        # the held-out loss before training is that of the model itself (the adapter starts at zero change)
        val_before = loop.held_out(val) if val else None
        if val_before is not None and not math.isfinite(val_before):
            raise ActlabError(f"the model's loss on the held-out data is {val_before}; check the data and the model "
                              "for NaN/inf")
        loop.best_val = val_before if val_before is not None else math.inf
        with model.edit(adapter):
            loop.run(train, val, progress)
    if not val:
        loop.best, loop.best_step, loop.best_val = leaves.snapshot(), loop.step, None
    R_best, dW_best, b_best = (t.detach().float().cpu() for t in loop.best)
    params = {
        "method": "reft", "rank": adapter.rank, "steps": config.steps, "steps_run": loop.step,
        "best_step": loop.best_step, "val_loss": loop.best_val, "val_loss_before": val_before,
        "train_loss_last": loop.train_loss, "train_seconds": time.perf_counter() - start,
        "n_examples": len(examples), "n_train": len(train), "n_val": len(val), "data": kind, "lr": config.lr,
        "batch_size": config.batch_size, "weight_decay": config.weight_decay, "seed": config.seed,
        "orthonormal": "qr-reprojection", "config": config.to_dict(),
    }
    return LowRankAdapter(site=adapter.site, R=R_best.clone(), W=(R_best + dW_best).clone(), b=b_best.clone(),
                          positions=config.positions, model=model.identity(), params=params)
