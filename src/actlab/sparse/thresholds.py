"""Per-channel thresholds for activation-sparse MLPs, calibrated on bundled text to a target sparsity.

Two inputs per block: ``mlp.in.{i}`` (read by the gate and up projections) and ``mlp.hidden.{i}`` (read
by the down projection). A channel j of an input is skipped where ``|x_j| <= t_j``. The methods differ in
what they rank, each threshold set to the target quantile of its score on the calibration tokens:

- ``teal`` (TEAL, Liu et al. 2024): ``|x_j|``, one level per input (``t_j = q``), on both inputs; every
  input gets the target (TEAL's greedy block-wise allocation of per-layer levels is not implemented).
- ``wina`` (WINA, Chen et al. 2025): ``|x_j| * ||W[:, j]||``, the column norms of the weight that reads the
  input (gate and up stacked for ``mlp.in``), so ``t_j = q / ||W[:, j]||``; both inputs.
- ``cats`` (CATS, Lee et al. 2024): ``|act(gate_j)|`` (plain MLPs: ``|act(up_j)|``), the hidden input only;
  the MLP input stays dense.
- ``cett`` (the Sparsing Law's CETT rule, ``actlab.sparse.cett``): ``|h_j| * ||w_out,j||`` with one CETT
  target shared by all layers, chosen by bisection so that the mean hidden sparsity is the target; the
  hidden input only.

The hidden scores are computed from the calibration inputs with the ``mlp.in`` zeros already applied, so
the down projection's thresholds are calibrated on what it will see.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from actlab.errors import ActlabError
from actlab.files import HeaderFields, load_tensors, save_tensors, to_jsonable

__all__ = ["METHODS", "FORMAT", "Thresholds", "calibrate", "quantile", "load_thresholds"]

METHODS = ("teal", "wina", "cats", "cett")
FORMAT = "actlab.sparse_thresholds"
CETT_TOKENS = 2048  # CETT's search evaluates many truncations: it calibrates on at most about this many tokens
_NAMES = ("mlp.in.", "mlp.hidden.", "attn.in.", "attn.o.")
_HINT = "calibrate them again with `actlab sparsify MODEL --method ... -o FILE`"


@dataclass
class Thresholds:
    """Per-channel thresholds, ``tensors["mlp.in.{i}"]`` ``[d_model]`` and ``tensors["mlp.hidden.{i}"]`` ``[d_mlp]``
    (an input without an entry is not sparsified), for the model whose ``identity()`` is ``model``."""

    method: str
    sparsity: float
    tensors: dict[str, torch.Tensor]
    model: dict
    rule: str = "hidden"  # how the hidden threshold is read: "hidden" (|h|) or "gate" (|act(gate)|, CATS)
    info: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted({int(k.rsplit(".", 1)[1]) for k in self.tensors})

    @property
    def mlp_layers(self) -> list[int]:
        return sorted({int(k.rsplit(".", 1)[1]) for k in self.tensors if k.startswith("mlp.")})

    def pair(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.tensors.get(f"mlp.in.{layer}"), self.tensors.get(f"mlp.hidden.{layer}")

    def check_model(self, model) -> None:
        from actlab.models.model import same_model

        if not same_model(self.model, model.identity()):
            raise ActlabError(f"these thresholds were calibrated on {self.model.get('model_name', 'another model')}, "
                              f"not {model.name}: calibrate them for this model with `actlab sparsify {model.name}`")

    def save(self, path: str | Path) -> Path:
        meta = {"model": json.dumps(self.model), "method": self.method, "sparsity": repr(float(self.sparsity)),
                "rule": self.rule, "info": json.dumps(to_jsonable(self.info))}
        return save_tensors(path, {k: v.detach().float().cpu().contiguous() for k, v in self.tensors.items()},
                            FORMAT, meta)


def load_thresholds(path: str | Path, model=None) -> Thresholds:
    """Read a thresholds file; with ``model``, refused when it was calibrated on another model."""
    tensors, meta = load_tensors(path, FORMAT, "sparse thresholds", _HINT)
    fields = HeaderFields(path, "sparse thresholds", meta, _HINT)
    made_for = fields.json("model", dict)
    method, rule = fields.text("method"), fields.text("rule")
    sparsity = fields.number("sparsity", float)
    ok_names = all(k.startswith(_NAMES) and k.rsplit(".", 1)[1].isdigit() for k in tensors)
    if method not in METHODS or rule not in ("hidden", "gate") or not ok_names or not all(
            t.ndim == 1 and t.dtype == torch.float32 and not bool(torch.isnan(t).any()) for t in tensors.values()):
        raise fields.damaged("its method, rule or tensors are not what actlab writes")
    out = Thresholds(method, sparsity, tensors, made_for, rule, fields.json("info", dict, {}))
    if model is not None:
        out.check_model(model)
        from actlab.sparse.attention import input_width

        for name, t in tensors.items():
            width = model.sites.get(name) if name.startswith("mlp.") else _attn_width(model, name, input_width)
            if width != t.shape[0]:
                raise ActlabError(f"thresholds file '{path}' has {name} of width {t.shape[0]}, which {model.name} "
                                  "does not have")
    return out


def _attn_width(model, name: str, width) -> int | None:
    try:
        return width(model, name)
    except ActlabError:
        return None


def quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of all entries (lower order statistic): about ``q`` of them are ``<=`` it."""
    flat = values.reshape(-1).float()
    k = min(max(1, int(round(q * flat.numel()))), flat.numel())
    return float(flat.kthvalue(k).values)


def _first_weight(parts) -> torch.Tensor:
    return torch.cat([parts.gate, parts.up]) if parts.gated else parts.up


def _zeroed(x: torch.Tensor, thr: torch.Tensor | None) -> torch.Tensor:
    return x if thr is None else torch.where(x.abs() > thr, x, torch.zeros_like(x))


def score_norms(model, method: str, kind: str, layer: int) -> torch.Tensor | None:
    """WINA's column norms of the weights that read input ``kind`` of block ``layer`` (None for TEAL: |x| alone)."""
    if method != "wina":
        return None
    if kind.startswith("attn."):
        from actlab.sparse.attention import input_weights

        return input_weights(model, kind, layer).float().norm(dim=0)
    parts = model.anatomy.mlp_parts(layer)
    return (_first_weight(parts) if kind == "mlp.in" else parts.down).float().norm(dim=0)


def level_threshold(x: torch.Tensor, level: float, norms: torch.Tensor | None) -> torch.Tensor:
    """Per-channel thresholds that skip ``level`` of ``x`` [n, width] by ``|x_j| * norms_j`` (TEAL: norms = 1)."""
    if norms is None:
        return torch.full((x.shape[1],), quantile(x.abs(), level))
    return quantile(x.abs() * norms, level) / norms


def _layer(method: str, model, layer: int, x: torch.Tensor, levels: dict[str, float]) -> dict[str, torch.Tensor]:
    """Thresholds of one block's MLP inputs from its calibration inputs ``x`` [n, d_model] (float32), each input
    at its level (``levels["mlp.in"]``, ``levels["mlp.hidden"]``; 0: left dense)."""
    parts, i = model.anatomy.mlp_parts(layer), layer
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if method in ("teal", "wina") and levels["mlp.in"] > 0:
            out[f"mlp.in.{i}"] = level_threshold(x, levels["mlp.in"], score_norms(model, method, "mlp.in", i))
        if levels["mlp.hidden"] <= 0:
            return out
        h = parts.hidden(_zeroed(x, out.get(f"mlp.in.{i}")).to(parts.up.dtype)).float()
        if method in ("teal", "wina"):
            out[f"mlp.hidden.{i}"] = level_threshold(h, levels["mlp.hidden"], score_norms(model, method, "mlp.hidden", i))
        elif method == "cats":
            pre = x.to(parts.up.dtype) @ (parts.gate if parts.gated else parts.up).T
            bias = parts.gate_bias if parts.gated else parts.up_bias
            activated = parts.act(pre + bias if bias is not None else pre).float()
            out[f"mlp.hidden.{i}"] = level_threshold(activated, levels["mlp.hidden"], None)
    return out


def _cett_thresholds(model, acts: dict[int, torch.Tensor], sparsity: float) -> tuple[dict, float]:
    """Per layer ``t_j = eps_i / ||w_out,j||`` with ``eps_i`` the CETT threshold of one shared target ``tau``,
    ``tau`` bisected (in log space) until the mean hidden sparsity is the target."""
    from actlab.sparse.cett import CettCurve, output_norms

    curves, norms, hidden = {}, {}, {}
    for i, x in acts.items():
        x = x[:: max(1, x.shape[0] // CETT_TOKENS)]  # evenly spaced tokens: a mean over tokens needs no more
        parts = model.anatomy.mlp_parts(i)
        with torch.no_grad():
            hidden[i] = parts.hidden(x.to(parts.up.dtype)).float()
        curves[i], norms[i] = CettCurve(hidden[i], parts.down.float()), output_norms(parts.down).float()

    def at(tau: float) -> tuple[dict, float]:
        eps = {i: curves[i].threshold(tau) for i in acts}
        out = {f"mlp.hidden.{i}": torch.full_like(norms[i], e) / norms[i] if math.isfinite(e)
               else torch.full_like(norms[i], math.inf) for i, e in eps.items()}
        s = [float((hidden[i].abs() <= out[f"mlp.hidden.{i}"]).float().mean()) for i in acts]
        return out, sum(s) / len(s)

    lo, hi = 1e-6, 1.0
    best = at(hi) + (hi,)
    for _ in range(30):  # until the mean sparsity is within 0.2 points of the target
        mid = math.sqrt(lo * hi)
        out, got = at(mid)
        if abs(got - sparsity) < abs(best[1] - sparsity):
            best = (out, got, mid)
        if abs(got - sparsity) <= 0.002:
            break
        lo, hi = (mid, hi) if got < sparsity else (lo, mid)
    return best[0], best[2]


def _calibration_docs(model, texts, tokens: int) -> list:
    from actlab.datasets import training_text
    from actlab.io import budget

    tok = model.tokenizer
    count = tok if hasattr(tok, "encode") else (lambda text: len(tok(text)["input_ids"]))
    return budget(training_text("train") if texts is None else list(texts), count, tokens)


def _inputs(model, docs, layers: list[int], done: "Thresholds | None" = None) -> dict[int, torch.Tensor]:
    """``mlp.in`` of ``layers`` on ``docs``, with the blocks ``done`` covers already sparse (prefill: dense torch
    with the same zeros, the numbers the kernel gives)."""
    from contextlib import nullcontext

    from actlab.sparse.mlp import splice

    with splice(model, done) if done is not None and done.tensors else nullcontext():
        got = model.collect(docs, [f"mlp.in.{i}" for i in layers], positions="all", batch_size=8)
    return {i: got.acts[f"mlp.in.{i}"].float() for i in layers}


def attn_input(model, docs, kind: str, layer: int, done: "Thresholds | None" = None) -> torch.Tensor:
    """Block ``layer``'s attention input ``kind`` ("attn.in" or "attn.o") on ``docs`` [tokens, width], with what
    ``done`` covers already sparse (no padding tokens; the forward stops after that attention)."""
    from contextlib import nullcontext

    from actlab.engine.batching import selection_mask
    from actlab.sparse.attention import record_input
    from actlab.sparse.mlp import splice

    masks: list[torch.Tensor] = []  # each batch's non-padding tokens, as the engine selects them

    def select(rows, width):
        masks.append(selection_mask(rows, width, "all"))
        return masks[-1]

    with splice(model, done) if done is not None and done.tensors else nullcontext(), \
            record_input(model, kind, layer) as got:
        model.collect(docs, [f"attn.{layer}"], select=select, batch_size=8)
    return torch.cat([g.reshape(*m.shape, -1)[m] for g, m in zip(got, masks, strict=True)])


def _attn_thresholds(model, method: str, docs, layer: int, levels: dict[str, float], done: Thresholds) -> None:
    """TEAL / WINA thresholds of block ``layer``'s attention inputs into ``done``: the q/k/v input first, then the
    output projection's input as it is with the q/k/v input sparse (the earlier blocks sparse throughout)."""
    from actlab.sparse.attention import ATTN_INPUTS

    for kind in ATTN_INPUTS:
        if levels[kind] > 0:
            x = attn_input(model, docs, kind, layer, done)
            done.tensors[f"{kind}.{layer}"] = level_threshold(x, levels[kind], score_norms(model, method, kind, layer))


def calibrate(model, method: str = "teal", sparsity: float = 0.5, *, texts=None, tokens: int = 16384,
              layers: list[int] | None = None, attention: bool = True, allocation: str = "uniform",
              tune_tokens: int = 2048) -> Thresholds:
    """Thresholds of ``method`` that skip ``sparsity`` of each input's channels on ``tokens`` tokens of ``texts``
    (default: the bundled ``training_text("train")``; check on ``training_text("eval")``). ``attention``: TEAL
    and WINA also sparsify the attention's q/k/v input and output-projection input (CATS and CETT never do).
    ``allocation="greedy"`` (TEAL, WINA): each block's inputs get their own levels, chosen by
    ``allocate.greedy_levels`` on the first ``tune_tokens`` tokens so that the block's weight-weighted sparsity is
    the target with the least block-output error (``info["levels"]``)."""
    if allocation not in ("uniform", "greedy") or (allocation == "greedy" and method not in ("teal", "wina")):
        raise ActlabError(f"allocation is 'uniform' or (for teal and wina) 'greedy', not {allocation!r} for {method}")
    if method not in METHODS:
        raise ActlabError(f"unknown sparsity method {method!r}; choose one of {', '.join(METHODS)}")
    if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise ActlabError(f"the target sparsity is a fraction in [0, 1), not {sparsity!r} (e.g. --sparsity 0.5)")
    if model.d_mlp is None:
        raise ActlabError(f"{model.name} has no MLP hidden sites (mlp.hidden.i); there is nothing to sparsify")
    layers = sorted({int(i) for i in (range(model.n_layers) if layers is None else layers)})
    docs = _calibration_docs(model, texts, tokens)
    out = Thresholds(method, float(sparsity), {}, model.identity(), "gate" if method == "cats" else "hidden",
                     {"text": "training_text('train')" if texts is None else "given texts"})
    if sparsity == 0:
        return out
    if method == "cett":  # one shared target over all layers: calibrated on the dense model's inputs
        acts = _inputs(model, docs, layers)
        out.tensors, out.info["cett_target"] = _cett_thresholds(model, acts, sparsity)
    else:  # block by block, each on the inputs it sees with the earlier blocks already sparse
        units = (("attn.in", "attn.o") if attention and method in ("teal", "wina") else ()) + ("mlp.in", "mlp.hidden")
        if allocation == "greedy":
            from actlab.sparse.allocate import greedy_levels

            tune = _calibration_docs(model, texts, min(tune_tokens, tokens))
            out.info["levels"] = {}
        for i in layers:
            levels = {u: float(sparsity) if u in units else 0.0 for u in ("attn.in", "attn.o", "mlp.in", "mlp.hidden")}
            if allocation == "greedy":
                levels.update(greedy_levels(model, method, tune, i, sparsity, out, units))
                out.info["levels"][i] = levels
            _attn_thresholds(model, method, docs, i, levels, out)
            acts = _inputs(model, docs, [i], out)
            out.tensors.update(_layer(method, model, i, acts[i], levels))
    out.info["tokens"] = int(next(iter(acts.values())).shape[0])
    out.tensors = {k: v.float().contiguous() for k, v in out.tensors.items()}
    return out
