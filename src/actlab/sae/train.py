"""Train a sparse autoencoder on activations given as tensors, with checkpoints that resume bit-identically.

Reproducibility is by construction: the initial weights are a function of ``seed``, the data order
a function of ``(seed, step)``, and nothing else draws random numbers, so a checkpoint holding the
module, the Adam moments, the step and the dead-latent counters is the whole state of a run (that
is why it carries no RNG state: there is none beyond ``seed`` and ``step``). Resuming replays the
remaining steps exactly — on the same machine, torch version and thread count.

``batches`` is a tensor, a function of the step, or a re-iterable (``actlab.sae.batches``); a
transcoder (``d_out`` given) trains on (input, target) pairs.
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
from actlab.sae.batches import StepBatches
from actlab.sae.distributed import LocalSync, make_sync
from actlab.sae.files import read_state
from actlab.sae.model import (TRAINABLE_KINDS, SparseAutoencoder, encoder_input, pick_topk, sparse_decode,
                              sparse_forward)

__all__ = ["CHECKPOINT_NAME", "SAETrainConfig", "SAETrainResult", "SAETrainer", "train_sae"]

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "actlab.sae-checkpoint"
_BETAS, _EPS = (0.9, 0.999), 1e-8


@dataclasses.dataclass
class SAETrainConfig(Config):
    """Options of ``train_sae``.

    ``lr`` None scales with the dictionary size, 2.4e-3 / sqrt(n_latents / 2^14) (12x the TopK paper's
    rule, which it can afford with ``latent_shared_adam``: see ``_Adam``); it is the decoder's rate, and
    ``encoder_lr_scale`` / ``encoder_bias_lr_scale`` scale it for ``W_enc`` / ``b_enc`` (docs/sae.md:
    a fast encoder bias pushes rare latents out of the top k for good); the rate warms up linearly
    over ``warmup_steps`` and decays linearly to 0 over the steps after ``decay_from`` (a fraction of
    ``steps``; 1 disables). ``aux_k`` 0 disables the AuxK loss;
    a latent is dead after ``dead_after`` tokens without firing. A TopK / BatchTopK latent silent for
    ``revive_after`` tokens (0: never) has ``b_enc`` raised, after the step, by what its best token of the
    batch lacked to fire: a latent's bias only ever falls otherwise, and rare latents then drop out of
    the top k for good, more so at fast rates (docs/sae.md). ``l0_coef`` and ``bandwidth`` are
    JumpReLU's sparsity weight and straight-through kernel width. ``latent_shared_adam`` False is plain
    Adam (a second moment per weight; slower rates are then needed on real activations).
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
    latent_shared_adam: bool = True
    encoder_lr_scale: float = 0.5
    encoder_bias_lr_scale: float = 1 / 12
    revive_after: int = 16384
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0

    def validate(self) -> None:
        check_fields(self, positive_ints=("n_latents", "k", "batch_size", "steps", "dead_after", "checkpoint_every",
                                          "log_every"),
                     positive_numbers=("aux_coef", "l0_coef", "bandwidth", "encoder_lr_scale"), choices={"kind": TRAINABLE_KINDS})
        if self.lr is not None:
            check_fields(self, positive_numbers=("lr",))
        bias_scale = self.encoder_bias_lr_scale
        if isinstance(bias_scale, bool) or not isinstance(bias_scale, (int, float)) or not 0 <= bias_scale < math.inf:
            raise ActlabError(f"encoder_bias_lr_scale must be a number >= 0 (0 keeps b_enc at 0, unrevived), not {bias_scale!r}")
        for name in ("aux_k", "warmup_steps", "seed", "revive_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ActlabError(f"{name} must be an integer >= 0, not {value!r}")
        if not (isinstance(self.decay_from, (int, float)) and 0 <= self.decay_from <= 1):
            raise ActlabError(f"decay_from must be a fraction of the steps in [0, 1], not {self.decay_from!r}")
        if self.kind != "jumprelu" and self.k > self.n_latents:
            raise ActlabError(f"k ({self.k}) cannot exceed n_latents ({self.n_latents}); lower k or widen the SAE")

    def learning_rate(self, step: int) -> float:
        """The rate at ``step`` (0-based): base, warm-up, linear decay."""
        base = self.lr if self.lr is not None else 2.4e-3 / math.sqrt(self.n_latents / 2 ** 14)
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


# ------------------------------------------------------------------ Adam, with its moments as named tensors
class _Adam:
    """Adam written out so its state is plain named tensors plus one step counter (savable without pickle).

    With ``shared`` the second moment of ``W_enc``, ``b_enc`` and ``W_dec`` is averaged over the latents
    (per input / output coordinate, one for ``b_enc``) before it divides the step. Plain Adam (and signum)
    gives a latent that fires on a few tokens a step as large as a common latent's, driven by a handful of
    tokens: at higher rates such latents drift onto training-only detail and stop firing on new text
    (docs/sae.md). Shared, a latent's step scales with its gradient, i.e. with the evidence it has.
    ``scales`` multiplies the rate of the named tensors (the encoder's, ``SAETrainConfig``)."""

    _LATENT_AXIS = {"W_enc": 1, "b_enc": 0, "W_dec": 0}

    def __init__(self, sae: SparseAutoencoder, shared: bool = True, scales: dict[str, float] | None = None):
        self.params = dict(sae.named_parameters())
        self.scales = dict(scales or {})
        # contiguous (W_enc starts as a transpose), like the tensors a checkpoint loads: the shared mean
        # then sums in the same order after a resume
        self.m = {k: torch.zeros(p.shape, dtype=p.dtype, device=p.device) for k, p in self.params.items()}
        self.v = {k: torch.zeros(p.shape, dtype=p.dtype, device=p.device) for k, p in self.params.items()}
        self.t = 0
        self.axis = {k: a for k, a in self._LATENT_AXIS.items() if k in self.params} if shared else {}

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
            scale = v.mean(self.axis[name], keepdim=True) if name in self.axis else v
            p.addcdiv_(m, (scale / c2).sqrt_().add_(_EPS), value=-lr * self.scales.get(name, 1.0) / c1)
            p.grad = None


# ------------------------------------------------------------------ checkpoints
@dataclasses.dataclass
class _Run:
    sae: SparseAutoencoder
    adam: _Adam
    since_fired: torch.Tensor  # tokens since each latent last fired
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    sync: Any = dataclasses.field(default_factory=LocalSync)  # data-parallel hooks (sae/distributed.py)


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
    run.step, run.adam.t = fields.number("step", int), fields.number("adam_t", int)
    run.since_fired, run.history = since, fields.json("history", list)


# ------------------------------------------------------------------ one step
def _step(run: _Run, x: torch.Tensor, y: torch.Tensor, config: SAETrainConfig) -> dict:
    """One optimiser step on inputs ``x`` and targets ``y`` (``x`` itself for an SAE); returns the batch's
    loss, FVU and L0. TopK and BatchTopK take the sparse path (``sparse_forward``: no dense latents, and
    gradients computed at the kept places only); JumpReLU, whose L0 penalty is dense anyway, the dense one."""
    sae = run.sae
    xs = y * sae.target_scale
    dead, aux = run.since_fired >= config.dead_after, None
    if config.aux_k and bool(dead.any()):
        dead_latents = dead.nonzero().squeeze(1)
        aux = (dead_latents, min(config.aux_k, dead_latents.numel()))
    if config.kind == "jumprelu":
        pre = sae.pre_activations(x)
        z = sae.activate(pre)
        recon = sae.decode_scaled(z, x)
        kept, on, xc, gaps = None, z.detach() > 0, encoder_input(sae, x).detach(), None
        fired, active = on.any(0), on.sum()
        aux_code = pick_topk(pre.detach(), *aux) if aux is not None else None
    else:
        silent = None
        if config.revive_after and config.encoder_bias_lr_scale > 0:  # a frozen bias stays frozen
            silent = (run.since_fired >= config.revive_after).nonzero().squeeze(1)
            silent = silent if silent.numel() else None
        recon, kept, latents, aux_code, xc, gaps = sparse_forward(sae, x, aux, silent)
        fired = torch.bincount(latents, weights=kept, minlength=sae.n_latents) > 0  # kept values are >= 0
        active = (kept > 0).sum()
    variance = run.sync.centred_sq(xs).clamp_min(1e-12)
    fvu = (recon - xs).pow(2).sum() / variance
    loss = fvu
    if aux_code is not None:
        loss = loss + config.aux_coef * _aux_loss(sae, xc, aux_code, (xs - recon).detach(), run.sync)
    if config.kind == "jumprelu":
        loss = loss + config.l0_coef * sae.l0_penalty(pre) * run.sync.row_share(x.shape[0])
    loss.backward()
    run.sync.gradients(sae)
    sae.project_decoder_grad()
    run.adam.step(config.learning_rate(run.step))
    sae.normalize_decoder()
    if gaps is not None:  # the sparse path's silent latents (sparse_forward)
        with torch.no_grad():
            sae.b_enc[silent] -= run.sync.best(gaps).clamp_max(0)
    if kept is not None:
        sae.update_threshold(run.sync.kept(kept))
    run.since_fired += run.sync.rows(x.shape[0])
    run.since_fired[run.sync.fired(fired)] = 0
    run.step += 1
    return run.sync.logged(loss, fvu, active, x.shape[0])


def _aux_loss(sae: SparseAutoencoder, xc: torch.Tensor, code: tuple, residual: torch.Tensor,
              sync: LocalSync) -> torch.Tensor:
    """The TopK paper's AuxK loss: each row's top ``aux_k`` dead latents (``code``, picked with the batch's
    pre-activations by ``sparse_forward`` / ``pick_topk``) reconstruct what the live ones missed, so dead
    latents get a gradient toward useful directions (normalised like the FVU). ``xc`` is the encoder input;
    the gradient goes through ``sparse_decode`` to the picked places only."""
    guess = sparse_decode(sae, xc, code)[0]
    return (guess - residual).pow(2).sum() / sync.centred_sq(residual).clamp_min(1e-12)


# ------------------------------------------------------------------ the trainer
class SAETrainer:
    """One SAE's training run, a step at a time: what ``train_sae`` loops over, and what
    ``actlab.sae.feed.train_many`` steps in lockstep for several SAEs fed by one forward pass.

    With ``checkpoint_dir`` a checkpoint is written every ``checkpoint_every`` steps and at the end;
    if the folder already holds one (made with the same options), training continues from it."""

    def __init__(self, batches: Any, d_in: int, config: SAETrainConfig, *, d_out: int | None = None,
                 checkpoint_dir: str | Path | None = None, distributed: bool = False):
        if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
            raise ActlabError(f"d_in must be a positive integer, not {d_in!r}")
        self.config = config
        self.data = StepBatches(batches, d_in, config.batch_size, config.seed, d_out)
        sae = SparseAutoencoder(d_in, config.n_latents, config.kind, config.k, d_out=d_out, skip=config.skip,
                                bandwidth=config.bandwidth, seed=config.seed)
        scales = {"W_enc": config.encoder_lr_scale, "b_enc": config.encoder_bias_lr_scale}
        self.run = _Run(sae, _Adam(sae, config.latent_shared_adam, scales),
                        torch.zeros(config.n_latents, dtype=torch.int64))
        self.run.sync = make_sync(distributed, self.data.mode)
        self.directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if self.directory is not None and (self.directory / CHECKPOINT_NAME).exists():
            _load_checkpoint(self.directory / CHECKPOINT_NAME, self.run, config)
        self.data.start(self.run.step)
        if self.run.step == 0:
            _initialise(sae, *self.data.first_sample(), config, self.run.sync)
        self.run.sync.start(self.run)
        self.resumed_from, self.seconds = self.run.step, 0.0
        sae.train()

    @property
    def sae(self) -> SparseAutoencoder:
        return self.run.sae

    @property
    def done(self) -> bool:
        return self.run.step >= self.config.steps

    def step(self, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict | None:
        """Train one step (on ``batch``, else the data's batch of this step); returns the logged stats on
        logging steps, else None. Checkpoints when due."""
        run, config = self.run, self.config
        began = time.perf_counter()
        stats = _step(run, *run.sync.local(batch if batch is not None else self.data.get(run.step)), config)
        logged = None
        if run.step % config.log_every == 0 or run.step == config.steps:
            stats.update(step=run.step, dead_fraction=float((run.since_fired >= config.dead_after).float().mean()))
            run.history.append(stats)
            logged = stats
        due = run.step % config.checkpoint_every == 0 or run.step == config.steps
        if self.directory is not None and due and run.sync.is_main:
            _save_checkpoint(self.directory, run, config)
        self.seconds += time.perf_counter() - began
        return logged

    def result(self) -> SAETrainResult:
        return SAETrainResult(self.sae.eval(), self.config, self.run.history, self.run.step, self.resumed_from,
                              self.seconds)


def describe(stats: dict) -> str:
    """The progress bar's line for logged stats."""
    return f"loss {stats['loss']:.3f} fvu {stats['fvu']:.3f} L0 {stats['l0']:.1f} dead {stats['dead_fraction']:.1%}"


def train_sae(batches: torch.Tensor | Callable[[int], torch.Tensor] | Iterable[torch.Tensor], d_in: int,
              config: SAETrainConfig | None = None, *, d_out: int | None = None,
              checkpoint_dir: str | Path | None = None, progress: bool = False, distributed: bool = False,
              **overrides) -> SAETrainResult:
    """Train an SAE on ``batches`` (a tensor, a function of the step or a re-iterable: ``actlab.sae.batches``);
    with ``d_out`` a transcoder on (input, target) pairs. ``checkpoint_dir``: see ``SAETrainer``."""
    config = SAETrainConfig.with_overrides(config, overrides)
    trainer = SAETrainer(batches, d_in, config, d_out=d_out, checkpoint_dir=checkpoint_dir, distributed=distributed)
    with progress_bar("SAE", config.steps, unit="step", enabled=progress) as bar:
        bar.advance(trainer.run.step)
        while not trainer.done:
            stats = trainer.step()
            if stats is not None:
                bar.update(description="SAE " + describe(stats))
            bar.advance(1)
    return trainer.result()


@torch.no_grad()
def _initialise(sae: SparseAutoencoder, x: torch.Tensor, y: torch.Tensor, config: SAETrainConfig,
                sync: LocalSync) -> None:
    """Input (and a transcoder's target) scale to unit mean squared norm; the decoder bias at the
    (scaled) target mean."""
    if config.normalize_input:
        sae.input_scale.fill_(_unit_scale(x, sync))
        if sae.transcoder:
            sae.output_scale.fill_(_unit_scale(y, sync))
    sae.b_dec.copy_(sync.row_mean(y) * sae.target_scale)
    if sae.transcoder:  # read through the best linear prediction of the target: W_enc = B W_decᵀ
        xs, ys = x * sae.input_scale, y * sae.target_scale - sae.b_dec
        gram = sync.total(xs.T @ xs) + 1e-3 * sync.init_rows(xs.shape[0]) * torch.eye(xs.shape[1])
        sae.W_enc.copy_(torch.linalg.solve(gram, sync.total(xs.T @ ys)) @ sae.W_dec.T)


def _unit_scale(x: torch.Tensor, sync: LocalSync) -> float:
    return 1.0 / float(sync.row_mean(x.pow(2).sum(1)).sqrt().clamp_min(1e-12))
