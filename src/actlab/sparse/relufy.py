"""ReLU-fication (ProSparse-style, Song et al. 2024): make a SwiGLU / GeLU model's MLP activations exactly sparse.

The gate's activation is swapped for a (shifted) ReLU, ``relu(x - shift)`` (``anatomy.set_mlp_activation``), and
the model is fine-tuned briefly on the bundled training text with the language-model loss plus a *progressive* L1
penalty on those activations, ``lambda(t) * mean_i mean |relu(gate_i)|``: ``lambda`` rises from 0 to
``l1_max`` in ``l1_stages`` equal steps over the first ``l1_warmup`` of the run (ProSparse raises it in stages so
the model is not pushed to zero before it has recovered from the swap), then stays. Every ``checkpoint_every``
steps the trainable weights, the optimizer's moments and the step go to ``OUT/checkpoint.safetensors`` + a JSON
record; ``relufy_finetune(..., resume=True)`` continues from there and gives the run it would have given
uninterrupted (same data order: batch ``t`` is drawn from a generator seeded by ``(seed, t)``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from actlab.errors import ActlabError

__all__ = ["ShiftedReLU", "RelufyConfig", "relufy", "l1_weight", "relufy_finetune", "hidden_sparsity",
           "load_relufied"]

FORMAT = "actlab.relufied"


class ShiftedReLU(nn.Module):
    """``relu(x - shift)``; while ``record`` is a list, each call's mean |output| (with its graph) is appended."""

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.shift = float(shift)
        self.record: list | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(x - self.shift) if self.shift else F.relu(x)
        if self.record is not None:
            self.record.append(y.abs().mean())
        return y


def relufy(model, shift: float = 0.0) -> list[ShiftedReLU]:
    """Swap every block's MLP activation for ``ShiftedReLU(shift)`` in place; returns the new modules."""
    acts = []
    for layer in range(model.n_layers):
        act = ShiftedReLU(shift)
        model.anatomy.set_mlp_activation(layer, act)
        acts.append(act)
    return acts


@dataclass
class RelufyConfig:
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-4
    l1_max: float = 0.5
    l1_warmup: float = 0.5  # the share of the steps over which lambda rises to l1_max
    l1_stages: int = 5
    shift: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50


def l1_weight(step: int, config: RelufyConfig) -> float:
    """Progressive L1 weight: ``l1_max * k / l1_stages`` in stage ``k`` (1 .. stages) of the warm-up, then ``l1_max``."""
    warm = max(1, int(config.steps * config.l1_warmup))
    stage = min(config.l1_stages, 1 + step * config.l1_stages // warm)
    return config.l1_max * stage / config.l1_stages


def _token_stream(model, texts) -> torch.Tensor:
    ids = model.tokenizer(list(texts))["input_ids"]
    return torch.tensor([t for row in ids for t in row], dtype=torch.long)


def _batch(stream: torch.Tensor, step: int, config: RelufyConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    starts = torch.randint(0, stream.numel() - config.seq_len, (config.batch_size,), generator=g)
    return torch.stack([stream[s: s + config.seq_len] for s in starts.tolist()])


def hidden_sparsity(model, texts) -> float:
    """The share of MLP hidden neurons (``mlp.hidden``) that are exactly zero on ``texts``."""
    got = model.collect(list(texts), [f"mlp.hidden.{i}" for i in range(model.n_layers)], positions="all")
    zeros = sum(int((v == 0).sum()) for v in got.acts.values())
    return zeros / sum(v.numel() for v in got.acts.values())


def _trainable(model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.hf.named_parameters() if p.requires_grad}


def _save(out: Path, model, opt, step: int, config: RelufyConfig, history: list) -> None:
    from actlab.files import save_tensors, write_json

    tensors = {f"param.{n}": p.detach().contiguous() for n, p in _trainable(model).items()}
    for n, p in _trainable(model).items():
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"{key}.{n}"] = state[key].contiguous()
    save_tensors(out / "checkpoint.safetensors", tensors, FORMAT, {"step": str(step), "config": json.dumps(asdict(config))})
    write_json(out / "checkpoint.json", {"step": step, "config": asdict(config), "history": history})


def _restore(out: Path, model, opt, config: RelufyConfig) -> tuple[int, list]:
    from actlab.files import load_tensors

    tensors, meta = load_tensors(out / "checkpoint.safetensors", FORMAT, "ReLU-fication checkpoint",
                                 "start again without --resume")
    if json.loads(meta["config"]) != asdict(config):
        raise ActlabError(f"the checkpoint in {out} was made with other settings; resume with the same ones")
    step = int(meta["step"])
    with torch.no_grad():
        for n, p in _trainable(model).items():
            p.copy_(tensors[f"param.{n}"])
            if f"exp_avg.{n}" in tensors:
                opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": tensors[f"exp_avg.{n}"].clone(),
                                "exp_avg_sq": tensors[f"exp_avg_sq.{n}"].clone()}
    return step, json.loads((out / "checkpoint.json").read_text())["history"]


def relufy_finetune(model, out, config: RelufyConfig | None = None, *, texts=None, resume: bool = False,
                    until: int | None = None, progress=None) -> list[dict]:
    """ReLU-fy ``model`` in place (if not already) and fine-tune it per ``config``; returns the history
    (step, loss, l1 weight, penalty), checkpointing into ``out``. ``until``: stop (with a checkpoint) after that
    many steps of the run, as an interrupted run would; ``resume=True`` goes on from the checkpoint."""
    from actlab.datasets import training_text

    config = config or RelufyConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    acts = [a for a in (model.anatomy.mlp_parts(i).act for i in range(model.n_layers)) if isinstance(a, ShiftedReLU)]
    if len(acts) != model.n_layers:
        acts = relufy(model, config.shift)
    stream = _token_stream(model, training_text("train") if texts is None else texts)
    if stream.numel() <= config.seq_len:
        raise ActlabError(f"the fine-tuning text has {stream.numel()} tokens; it needs more than --seq-len {config.seq_len}")
    opt = torch.optim.Adam(list(_trainable(model).values()), lr=config.lr)
    start, history = _restore(out, model, opt, config) if resume else (0, [])
    model.hf.train()
    try:
        last = config.steps if until is None else min(config.steps, until)
        for step in range(start, last):
            ids = _batch(stream, step, config).to(model.device)
            for a in acts:
                a.record = []
            logits = model.hf(input_ids=ids).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            penalty = torch.stack([torch.stack(a.record).mean() for a in acts]).mean()
            weight = l1_weight(step, config)
            opt.zero_grad()
            (loss + weight * penalty).backward()
            opt.step()
            history.append({"step": step, "loss": loss.item(), "l1_weight": weight, "penalty": penalty.item()})
            if progress is not None:
                progress(history[-1])
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == last:
                _save(out, model, opt, step + 1, config, history)
    finally:
        for a in acts:
            a.record = None
        model.hf.eval()
    return history


def load_relufied(model, path) -> None:
    """Put a ``relufy_finetune`` checkpoint's weights (and the ReLU) into ``model`` (the model it was made from)."""
    from actlab.files import load_tensors

    tensors, meta = load_tensors(path, FORMAT, "ReLU-fication checkpoint", "run scripts/relufy.py again")
    config = json.loads(meta["config"])
    relufy(model, config.get("shift", 0.0))
    params = dict(model.hf.named_parameters())
    missing = [n for n in tensors if n.startswith("param.") and n[6:] not in params]
    if missing:
        raise ActlabError(f"'{path}' was made for another model ({missing[0][6:]} is not one of {model.name}'s weights)")
    with torch.no_grad():
        for n, t in tensors.items():
            if n.startswith("param."):
                params[n[6:]].copy_(t)
    if not all(math.isfinite(float(p.detach().float().abs().sum())) for p in params.values()):
        raise ActlabError(f"'{path}' holds non-finite weights")
