"""The one likelihood loop: next-token negative log-likelihood of continuations given their prompts.

Perplexity, adapter training (its loss and held-out loss) and preference scores all call
``token_nll``. An example is ``(prompt ids, target ids)``: the loss counts the target tokens only.
Prompts are left-padded and targets right-padded, so every prompt ends at the same column, exactly
as ``Model.generate`` lays a batch out; with ``prompt_length_known`` the hooks are told where the
prompts end, so edits with ``positions="generated"`` act on the same tokens as at generation time.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from actlab.engine.batching import encode_pair
from actlab.engine.config import positive_int
from actlab.engine.grad import grad_mode
from actlab.errors import ActlabError

Example = tuple[list[int], list[int]]  # (prompt ids — no loss, target ids — loss)


class LanguageModel(Protocol):
    """What the loop needs: an actlab ``Model`` is one; ``hooks`` may be None (a bare HF model)."""

    hf: torch.nn.Module
    pad_token_id: int
    hooks: object

    def forward_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict: ...


def layout(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """ids, mask, labels (-100 = no loss) with every prompt ending at column P (left-pad prompt, right-pad rest)."""
    P = max(len(p) for p, _ in examples)
    C = max(len(c) for _, c in examples)
    n = len(examples)
    ids = torch.full((n, P + C), pad_id, dtype=torch.long)
    mask = torch.zeros((n, P + C), dtype=torch.long)
    labels = torch.full((n, P + C), -100, dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        if p:
            ids[i, P - len(p) : P] = torch.tensor(p)
            mask[i, P - len(p) : P] = 1
        ids[i, P : P + len(c)] = torch.tensor(c)
        mask[i, P : P + len(c)] = 1
        labels[i, P : P + len(c)] = torch.tensor(c)
        if not p:
            labels[i, P] = -100  # nothing real precedes the first token
    return ids, mask, labels, P


def _batch_nll(model: LanguageModel, examples: Sequence[Example], prompt_length_known: bool) -> tuple[torch.Tensor, int]:
    ids, mask, labels, P = layout(examples, model.pad_token_id)
    hooks = getattr(model, "hooks", None)
    where = hooks.prompt_length(P if prompt_length_known else None) if hooks is not None else nullcontext()
    with where:
        logits = model.hf(**model.forward_inputs(ids, mask)).logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)  # where the logits are (a split model's last device, or its first)
    scored = targets != -100
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                          reduction="none").view_as(targets)
    return nll[scored].sum(), int(scored.sum())


def token_nll(model: LanguageModel, examples: Sequence[Example], *, batch_size: int, prompt_length_known: bool,
              grad: bool = False) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (nats) over the target tokens of ``examples``, and their count.

    Batches of ``batch_size`` in the given order; any active edits apply. With ``grad`` the sum stays
    in the autograd graph (float32); without, it is accumulated in float64 on the CPU.
    """
    positive_int(batch_size, "batch_size")
    if not examples:
        raise ActlabError("no examples to score: give at least one (prompt, target) pair")
    total: torch.Tensor | float = 0.0
    count = 0
    with grad_mode(grad):
        for i in range(0, len(examples), batch_size):
            loss, n = _batch_nll(model, examples[i : i + batch_size], prompt_length_known)
            total = total + loss if grad else total + float(loss)
            count += n
    if not grad:
        total = torch.tensor(total, dtype=torch.float64)
    return total, count


def mean_nll(model: LanguageModel, examples: Sequence[Example], *, batch_size: int,
             prompt_length_known: bool) -> float:
    """Mean next-token loss per target token (nats), without gradients."""
    total, count = token_nll(model, examples, batch_size=batch_size, prompt_length_known=prompt_length_known)
    return float(total) / max(1, count)


# ------------------------------------------------------------------------------ data
def _texts_or_pairs(data) -> tuple[str, list]:
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise ActlabError("data must be a list of texts or a list of (prompt, completion) pairs")
    items = list(data)
    if not items:
        raise ActlabError("no training data: give at least one text or (prompt, completion) pair")
    if all(isinstance(x, str) for x in items):
        return "texts", items
    pairs = []
    for i, x in enumerate(items):
        if isinstance(x, dict) and "prompt" in x and "completion" in x:
            x = (x["prompt"], x["completion"])
        if not (isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, str) for v in x)):
            raise ActlabError(f"training example {i} is {type(x).__name__} {str(x)[:40]!r}: data must be all texts "
                              "or all (prompt, completion) pairs of strings")
        pairs.append((x[0], x[1]))
    return "pairs", pairs


def encode_lm_data(model, data, *, max_tokens: int = 128) -> tuple[str, list[Example]]:
    """Tokenise texts or (prompt, completion) pairs into (prompt ids, target ids) examples.

    Returns ``("texts" | "pairs", examples)``. Texts become ``([], ids)`` (every token but the first
    is scored); pairs are encoded by ``encode_pair`` within the model's context.
    """
    kind, items = _texts_or_pairs(data)
    if model.tokenizer is None:
        raise ActlabError("this model has no tokenizer: load it with tokenizer=... to train on texts")
    out: list[Example] = []
    for i, item in enumerate(items):
        prompt, completion = ("", item) if kind == "texts" else item
        p, c = encode_pair(model.tokenizer, prompt, completion, max_length=model.max_length, max_continuation=max_tokens)
        if kind == "texts" and len(c) < 2:
            raise ActlabError(f"training text {i} has {len(c)} token(s); the loss needs at least 2: {item[:40]!r}")
        if kind == "pairs" and not c:
            raise ActlabError(f"training pair {i} has an empty completion after tokenisation: {completion[:40]!r}")
        if kind == "pairs" and not p and len(c) < 2:
            raise ActlabError(f"training pair {i} has no prompt and a one-token completion; nothing to predict")
        out.append((p, c))
    return kind, out
