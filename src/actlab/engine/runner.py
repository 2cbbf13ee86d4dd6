"""The Runner: batch documents, run the model under no_grad, send selected activations to sinks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from actlab.engine.batch import Sink, TokenBatch
from actlab.engine.batching import LongDocs, Positions, Row, batches, pad, selection_mask, tokenize_documents
from actlab.engine.hooks import ForwardState, StopForward
from actlab.engine.progress import progress_bar


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


def plan_rows(model, docs, *, max_length: int | None = None, long_docs: LongDocs = "chunk", doc_offset: int = 0) -> list[Row]:
    """Rows the runner will execute: exposed so resumable writers can plan shard boundaries."""
    return tokenize_documents(
        model.tokenizer, docs, max_length=max_length or model.max_length, long_docs=long_docs, doc_offset=doc_offset
    )


def run(
    model,
    docs: Sequence[str] | Sequence[Sequence[int]] | None = None,
    sites: str | Sequence[str] = "resid.*",
    sinks: Sink | Sequence[Sink] = (),
    *,
    rows: list[Row] | None = None,
    positions: Positions = "all",
    batch_size: int = 8,
    max_length: int | None = None,
    long_docs: LongDocs = "chunk",
    doc_offset: int = 0,
    progress: bool = False,
    description: str = "running",
    on_batch: Callable[[list[Row], TokenBatch], None] | None = None,
    stop_early: bool = True,
) -> RunSummary:
    """Run ``model`` over documents and stream the activations of ``sites`` into ``sinks``.

    Rows are right-padded; only real tokens chosen by ``positions`` reach the sinks, flattened in
    document order (see TokenBatch). The forward stops after the last requested site has been
    read, so recording early layers does not pay for the rest of the model.
    """
    sink_list = [sinks] if hasattr(sinks, "consume") else list(sinks)
    site_names = model.resolve(sites)
    if rows is None:
        rows = plan_rows(model, docs, max_length=max_length, long_docs=long_docs, doc_offset=doc_offset)
    pad_id = model.pad_token_id
    collected: dict[str, torch.Tensor] = {}
    current: dict = {}

    def reader(site: str, h: torch.Tensor, state: ForwardState) -> None:
        sel = current["sel"]
        collected[site] = h[sel.to(h.device)].detach().to("cpu", copy=True)
        if stop_early and len(collected) == len(site_names):
            raise StopForward

    handles = [model.hooks.add_reader(site, reader) for site in site_names]
    n_tokens = n_selected = 0
    start_time = time.perf_counter()
    total_tokens = sum(len(r.ids) for r in rows)
    try:
        with torch.no_grad(), progress_bar(description, total_tokens, enabled=progress) as bar:
            for batch_rows in batches(rows, batch_size):
                ids, mask = pad([r.ids for r in batch_rows], pad_id, side="right")
                sel = selection_mask(batch_rows, ids.shape[1], positions)
                current["sel"] = sel
                collected.clear()
                try:
                    model.hf(**model.forward_inputs(ids, mask))
                except StopForward:
                    pass
                doc_ids = torch.tensor([r.doc_id for r in batch_rows]).unsqueeze(1).expand_as(sel)
                pos = torch.tensor([r.start for r in batch_rows]).unsqueeze(1) + torch.arange(ids.shape[1])
                batch = TokenBatch(
                    acts={s: collected[s] for s in site_names},
                    token_ids=ids[sel],
                    doc_ids=doc_ids[sel],
                    positions=pos[sel],
                )
                for sink in sink_list:
                    sink.consume(batch)
                if on_batch is not None:
                    on_batch(batch_rows, batch)
                n_tokens += int(mask.sum())
                n_selected += batch.n_tokens
                bar.advance(int(mask.sum()))
    finally:
        for handle in handles:
            handle.remove()
    return RunSummary(
        n_documents=len({r.doc_id for r in rows}),
        n_rows=len(rows),
        n_tokens=n_tokens,
        n_selected=n_selected,
        seconds=time.perf_counter() - start_time,
    )
