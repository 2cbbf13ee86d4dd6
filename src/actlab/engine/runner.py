"""The Runner: batch documents, run the model, send the selected activations to sinks.

It is the one loop that reads activations: recording, statistics, profiles, and the fitters that
need activations with gradients (``grad=True``) or kept on the accelerator (``device=None``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from actlab.engine.memory import retain_freed_memory
from actlab.engine.batch import Sink, TokenBatch
from actlab.engine.batching import (
    LongDocs,
    Positions,
    Row,
    Selector,
    batches,
    check_token_range,
    pad,
    selection_mask,
    tokenize_documents,
)
from actlab.engine.config import Config, positive_int
from actlab.engine.grad import grad_mode
from actlab.engine.hooks import ForwardState, StopForward
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError


@dataclass
class RunSummary:
    n_documents: int
    n_rows: int
    n_tokens: int  # tokens run through the model
    n_selected: int  # tokens sent to the sinks
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class RunOptions(Config):
    """How ``run`` batches, selects and hands over activations.

    ``positions``: "all", "last" or a (start, stop) span of document positions; ``select``: a
    ``(rows, width) -> [batch, width] bool`` selection that overrides ``positions``. ``grad``: keep
    the activations in the autograd graph (no detach, gradients enabled). ``device``: where the
    sinks get the activations ("cpu" copies them there; None leaves them on the model's device).
    ``stop_early``: skip the rest of the model once every site is read.
    """

    positions: Positions = "all"
    select: Selector | None = None
    batch_size: int = 8
    max_length: int | None = None
    long_docs: LongDocs = "chunk"
    doc_offset: int = 0
    grad: bool = False
    device: str | torch.device | None = "cpu"
    stop_early: bool = True
    progress: bool = False
    description: str = "running"
    on_batch: Callable[[list[Row], TokenBatch], None] | None = None

    def validate(self) -> None:
        positive_int(self.batch_size, "batch_size")
        if self.max_length is not None:
            positive_int(self.max_length, "max_length")
        if isinstance(self.doc_offset, bool) or not isinstance(self.doc_offset, int) or self.doc_offset < 0:
            raise ActlabError(f"doc_offset must be a non-negative integer, not {self.doc_offset!r}")
        if self.long_docs not in ("chunk", "truncate"):
            raise ActlabError(f"long_docs must be 'chunk' or 'truncate', not {self.long_docs!r}")
        check_positions(self.positions)
        for name in ("select", "on_batch"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ActlabError(f"{name} must be a callable or None, not {type(value).__name__}")
        if self.device is not None:
            check_device(self.device)


def check_positions(positions) -> None:
    """``positions`` is "all", "last" or a (start, stop) span of integers or None."""
    if positions in ("all", "last") and isinstance(positions, str):
        return
    if isinstance(positions, tuple) and len(positions) == 2 and all(
            p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in positions):
        return
    raise ActlabError(f"positions must be 'all', 'last' or a (start, stop) span of integers, not {positions!r}")


def check_device(device) -> torch.device:
    """A device torch understands and this machine has (cpu, cuda[:N], mps, xpu), else an ActlabError."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
        raise ActlabError(f"device must be a string such as 'cpu' or 'cuda:0', or a torch.device, not {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ActlabError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type not in ("cuda", "mps", "xpu"):
        raise ActlabError(f"device type {dev.type!r} is not supported; use cpu, cuda, cuda:N or mps")
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}[dev.type]
    if backend is None or not backend.is_available():
        why = " (this torch is built without CUDA)" if dev.type == "cuda" and torch.version.cuda is None else ""
        raise ActlabError(f"device {str(device)!r} is not available on this machine{why}; use cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise ActlabError(f"device {str(device)!r} does not exist: this machine has {count} {dev.type} device(s), "
                          f"{dev.type}:0 to {dev.type}:{count - 1}")
    return dev


def check_sinks(sinks) -> list:
    """The sinks as a list; each must have a ``consume(batch)`` method."""
    sink_list = [sinks] if hasattr(sinks, "consume") else sinks
    if isinstance(sink_list, (str, bytes, dict)) or not hasattr(sink_list, "__iter__"):
        raise ActlabError(f"sinks must be a sink (an object with consume(batch)) or a list of them, not "
                          f"{type(sinks).__name__}")
    sink_list = list(sink_list)
    for i, sink in enumerate(sink_list):
        if not callable(getattr(sink, "consume", None)):
            raise ActlabError(f"sinks[{i}] ({type(sink).__name__}) has no consume(batch) method: a sink takes each "
                              "TokenBatch through consume")
    return sink_list


def plan_rows(model, docs, *, max_length: int | None = None, long_docs: LongDocs = "chunk", doc_offset: int = 0) -> list[Row]:
    """Rows the runner will execute: exposed so resumable writers can plan shard boundaries.

    Token ids outside the model's vocabulary are refused here, before any work (or any store) is made."""
    if max_length is not None:
        positive_int(max_length, "max_length")
    rows = tokenize_documents(
        model.tokenizer, docs, max_length=max_length or model.max_length, long_docs=long_docs, doc_offset=doc_offset
    )
    check_token_range(min(min(r.ids) for r in rows), max(max(r.ids) for r in rows), model.vocab_size)
    return rows


class _Reader:
    """Takes the selected tokens of every site of one forward pass; stops the model after the last site."""

    def __init__(self, sites: list[str], opts: RunOptions):
        self.sites = sites
        self.opts = opts
        self.sel: torch.Tensor | None = None
        self.every_token = False  # sel is all true (no padding, every position): rows are the flattened batch
        self.copy_always = False  # set once the model was seen changing a read tensor in place (see ``changed``)
        self.collected: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}

    def __call__(self, site: str, h: torch.Tensor, state: ForwardState) -> None:
        if self.every_token and not self.copy_always:
            # every token is taken: the rows are the tensor itself, flattened (a view, no copy); its version
            # counter tells afterwards whether the rest of the forward changed it in place (``changed``)
            taken = h.reshape(-1, h.shape[-1])
            self.versions[site] = taken._version
        elif self.every_token:  # a contiguous copy is ~2x cheaper than indexing by an all-true mask
            taken = h.reshape(-1, h.shape[-1]).clone()
        else:
            taken = h[self.sel.to(h.device)]
        if not self.opts.grad:
            taken = taken.detach()
        if self.opts.device is not None:  # indexing by a tensor already copied: no second copy on the same device
            taken = taken.to(self.opts.device)
        self.collected[site] = taken
        if self.opts.stop_early and len(self.collected) == len(self.sites):
            raise StopForward

    def changed(self) -> bool:
        """Whether a tensor read as a view was modified in place later in the forward (its rows are then not
        the site's values any more)."""
        return any(self.collected[s]._version != v for s, v in self.versions.items() if s in self.collected)

    def batch(self, rows: list[Row], ids: torch.Tensor) -> TokenBatch:
        missing = [s for s in self.sites if s not in self.collected]
        if missing:
            raise ActlabError(f"the forward pass never reached site(s) {', '.join(missing)}")
        sel = self.sel
        doc_ids = torch.tensor([r.doc_id for r in rows]).unsqueeze(1).expand_as(sel)
        pos = torch.tensor([r.start for r in rows]).unsqueeze(1) + torch.arange(ids.shape[1])
        return TokenBatch(acts={s: self.collected[s] for s in self.sites}, token_ids=ids[sel],
                          doc_ids=doc_ids[sel], positions=pos[sel])


def _forward(model, reader: _Reader, rows: list[Row]) -> tuple[TokenBatch, int]:
    """One padded batch through the model; the batch for the sinks and its number of real tokens."""
    opts = reader.opts
    ids, mask = pad([r.ids for r in rows], model.pad_token_id, side="right")
    if opts.select is None:
        sel = selection_mask(rows, ids.shape[1], opts.positions)
    else:
        sel = torch.as_tensor(opts.select(rows, ids.shape[1]))
        if sel.shape != ids.shape:
            raise ActlabError(f"select returned a mask of shape {tuple(sel.shape)}; it must be [rows, width] = "
                              f"{tuple(ids.shape)}")
    reader.sel = sel.to(torch.bool) & mask.bool()  # padding never reaches the sinks
    reader.every_token = bool(reader.sel.all())
    for attempt in range(2):
        reader.collected, reader.versions = {}, {}
        try:
            model.hf(**model.forward_inputs(ids, mask))
        except StopForward:
            pass
        if not reader.changed():
            break
        reader.copy_always = True  # this model edits a read tensor in place: copy from now on, and redo this batch
    return reader.batch(rows, ids), int(mask.sum())


def run(
    model,
    docs: Sequence[str] | Sequence[Sequence[int]] | None = None,
    sites: str | Sequence[str] = "resid.*",
    sinks: Sink | Sequence[Sink] = (),
    *,
    rows: list[Row] | None = None,
    options: RunOptions | None = None,
    **overrides,
) -> RunSummary:
    """Run ``model`` over documents (or planned ``rows``) and stream the activations of ``sites`` into ``sinks``.

    Options (see ``RunOptions``) come as ``options=`` and/or keywords: ``positions``, ``select``,
    ``batch_size``, ``max_length``, ``long_docs``, ``doc_offset``, ``grad``, ``device``, ``stop_early``,
    ``progress``, ``description``, ``on_batch``. Rows are right-padded; only real tokens chosen by
    ``positions`` (or ``select``) reach the sinks, flattened in document order (see TokenBatch). The
    forward stops after the last requested site has been read, so recording early layers does not
    pay for the rest of the model. Any edits active on the model apply.
    """
    opts = RunOptions.with_overrides(options, overrides)
    retain_freed_memory()  # batch after batch of fresh activations: reuse freed pages (engine/memory.py)
    sink_list = check_sinks(sinks)
    site_names = model.resolve(sites)
    if rows is None and docs is None:
        raise ActlabError("nothing to run: pass docs (texts or token-id lists) or rows= (from plan_rows)")
    if rows is not None and not (isinstance(rows, list) and all(isinstance(r, Row) for r in rows) and rows):
        raise ActlabError("rows must be a non-empty list of Rows, as plan_rows returns")
    if rows is None:
        rows = plan_rows(model, docs, max_length=opts.max_length, long_docs=opts.long_docs, doc_offset=opts.doc_offset)
    reader = _Reader(site_names, opts)
    handles = [model.hooks.add_reader(site, reader) for site in site_names]
    n_tokens = n_selected = 0
    start_time = time.perf_counter()
    try:
        with grad_mode(opts.grad), progress_bar(opts.description, sum(len(r.ids) for r in rows),
                                                enabled=opts.progress) as bar:
            for batch_rows in batches(rows, opts.batch_size):
                batch, n_real = _forward(model, reader, batch_rows)
                for sink in sink_list:
                    sink.consume(batch)
                if opts.on_batch is not None:
                    opts.on_batch(batch_rows, batch)
                n_tokens += n_real
                n_selected += batch.n_tokens
                bar.advance(n_real)
    finally:
        for handle in handles:
            handle.remove()
    return RunSummary(n_documents=len({r.doc_id for r in rows}), n_rows=len(rows), n_tokens=n_tokens,
                      n_selected=n_selected, seconds=time.perf_counter() - start_time)

