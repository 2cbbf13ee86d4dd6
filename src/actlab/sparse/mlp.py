"""A block's MLP through the sparse kernel, spliced into the model with the engine's ``Replace``.

``SparseMLP`` computes ``mlp.{i}`` from ``mlp.in.{i}`` as the model does, with two thresholds per
channel (``actlab.sparse.thresholds``): the MLP input channels with ``|x_j| <= t_in,j`` are skipped by
the gate and up projections (one kernel call over their input-major concatenation ``[d_model, 2 d_mlp]``),
and the hidden neurons with ``|h_j| <= t_hid,j`` by the down projection (CATS: the neurons whose
activated gate ``|act(g_j)| <= t_hid,j``). The weights, biases and activation come from
``model.anatomy.mlp_parts(i)`` and are copied to input-major float32 once, at the first kernel call (or
``SparseSplice.input_major()``; a prefill or a calibration pass, dense, never needs the copies), so
every mapped architecture with a gated or plain MLP works; Gemma 2/3's post-feedforward norm
(``anatomy.post_mlp_norm``) is applied after it.

The kernel runs for calls of at most ``max_rows`` token rows (decode: one token per sequence; default 1);
longer calls (a prompt's prefill) take dense torch with the same zeros, which is what a matrix-matrix
product does best. Either way the result is ``dense MLP with the same zeros`` up to float32 rounding;
``zero_edits`` are those zeros as plain engine edits on the dense model, the reference of the tests
and of ``actlab sparse eval``'s exactness check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F

from actlab.engine.edits import Replace
from actlab.errors import ActlabError
from actlab.sparse.kernel import input_major, sparse_matvec

__all__ = ["SparseMLP", "SparseSplice", "KeepMask", "ThresholdZero", "splice", "sparse_edits", "zero_edits",
           "mask_edits", "measured_sparsity"]


@dataclass
class _Counts:
    kept_in: int = 0
    total_in: int = 0
    kept_hidden: int = 0
    total_hidden: int = 0

    def sparsity(self, which: str) -> float:
        kept, total = (self.kept_in, self.total_in) if which == "in" else (self.kept_hidden, self.total_hidden)
        return 1 - kept / total if total else float("nan")


@dataclass
class SparseMLP:
    """``fn(mlp.in.i) -> mlp.i`` of one block with the input and hidden channels below their thresholds skipped."""

    layer: int
    first: torch.Tensor | None  # [d_model, d_mlp] or [d_model, 2 d_mlp] (gate | up), input-major; built on first use
    first_bias: torch.Tensor | None
    down: torch.Tensor | None  # [d_mlp, d_model], input-major; built on first use
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    gated: bool
    thr_in: torch.Tensor | None  # [d_model]; None: every nonzero input channel is kept
    thr_hidden: torch.Tensor | None  # [d_mlp]
    rule: str = "hidden"  # "hidden": |h_j| > t_j; "gate": |act(gate_j)| > t_j (CATS)
    post_norm: Callable | None = None
    threads: int = 1
    max_rows: int | None = 1
    trace: list | None = None  # when a list: (keep_in, keep_hidden) bool masks of every call are appended
    counts: _Counts = field(default_factory=_Counts)
    parts: object = None  # the anatomy's MLPParts: the [out, in] weights the dense (prefill) path multiplies by

    @classmethod
    def from_model(cls, model, layer: int, thr_in, thr_hidden, *, rule: str = "hidden", **options) -> "SparseMLP":
        parts = model.anatomy.mlp_parts(layer)
        if rule not in ("hidden", "gate"):
            raise ActlabError(f"the hidden rule is 'hidden' or 'gate' (CATS), not {rule!r}")
        weights = [parts.gate, parts.up] if parts.gated else [parts.up]
        biases = [parts.gate_bias, parts.up_bias] if parts.gated else [parts.up_bias]
        first_bias = None
        if any(b is not None for b in biases):
            first_bias = torch.cat([b if b is not None else torch.zeros(w.shape[0]) for b, w in zip(biases, weights)])
            first_bias = first_bias.detach().float().cpu().contiguous()
        vec = (lambda t: None if t is None else t.detach().float().cpu().contiguous())  # noqa: E731
        return cls(layer, None, first_bias, None, vec(parts.down_bias), parts.act, parts.gated, vec(thr_in),
                   vec(thr_hidden), rule, model.anatomy.post_mlp_norm(layer), **options, parts=parts)

    @property
    def d_mlp(self) -> int:
        return self.parts.down.shape[1]

    def _weights(self, which: str) -> list[torch.Tensor]:
        p = self.parts
        return ([p.gate, p.up] if self.gated else [p.up]) if which == "first" else [p.down]

    def input_major(self) -> "SparseMLP":
        """Build the input-major copies now (else at the first kernel call; calibration's prefill never needs them)."""
        if self.first is None:
            self.first = input_major(torch.cat(self._weights("first")))
        if self.down is None:
            self.down = input_major(self.parts.down)
        return self

    def _mv(self, x, which: str, thr, bias, kernel: bool) -> tuple[torch.Tensor, int]:
        if kernel:
            count: list[int] = []
            wt = self.input_major().first if which == "first" else self.input_major().down
            return sparse_matvec(x, wt, thr, bias, threads=self.threads, count=count), count[0]
        keep = x.abs() > (thr if thr is not None else 0.0)
        kept = torch.where(keep, x, torch.zeros_like(x))
        y = torch.cat([F.linear(kept, w.float()) for w in self._weights(which)], dim=-1)
        return (y + bias if bias is not None else y), int(keep.sum())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to("cpu", torch.float32)
        kernel = self.max_rows is None or rows.shape[0] <= self.max_rows
        first, kept_in = self._mv(rows, "first", self.thr_in, self.first_bias, kernel)
        if self.gated:
            gate, up = first.split(self.d_mlp, dim=1)
            activated = self.act(gate)
            h = activated * up
        else:
            h = activated = self.act(first)
        thr_down = self.thr_hidden
        if self.rule == "gate" and self.thr_hidden is not None:
            h = torch.where(activated.abs() > self.thr_hidden, h, torch.zeros_like(h))
            thr_down = None  # the zeros are in h: the kernel skips them
        y, kept_hidden = self._mv(h, "down", thr_down, self.down_bias, kernel)
        c = self.counts
        c.kept_in, c.total_in = c.kept_in + kept_in, c.total_in + rows.numel()
        c.kept_hidden, c.total_hidden = c.kept_hidden + kept_hidden, c.total_hidden + h.numel()
        if self.trace is not None:
            keep_h = h.abs() > (thr_down if thr_down is not None else 0.0)
            self.trace.append((rows.abs() > (self.thr_in if self.thr_in is not None else 0.0), keep_h))
        y = y.view(*x.shape[:-1], y.shape[-1]).to(x.device, x.dtype)
        return self.post_norm(y) if self.post_norm is not None else y


def sparse_edits(model, thresholds, *, threads: int = 1, max_rows: int | None = 1,
                 trace: dict | None = None) -> list[Replace]:
    """One ``Replace(mlp.i, SparseMLP)`` per layer the thresholds cover: ``with model.edit(*sparse_edits(m, t)):``.

    ``trace``, a dict, gets ``trace[layer]`` = the list of (keep_in, keep_hidden) masks of each call."""
    thresholds.check_model(model)
    edits = []
    for layer in thresholds.mlp_layers:
        thr_in, thr_hidden = thresholds.pair(layer)
        fn = SparseMLP.from_model(model, layer, thr_in, thr_hidden, rule=thresholds.rule, threads=threads,
                                  max_rows=max_rows, trace=None if trace is None else trace.setdefault(layer, []))
        edits.append(Replace(f"mlp.{layer}", fn))
    return edits


def measured_sparsity(mlps) -> dict[str, float]:
    """Sparsity each spliced input ran with, ``{"mlp.in.i": s, "mlp.hidden.i": s}``, from the calls' counts, for
    ``sparse_edits``' edits or a ``SparseSplice``."""
    out = {}
    for item in getattr(mlps, "mlps", mlps):
        fn = getattr(item, "fn", item)
        out[f"mlp.in.{fn.layer}"] = fn.counts.sparsity("in")
        out[f"mlp.hidden.{fn.layer}"] = fn.counts.sparsity("hidden")
    by_name: dict[str, list[int]] = {}
    for _, fn in getattr(mlps, "linears", []):  # q, k and v share their input's name: their counts add up
        kept, total = by_name.setdefault(fn.name, [0, 0])
        by_name[fn.name] = [kept + fn.kept, total + fn.total]
    out.update({name: 1 - kept / total if total else float("nan") for name, (kept, total) in by_name.items()})
    return out


class SparseSplice:
    """The sparse MLPs of ``splice``, in place until ``remove()`` (or the end of the ``with`` block);
    ``install()`` puts the same ones (weights already input-major) back."""

    def __init__(self, model, mlps: list[SparseMLP], linears: list | None = None):
        self.model, self.mlps, self.overridden, self._handles = model, mlps, [], []
        self.linears = linears or []  # (projection, SparseLinear) of the attention inputs

    def input_major(self) -> "SparseSplice":
        """Build every input-major weight copy now, so the first decode step does not pay for it."""
        for fn in self.mlps:
            fn.input_major()
        for _, fn in self.linears:
            fn.input_major()
        return self

    def install(self) -> "SparseSplice":
        if self._handles:
            raise ActlabError("this sparse splice is already in place; remove() it first")
        anatomy, edits = self.model.anatomy, []
        self.overridden = []
        try:
            for fn in self.mlps:
                fn.post_norm = None  # an override replaces the MLP module only: a post-norm after it still runs
                handle = anatomy.override_mlp(fn.layer, fn)
                if handle is None:
                    fn.post_norm = anatomy.post_mlp_norm(fn.layer)
                    edits.append(Replace(f"mlp.{fn.layer}", fn))
                else:
                    self._handles.append(handle)
                    self.overridden.append(fn.layer)
            if edits:
                self._handles.append(self.model.edit(*edits))
            for projection, fn in self.linears:
                self._handles.append(anatomy.override_projection(projection, fn))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "SparseSplice":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def splice(model, thresholds, *, threads: int = 1, max_rows: int | None = 1, trace: dict | None = None) -> SparseSplice:
    """The fast splice, in place when returned: where the MLP is one module (``anatomy.override_mlp``) the sparse
    MLP runs *instead* of it, so the dense MLP is not computed (its ``mlp.in`` / ``mlp.i`` hooks still run;
    ``mlp.hidden`` does not fire); elsewhere (OPT, BERT) it is ``sparse_edits``' ``Replace``, which computes the
    dense MLP too. The same numbers either way. Attention inputs the thresholds cover (``attn.in.i``, ``attn.o.i``)
    run their projections through ``attention.SparseLinear`` (``trace[(name, k)]``: projection k's masks). The
    override is process-wide (every thread running the model sees it, unlike engine edits, which are per thread):
    splice where one thread uses the model."""
    from actlab.sparse.attention import attention_linears

    thresholds.check_model(model)
    mlps = []
    for layer in thresholds.mlp_layers:
        thr_in, thr_hidden = thresholds.pair(layer)
        mlps.append(SparseMLP.from_model(model, layer, thr_in, thr_hidden, rule=thresholds.rule, threads=threads,
                                         max_rows=max_rows, trace=None if trace is None else trace.setdefault(layer, [])))
    linears = attention_linears(model, thresholds, threads=threads, max_rows=max_rows, trace=trace)
    return SparseSplice(model, mlps, linears).install()


@dataclass
class ThresholdZero:
    """Engine edit: ``h_j <- 0`` where ``|h_j| <= threshold_j`` (dense torch with the sparse path's zeros)."""

    site: str
    threshold: torch.Tensor

    def __call__(self, h: torch.Tensor, state) -> torch.Tensor:
        return torch.where(h.abs() > self.threshold.to(h.device, h.dtype), h, torch.zeros_like(h))


@dataclass
class KeepMask:
    """Engine edit: multiplies ``site`` by recorded keep masks, one per forward call, in order."""

    site: str
    masks: list

    def __call__(self, h: torch.Tensor, state) -> torch.Tensor:
        if not self.masks:
            raise ActlabError(f"KeepMask at '{self.site}': more forward calls than recorded masks")
        keep = self.masks.pop(0).view(h.shape).to(h.device)
        return torch.where(keep, h, torch.zeros_like(h))


def zero_edits(thresholds) -> list:
    """The dense model with the thresholds' zeros: ``ThresholdZero`` at ``mlp.in.i`` and ``mlp.hidden.i``
    (for CATS' gate rule the hidden zeros depend on the gate: use ``mask_edits`` of a trace)."""
    edits = []
    for layer in thresholds.mlp_layers:
        thr_in, thr_hidden = thresholds.pair(layer)
        if thr_in is not None:
            edits.append(ThresholdZero(f"mlp.in.{layer}", thr_in))
        if thr_hidden is not None and thresholds.rule == "hidden":
            edits.append(ThresholdZero(f"mlp.hidden.{layer}", thr_hidden))
    return edits


def mask_edits(trace: dict) -> list:
    """The dense model with exactly the zeros a traced sparse run chose (``sparse_edits(..., trace=...)``)."""
    edits = []
    for layer, calls in trace.items():
        if not isinstance(layer, int):  # an attention input's masks: attention.same_zeros applies those
            continue
        edits.append(KeepMask(f"mlp.in.{layer}", [k_in for k_in, _ in calls]))
        edits.append(KeepMask(f"mlp.hidden.{layer}", [k_h for _, k_h in calls]))
    return edits
