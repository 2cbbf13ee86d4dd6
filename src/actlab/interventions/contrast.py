"""Contrast sets: the positive / negative examples a steering vector is fitted on.

Two forms: two plain lists of texts (unpaired), or pairs sharing a prompt
(``{"prompt", "pos", "neg"}`` JSONL rows). Activations are aggregated per example by the
**mean over the example's tokens** (for pairs: over the completion tokens only, so the shared
prompt cancels), or at the **last token** (``aggregate="last"``, CAA's choice for A/B answers).
The mean is the default because genre and style live in every token of a passage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from actlab.engine.batching import encode_pair
from actlab.errors import ActlabError
from actlab.models.inputs import text_list

Aggregate = Literal["mean", "last"]


@dataclass
class ContrastSet:
    pos: list[str]
    neg: list[str]
    prompts: list[str] | None = None  # shared prompt of each pair (paired sets only)

    @property
    def paired(self) -> bool:
        return self.prompts is not None

    def validate(self) -> None:
        self.pos = text_list(self.pos, "pos", single_ok=False)
        self.neg = text_list(self.neg, "neg", single_ok=False)
        if self.prompts is not None:
            self.prompts = text_list(self.prompts, "prompts", single_ok=False)
        if not self.pos or not self.neg:
            raise ActlabError(
                f"empty contrast set: {len(self.pos)} positive and {len(self.neg)} negative examples; give at least one of each"
            )
        if self.paired and not (len(self.pos) == len(self.neg) == len(self.prompts)):
            raise ActlabError(f"unbalanced pairs: {len(self.pos)} positives, {len(self.neg)} negatives, "
                              f"{len(self.prompts)} prompts; every pair needs a prompt, a pos and a neg")


def read_contrast(pos: str | Path, neg: str | Path | None = None) -> ContrastSet:
    """Read ``--pos FILE --neg FILE`` (texts) or one JSONL file of pairs (``--pos pairs.jsonl``)."""
    from actlab.io import read_documents, read_records

    if neg is None:
        path = Path(pos)
        if path.suffix != ".jsonl":
            raise ActlabError("give --neg FILE too, or a JSONL file of pairs with 'prompt', 'pos' and 'neg' fields")
        rows = read_records(path, ("pos", "neg"), ("prompt",))
        contrast = ContrastSet([r["pos"] for r in rows], [r["neg"] for r in rows], [r["prompt"] for r in rows])
    else:
        contrast = ContrastSet(list(read_documents(pos)), list(read_documents(neg)))
    contrast.validate()
    return contrast


def example_activations(
    model, texts: Sequence[str], sites: Sequence[str], *, prompts: Sequence[str] | None = None,
    aggregate: Aggregate = "mean", batch_size: int = 16, max_tokens_per_text: int | None = 128,
) -> dict[str, torch.Tensor]:
    """One activation per example and site: ``{site: [n_examples, width]}`` (float32)."""
    if aggregate not in ("mean", "last"):
        raise ActlabError(f"aggregate must be 'mean' or 'last', not {aggregate!r}")
    docs: list[list[int]] = []
    starts: list[int] = []
    for i, text in enumerate(texts):
        prompt = prompts[i] if prompts is not None else ""
        # no length limit: the runner splits an over-long example into windows
        p, c = encode_pair(model.tokenizer, prompt, text, max_length=None, max_continuation=max_tokens_per_text)
        if not c:
            raise ActlabError(f"example {i} has no tokens after its prompt: {text[:40]!r}")
        docs.append(p + c)
        starts.append(len(p))
    positions = "last" if aggregate == "last" else "all"
    batch = model.collect(docs, sites, positions=positions, batch_size=batch_size)
    out: dict[str, torch.Tensor] = {}
    for site in sites:
        acts = batch.acts[site].float()
        if aggregate == "last":
            out[site] = acts
            continue
        keep = batch.positions >= torch.tensor(starts)[batch.doc_ids]
        sums = torch.zeros(len(docs), acts.shape[1]).index_add_(0, batch.doc_ids[keep], acts[keep])
        counts = torch.bincount(batch.doc_ids[keep], minlength=len(docs)).clamp_min(1).unsqueeze(1)
        out[site] = sums / counts
    return out
