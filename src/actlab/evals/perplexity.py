"""Token-weighted perplexity of a causal language model on a list of texts (through ``token_nll``)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from actlab.engine.likelihood import token_nll
from actlab.errors import ActlabError


class _Bare:
    """A Hugging Face model seen through the likelihood loop's interface (no hooks, no position ids)."""

    hooks = None

    def __init__(self, hf, tokenizer):
        self.hf = hf
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad_id if pad_id is not None else (getattr(tokenizer, "eos_token_id", None) or 0)

    def forward_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        try:
            device = next(self.hf.parameters()).device
        except (StopIteration, AttributeError):
            device = torch.device("cpu")
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def _unwrap(model, tokenizer):
    """(runnable, hf_model, tokenizer, max_length) from an HF model + tokenizer, an actlab Model or
    anything with ``.hf`` and ``.tokenizer``."""
    from actlab.models.model import Model, context_length

    if isinstance(model, Model):
        return model, model.hf, tokenizer if tokenizer is not None else model.tokenizer, model.max_length
    hf = model.hf if hasattr(model, "hf") and hasattr(model, "tokenizer") else model
    if hf is not model and tokenizer is None:
        tokenizer = model.tokenizer
    if tokenizer is None:
        raise ActlabError(
            "perplexity needs a tokenizer: pass tokenizer=... with a Hugging Face model, "
            "or pass an actlab Model (which carries its tokenizer)"
        )
    if not callable(hf):
        raise ActlabError(f"perplexity: {type(model).__name__} is not a model (not callable)")
    return _Bare(hf, tokenizer), hf, tokenizer, context_length(getattr(hf, "config", None), tokenizer)


def token_losses(model, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None,
                 tokenizer=None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and number of predicted tokens."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ActlabError("perplexity needs at least one text; got an empty list")
    if batch_size < 1:
        raise ActlabError(f"batch_size must be >= 1, got {batch_size}")
    runnable, hf, tok, limit = _unwrap(model, tokenizer)
    limit = max_length or limit
    encoded = [tok(t, add_special_tokens=True, truncation=True, max_length=limit)["input_ids"] for t in texts]
    # longest first keeps padding small; the result does not depend on the order
    examples = [([], list(e)) for e in sorted(encoded, key=lambda e: -len(e)) if len(e) >= 2]
    if not examples:
        raise ActlabError("perplexity: every text is shorter than two tokens; nothing to predict")
    was_training = getattr(hf, "training", False)
    if hasattr(hf, "eval"):
        hf.eval()
    try:
        total, n = token_nll(runnable, examples, batch_size=batch_size, prompt_length_known=False)
    finally:
        if was_training and hasattr(hf, "train"):
            hf.train()
    return float(total), n


def perplexity(model, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None,
               tokenizer=None) -> float:
    """Token-weighted perplexity ``exp(sum NLL / number of predicted tokens)`` over ``texts``.

    ``model`` is a Hugging Face causal LM (then ``tokenizer`` is required) or an actlab ``Model``
    (anything with ``.hf`` and ``.tokenizer``). Texts are tokenized with the tokenizer's special
    tokens, truncated to ``max_length`` tokens (default: the model's context length), batched with
    right padding and an attention mask; padding positions are ignored. Active edits apply.
    """
    nll, n = token_losses(model, texts, batch_size=batch_size, max_length=max_length, tokenizer=tokenizer)
    return math.exp(nll / n)


__all__ = ["perplexity", "token_losses"]
