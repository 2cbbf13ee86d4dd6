"""Train a sparse autoencoder on activations given as tensors, with checkpoints that resume bit-identically.

Reproducibility is by construction: the initial weights are a function of ``seed``, the data order
a function of ``(seed, step)``, and nothing else draws random numbers, so a checkpoint holding the
module, the Adam moments, the step and the dead-latent counters is the whole state of a run (that
is why it carries no RNG state: there is none beyond ``seed`` and ``step``). Resuming replays the
remaining steps exactly — on the same machine, torch version and thread count.

``batches`` may be:

- a tensor ``[N, d_in]``: shuffled once per epoch by ``(seed, epoch)``, ``N // batch_size`` batches
  an epoch (the remainder of each epoch is skipped); resumable;
- a callable ``step -> [B, d_in] tensor``: the caller owns the order; resumable if the function is
  deterministic;
- a re-iterable (a list, or an object whose ``__iter__`` starts over): resuming at step s skips its
  first s batches; resumable if it yields the same batches each time;
- a one-shot iterator (a generator): trains, but cannot resume from a checkpoint.

Batch size is then the caller's (the config's ``batch_size`` is used for tensors only).

A **transcoder** (``d_out`` given) trains on pairs: a tuple ``(inputs [N, d_in], targets [N, d_out])``
of tensors, or functions / iterables that give such pairs per step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from actlab.engine.config import Config, check_fields
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.files import HeaderFields, load_tensors, save_tensors
from actlab.sae.files import read_state
from actlab.sae.model import TRAINABLE_KINDS, SparseAutoencoder

__all__ = ["CHECKPOINT_NAME", "SAETrainConfig", "SAETrainResult", "train_sae"]

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "actlab.sae-checkpoint"
_BETAS, _EPS = (0.9, 0.999), 1e-8


@dataclasses.dataclass
class SAETrainConfig(Config):
    """Options of ``train_sae``.

    ``lr`` None scales with the dictionary size, 2e-4 / sqrt(n_latents / 2^14) (the TopK paper's
    rule); the rate warms up linearly over ``warmup_steps`` and decays linearly to 0 over the steps
    after ``decay_from`` (a fraction of ``steps``; 1 disables). ``aux_k`` 0 disables the AuxK loss;
    a latent is dead after ``dead_after`` tokens without firing. ``l0_coef`` and ``bandwidth`` are
    JumpReLU's sparsity weight and straight-through kernel width.
    """

    n_latents: int = 4096
    kind: str = "topk"
    skip: bool = False
    k: int = 32
    lr: float | None = None
    batch_size: int = 4096
    steps: int = 1000
    warmup_steps: int = 0
    decay_from: float = 0.8
    aux_k: int = 256
    aux_coef: float = 1 / 32
    dead_after: int = 10_000_000
    l0_coef: float = 1e-3
    bandwidth: float = 0.001
    normalize_input: bool = True
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0

    def validate(self) -> None:
        check_fields(self, positive_ints=("n_latents", "k", "batch_size", "steps", "dead_after", "checkpoint_every",
                                          "log_every"),
                     positive_numbers=("aux_coef", "l0_coef", "bandwidth"), choices={"kind": TRAINABLE_KINDS})
        if self.lr is not None:
            check_fields(self, positive_numbers=("lr",))
        for name in ("aux_k", "warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ActlabError(f"{name} must be an integer >= 0, not {value!r}")
        if not (isinstance(self.decay_from, (int, float)) and 0 <= self.decay_from <= 1):
            raise ActlabError(f"decay_from must be a fraction of the steps in [0, 1], not {self.decay_from!r}")
        if self.kind != "jumprelu" and self.k > self.n_latents:
            raise ActlabError(f"k ({self.k}) cannot exceed n_latents ({self.n_latents}); lower k or widen the SAE")

    def learning_rate(self, step: int) -> float:
        """The rate at ``step`` (0-based): base, warm-up, linear decay."""
        base = self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2 ** 14)
        if step < self.warmup_steps:
            base *= (step + 1) / self.warmup_steps
        start = int(self.decay_from * self.steps)
        if step >= start and self.steps > start:
            base *= (self.steps - step) / (self.steps - start)
        return base


@dataclasses.dataclass
class SAETrainResult:
    """The trained SAE (eval mode), its options, the logged history and where this call started."""

    sae: SparseAutoencoder
    config: SAETrainConfig
    history: list[dict]
    steps: int
    resumed_from: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------ the data order
class _Batches:
    """``get(step)``: the batch of a step, the same whatever step training (re)started from."""

    def __init__(self, batches: Any, d_in: int, config: SAETrainConfig, d_out: int | None = None):
        self.d_in, self.d_out, self.config, self.source = d_in, d_out, config, batches
        self._iter, self._next, self._perm, self._cached = None, 0, (None, None), None
        if _is_pair(batches) or isinstance(batches, torch.Tensor):
            self.mode = "tensor"
            self._check(batches, "the training tensor")
            rows = batches[0].shape[0] if _is_pair(batches) else batches.shape[0]
            if rows < config.batch_size:
                raise ActlabError(f"the training tensor has {rows} rows, fewer than batch_size "
                                  f"({config.batch_size}); lower batch_size or give more activations")
        elif callable(batches):
            self.mode = "function"
        elif isinstance(batches, Iterable):
            self.mode = "iterator" if iter(batches) is batches else "iterable"
        else:
            raise ActlabError(f"batches must be a tensor, a function step -> tensor or an iterable of tensors, "
                              f"not {type(batches).__name__}")

    def start(self, step: int) -> None:
        if step and self.mode == "iterator":
            raise ActlabError("cannot resume from a checkpoint with a one-shot iterator of batches: pass a tensor, a "
                              "function step -> tensor or a re-iterable, or use a new checkpoint_dir")
        self._iter, self._next = iter(self.source) if self.mode in ("iterator", "iterable") else None, 0
        for _ in range(step if self.mode == "iterable" else 0):
            self._pull(step)

    def first_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Data for the decoder-bias and scale initialisation, as (inputs, targets): the tensor's first
        65,536 rows, else step 0's batch (kept, so that an iterator's first batch is still trained on)."""
        if self.mode == "tensor":
            if _is_pair(self.source):
                return self.source[0][:65536].float(), self.source[1][:65536].float()
            x = self.source[:65536].float()
            return x, x
        self._cached = self.get(0)
        return self._cached

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of a step; the targets are the inputs for an SAE."""
        if step == 0 and self._cached is not None:
            batch, self._cached = self._cached, None
            return batch
        if self.mode == "tensor":
            batch = self._from_tensor(step)
        elif self.mode == "function":
            batch = self.source(step)
        else:
            batch = self._pull(step)
        self._check(batch, f"the batch of step {step}")
        if _is_pair(batch):
            return batch[0].float(), batch[1].float()
        x = batch.float()
        return x, x

    def _check(self, batch: Any, what: str) -> None:
        if self.d_out is None:
            if _is_pair(batch):
                raise ActlabError(f"{what} is a pair (inputs, targets), which only a transcoder takes; "
                                  "give the activations alone, or pass d_out= to train a transcoder")
            _check_batch(batch, self.d_in, what)
            return
        if not _is_pair(batch):
            raise ActlabError(f"{what} should be a pair (inputs [N, {self.d_in}], targets [N, {self.d_out}]) for a "
                              f"transcoder, not {type(batch).__name__}")
        _check_batch(batch[0], self.d_in, f"{what} (inputs)")
        _check_batch(batch[1], self.d_out, f"{what} (targets)")
        if batch[0].shape[0] != batch[1].shape[0]:
            raise ActlabError(f"{what}: {batch[0].shape[0]} inputs but {batch[1].shape[0]} targets")

    def _pull(self, step: int) -> torch.Tensor:
        try:
            self._next += 1
            return next(self._iter)
        except StopIteration:
            raise ActlabError(f"the batches ran out at step {step} (after {self._next - 1}); give more data "
                              "or fewer steps") from None

    def _from_tensor(self, step: int):
        n, b = (self.source[0] if _is_pair(self.source) else self.source).shape[0], self.config.batch_size
        per_epoch = n // b
        epoch, j = divmod(step, per_epoch)
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=gen))
        rows = self._perm[1][j * b:(j + 1) * b]
        if _is_pair(self.source):
            return self.source[0][rows], self.source[1][rows]
        return self.source[rows]


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value)


def _check_batch(x: Any, d_in: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != d_in or not x.is_floating_point():
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ActlabError(f"{what} should be a float tensor [batch, {d_in}] (d_in {d_in}), not {got}")
    if x.shape[0] == 0:
        raise ActlabError(f"{what} is empty")
    if not bool(torch.isfinite(x).all()):
        raise ActlabError(f"{what} has NaN or infinite values; drop those rows (or record the site again)")


# ------------------------------------------------------------------ Adam, with its moments as named tensors
class _Adam:
    """Adam written out so its state is plain named tensors plus one step counter (savable without pickle)."""

    def __init__(self, sae: SparseAutoencoder):
        self.params = dict(sae.named_parameters())
        self.m = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.t = 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.t += 1
        (b1, b2), c1, c2 = _BETAS, 1 - _BETAS[0] ** self.t, 1 - _BETAS[1] ** self.t
        for name, p in self.params.items():
            if p.grad is None:
                continue
            g, m, v = p.grad, self.m[name], self.v[name]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(_EPS), value=-lr / c1)
            p.grad = None


# ------------------------------------------------------------------ checkpoints
@dataclasses.dataclass
class _Run:
    sae: SparseAutoencoder
    adam: _Adam
    since_fired: torch.Tensor  # tokens since each latent last fired
    step: int = 0
    history: list = dataclasses.field(default_factory=list)


def _save_checkpoint(directory: Path, run: _Run, config: SAETrainConfig) -> Path:
    tensors = {f"model.{k}": v.detach() for k, v in run.sae.state_dict().items()}
    tensors.update({f"adam.m.{k}": v for k, v in run.adam.m.items()})
    tensors.update({f"adam.v.{k}": v for k, v in run.adam.v.items()})
    tensors["since_fired"] = run.since_fired
    meta = {"step": str(run.step), "adam_t": str(run.adam.t), "config": json.dumps(config.to_dict()),
            "sae": json.dumps(run.sae.config()), "history": json.dumps(run.history)}
    return save_tensors(directory / CHECKPOINT_NAME, tensors, CHECKPOINT_FORMAT, meta, durable=True)


def _load_checkpoint(path: Path, run: _Run, config: SAETrainConfig) -> None:
    hint = "delete it to start over"
    tensors, meta = load_tensors(path, CHECKPOINT_FORMAT, "SAE checkpoint", hint)
    fields = HeaderFields(path, "SAE checkpoint", meta, hint)
    saved = fields.json("config", dict)
    if saved != config.to_dict() or fields.json("sae", dict) != run.sae.config():
        diff = sorted(k for k in config.to_dict() if saved.get(k) != config.to_dict()[k]) or ["d_in"]
        raise ActlabError(f"the checkpoint '{path}' was made with other options ({', '.join(diff)}); pass the same "
                          "options to resume it, or use a new checkpoint_dir")
    read_state(fields, run.sae, tensors, "model.")
    for table, prefix in ((run.adam.m, "adam.m."), (run.adam.v, "adam.v.")):
        for name, ref in table.items():
            t = tensors.get(prefix + name)
            if t is None or t.shape != ref.shape or t.dtype != ref.dtype:
                raise fields.damaged(f"tensor '{prefix + name}' is missing or of the wrong shape")
            table[name] = t
    since = tensors.get("since_fired")
    if since is None or since.shape != run.since_fired.shape:
        raise fields.damaged("tensor 'since_fired' is missing or of the wrong shape")
    try:
        run.step, run.adam.t = int(fields.text("step")), int(fields.text("adam_t"))
    except ValueError:
        raise fields.damaged("its step or adam_t is not an integer") from None
    run.since_fired, run.history = since, fields.json("history", list)


# ------------------------------------------------------------------ one step
def _step(run: _Run, x: torch.Tensor, y: torch.Tensor, config: SAETrainConfig) -> dict:
    """One optimiser step on inputs ``x`` and targets ``y`` (``x`` itself for an SAE); returns the batch's
    loss, FVU and L0."""
    sae = run.sae
    xs = y * sae.target_scale
    pre = sae.pre_activations(x)
    z = sae.activate(pre)
    recon = sae.decode_scaled(z, x)
    variance = (xs - xs.mean(0)).pow(2).sum().clamp_min(1e-12)
    fvu = (recon - xs).pow(2).sum() / variance
    loss = fvu
    dead = run.since_fired >= config.dead_after
    if config.aux_k and bool(dead.any()):
        loss = loss + config.aux_coef * _aux_loss(sae, pre, dead, (xs - recon).detach(), config.aux_k)
    if config.kind == "jumprelu":
        loss = loss + config.l0_coef * sae.l0_penalty(pre)
    loss.backward()
    sae.project_decoder_grad()
    run.adam.step(config.learning_rate(run.step))
    sae.normalize_decoder()
    sae.update_threshold(z.detach())
    fired = (z.detach() > 0).any(0)
    run.since_fired += x.shape[0]
    run.since_fired[fired] = 0
    run.step += 1
    return {"loss": loss.item(), "fvu": fvu.item(), "l0": (z.detach() > 0).sum(1).float().mean().item()}


def _aux_loss(sae: SparseAutoencoder, pre: torch.Tensor, dead: torch.Tensor, residual: torch.Tensor,
              aux_k: int) -> torch.Tensor:
    """The TopK paper's AuxK loss: the top ``aux_k`` dead latents reconstruct what the live ones missed,
    so dead latents get a gradient toward useful directions (normalised like the FVU)."""
    k = min(aux_k, int(dead.sum()))
    acts = pre.relu().masked_fill(~dead, 0.0)
    values, index = acts.topk(k, dim=-1, sorted=False)
    z_aux = torch.zeros_like(acts).scatter(-1, index, values)
    guess = z_aux @ sae.W_dec
    return (guess - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)


# ------------------------------------------------------------------ the trainer
def train_sae(batches: torch.Tensor | Callable[[int], torch.Tensor] | Iterable[torch.Tensor], d_in: int,
              config: SAETrainConfig | None = None, *, d_out: int | None = None,
              checkpoint_dir: str | Path | None = None, progress: bool = False, **overrides) -> SAETrainResult:
    """Train an SAE on ``batches`` (see the module docstring for the accepted kinds and resuming);
    with ``d_out`` a transcoder on (input, target) pairs.

    With ``checkpoint_dir`` a checkpoint is written every ``checkpoint_every`` steps and at the end;
    if the folder already holds one (made with the same options), training continues from it.
    """
    config = SAETrainConfig.with_overrides(config, overrides)
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
        raise ActlabError(f"d_in must be a positive integer, not {d_in!r}")
    data = _Batches(batches, d_in, config, d_out)
    sae = SparseAutoencoder(d_in, config.n_latents, config.kind, config.k, d_out=d_out, skip=config.skip,
                            bandwidth=config.bandwidth, seed=config.seed)
    run = _Run(sae, _Adam(sae), torch.zeros(config.n_latents, dtype=torch.int64))
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if directory is not None and (directory / CHECKPOINT_NAME).exists():
        _load_checkpoint(directory / CHECKPOINT_NAME, run, config)
    data.start(run.step)
    if run.step == 0:
        _initialise(sae, *data.first_sample(), config)
    resumed_from, began = run.step, time.perf_counter()
    sae.train()
    with progress_bar("SAE", config.steps, unit="step", enabled=progress) as bar:
        bar.advance(run.step)
        while run.step < config.steps:
            stats = _step(run, *data.get(run.step), config)
            if run.step % config.log_every == 0 or run.step == config.steps:
                stats.update(step=run.step, dead_fraction=float((run.since_fired >= config.dead_after).float().mean()))
                run.history.append(stats)
                bar.update(description=f"SAE fvu {stats['fvu']:.3f} L0 {stats['l0']:.1f} "
                                       f"dead {stats['dead_fraction']:.1%}")
            if directory is not None and (run.step % config.checkpoint_every == 0 or run.step == config.steps):
                _save_checkpoint(directory, run, config)
            bar.advance(1)
    return SAETrainResult(sae.eval(), config, run.history, run.step, resumed_from, time.perf_counter() - began)


@torch.no_grad()
def _initialise(sae: SparseAutoencoder, x: torch.Tensor, y: torch.Tensor, config: SAETrainConfig) -> None:
    """Input (and a transcoder's target) scale to unit mean squared norm; the decoder bias at the
    (scaled) target mean."""
    if config.normalize_input:
        sae.input_scale.fill_(_unit_scale(x))
        if sae.transcoder:
            sae.output_scale.fill_(_unit_scale(y))
    sae.b_dec.copy_(y.mean(0) * sae.target_scale)


def _unit_scale(x: torch.Tensor) -> float:
    return 1.0 / float(x.pow(2).sum(1).mean().sqrt().clamp_min(1e-12))
