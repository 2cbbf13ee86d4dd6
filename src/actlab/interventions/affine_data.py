"""The affine fit's data: examples encoded once, split for early stopping, and their scored tokens.

Token activations come from the engine's runner (``select`` = the continuation tokens, ``grad`` to
keep the graph, ``device=None`` to stay on the accelerator), so the fit has no loop of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from actlab.engine.batching import Row, continuation_mask, encode_pair, pair_rows
from actlab.errors import ActlabError
from actlab.linalg import held_out_count, split_indices


@dataclass
class EncodedTexts:
    """Token ids of some examples and, per example, the first position the loss looks at."""

    ids: list[list[int]]
    starts: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int]) -> "EncodedTexts":
        return EncodedTexts([self.ids[i] for i in index], [self.starts[i] for i in index])

    def rows(self) -> list[Row]:
        """Runner rows whose ``prompt_length`` marks the unscored prompt."""
        return pair_rows([(ids[:start], ids[start:]) for ids, start in zip(self.ids, self.starts)])


def encode_texts(model, texts: Sequence[str], prompts: Sequence[str] | None = None,
                 max_tokens_per_text: int | None = 64) -> EncodedTexts:
    """Tokenise like ``example_activations``: prompt (with special tokens) + text, prompt excluded."""
    if model.tokenizer is None:
        raise ActlabError("this model has no tokenizer: load it with tokenizer=... to fit on texts")
    ids_all, starts = [], []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ActlabError(f"example {i} is a {type(text).__name__}, not a string")
        prompt = prompts[i] if prompts is not None else ""
        p, c = encode_pair(model.tokenizer, prompt, text, max_length=model.max_length,
                           max_continuation=max_tokens_per_text)
        if not c:
            raise ActlabError(f"example {i} has no tokens after its prompt: {text[:40]!r}")
        ids_all.append(p + c)
        starts.append(len(p))
    return EncodedTexts(ids_all, starts)


def site_tokens(model, enc: EncodedTexts, sites: Sequence[str], *, grad: bool,
                batch_size: int = 32) -> dict[str, torch.Tensor]:
    """``{site: [n_tokens, width]}`` float32 activations of the examples' scored tokens.

    Any edits active on the model apply. With ``grad`` the tensors stay in the autograd graph and on
    the model's device; without, they are detached and on the CPU. The forward stops after the last site.
    """
    batch = model.collect(None, list(sites), rows=enc.rows(), select=continuation_mask, batch_size=batch_size,
                          grad=grad, device=None if grad else "cpu")
    return {s: batch.acts[s].float() for s in sites}


def holdout(n: int, val_fraction: float, gen: torch.Generator, min_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held-out) indices in random order: ``val_fraction`` of ``n`` held out, none when ``n < min_n``."""
    return split_indices(n, held_out_count(n, val_fraction, min_n=min_n), gen, sort=False)


def split_sorted(n: int, val_fraction: float, gen: torch.Generator, min_n: int = 5) -> tuple[list[int], list[int]]:
    """``holdout`` with each part in reading order."""
    kept, held = holdout(n, val_fraction, gen, min_n)
    return sorted(kept.tolist()), sorted(held.tolist())
