"""Attention projections through the sparse kernel: the q/k/v input (``attn.in.{i}``, the attention's input) and
the output projection's input (``attn.o.{i}``, the heads' concatenated outputs), as TEAL sparsifies them.

Each projection of ``model.anatomy.attn_parts(i)`` (fused or separate, GPT-2's transposed ``c_attn`` included) is
copied to input-major float32 once and run by ``SparseLinear`` *instead of* its module
(``anatomy.override_projection``): at decode (at most ``max_rows`` token rows) through the kernel, longer calls
(prefill) through the module's own forward on the input with the same zeros. q, k and v share one threshold (they
read the same vector), so each skips the same channels. There is no site at these inputs: calibration records
them with ``record_input`` and the exactness reference is ``same_zeros``, the dense modules given the masks a
traced sparse run chose.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from actlab.errors import ActlabError
from actlab.sparse.kernel import input_major, sparse_matvec

__all__ = ["ATTN_INPUTS", "SparseLinear", "attention_linears", "record_input", "same_zeros", "input_width",
           "input_weights"]

ATTN_INPUTS = ("attn.in", "attn.o")  # threshold names: f"{kind}.{layer}"


def _projections(model, kind: str, layer: int):
    parts = model.anatomy.attn_parts(layer)
    return parts.qkv if kind == "attn.in" else (parts.o,)


def input_width(model, name: str) -> int:
    """The width of the input a threshold name (``attn.in.3``) covers."""
    kind, layer = name.rsplit(".", 1)
    return int(_projections(model, kind, int(layer))[0].weight.shape[1])


def input_weights(model, kind: str, layer: int) -> torch.Tensor:
    """The weights that read one attention input, stacked ``[out, in]`` (q | k | v for ``attn.in``)."""
    return torch.cat([p.weight for p in _projections(model, kind, layer)])


@dataclass
class SparseLinear:
    """``fn(x, dense)`` for ``anatomy.override_projection``: ``x`` with ``|x_j| <= threshold_j`` zeroed, times the
    projection, through the kernel for calls of at most ``max_rows`` rows."""

    name: str  # the threshold's name, e.g. "attn.o.2"
    weight: torch.Tensor  # [out, in], the projection's (a view)
    bias: torch.Tensor | None
    threshold: torch.Tensor
    threads: int = 1
    max_rows: int | None = 1
    trace: list | None = None  # keep masks of each call, when a list
    kept: int = 0
    total: int = 0
    weight_t: torch.Tensor | None = None  # [in, out] input-major float32, built at the first kernel call

    def input_major(self) -> "SparseLinear":
        if self.weight_t is None:
            self.weight_t = input_major(self.weight)
        return self

    def __call__(self, x: torch.Tensor, dense) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.max_rows is None or rows.shape[0] <= self.max_rows:
            count: list[int] = []
            y = sparse_matvec(rows.to("cpu", torch.float32), self.input_major().weight_t, self.threshold, self.bias,
                              threads=self.threads, count=count)
            kept = count[0]
            y = y.view(*x.shape[:-1], y.shape[-1]).to(x.device, x.dtype)
            keep = None
        else:
            keep = x.abs() > self.threshold.to(x.device, x.dtype)
            y, kept = dense(torch.where(keep, x, torch.zeros_like(x))), int(keep.sum())
        self.kept, self.total = self.kept + kept, self.total + rows.numel()
        if self.trace is not None:
            self.trace.append(keep if keep is not None else x.abs() > self.threshold.to(x.device, x.dtype))
        return y

    def sparsity(self) -> float:
        return 1 - self.kept / self.total if self.total else float("nan")


def attention_linears(model, thresholds, *, threads: int = 1, max_rows: int | None = 1,
                      trace: dict | None = None) -> list[tuple[object, SparseLinear]]:
    """(projection, SparseLinear) for every attention input the thresholds cover; ``trace[(name, k)]`` gets the keep
    masks of projection k of that input."""
    out = []
    for name, thr in sorted(thresholds.tensors.items()):
        kind, layer = name.rsplit(".", 1)
        if kind not in ATTN_INPUTS:
            continue
        for k, proj in enumerate(_projections(model, kind, int(layer))):
            bias = None if proj.bias is None else proj.bias.detach().float().cpu().contiguous()
            fn = SparseLinear(name, proj.weight, bias, thr.detach().float().cpu().contiguous(), threads,
                              max_rows, None if trace is None else trace.setdefault((name, k), []))
            out.append((proj, fn))
    return out


@contextmanager
def record_input(model, kind: str, layer: int):
    """Inside: every call of block ``layer``'s ``kind`` input (its first projection) is appended to the yielded list
    as float32 on the CPU, shaped as the module got it; the projection runs densely."""
    got: list[torch.Tensor] = []
    proj = _projections(model, kind, layer)[0]

    def fn(x, dense):
        got.append(x.detach().float().cpu())
        return dense(x)

    with model.anatomy.override_projection(proj, fn):
        yield got


@contextmanager
def same_zeros(model, trace: dict):
    """The dense model with exactly the zeros a traced sparse run chose (``splice(..., trace=...)``): the MLP's as
    engine edits (``mlp.mask_edits``), the attention's as overrides running each module on its masked input."""
    from actlab.sparse.mlp import mask_edits

    with ExitStack() as stack:
        stack.enter_context(model.edit(*mask_edits({k: v for k, v in trace.items() if isinstance(k, int)})))
        for key, masks in trace.items():
            if isinstance(key, int):
                continue
            name, k = key
            kind, layer = name.rsplit(".", 1)
            pending = list(masks)

            def fn(x, dense, pending=pending, name=name):
                if not pending:
                    raise ActlabError(f"same_zeros at {name}: more forward calls than recorded masks")
                keep = pending.pop(0).view(x.shape).to(x.device)
                return dense(torch.where(keep, x, torch.zeros_like(x)))

            stack.enter_context(model.anatomy.override_projection(_projections(model, kind, int(layer))[k], fn))
        yield
