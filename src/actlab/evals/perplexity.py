"""Token-weighted perplexity of a causal language model on a list of texts."""

from __future__ import annotations

import math
from typing import Sequence

from actlab.errors import ActlabError


def _unwrap(model, tokenizer):
    """(hf_model, tokenizer) from an HF model + tokenizer, or an object with ``.hf`` and ``.tokenizer``."""
    if hasattr(model, "hf") and hasattr(model, "tokenizer"):
        hf = model.hf
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    else:
        hf = model
    if tokenizer is None:
        raise ActlabError(
            "perplexity needs a tokenizer: pass tokenizer=... with a Hugging Face model, "
            "or pass an actlab Model (which carries its tokenizer)"
        )
    if not callable(hf):
        raise ActlabError(f"perplexity: {type(model).__name__} is not a model (not callable)")
    return hf, tokenizer


def token_losses(model, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None,
                 tokenizer=None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and number of predicted tokens."""
    import torch

    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ActlabError("perplexity needs at least one text; got an empty list")
    if batch_size < 1:
        raise ActlabError(f"batch_size must be >= 1, got {batch_size}")
    from actlab.engine.batching import pad

    hf, tok = _unwrap(model, tokenizer)
    if max_length is None:
        cfg = getattr(hf, "config", None)
        cfg = getattr(cfg, "text_config", None) or cfg
        max_length = (getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
                      or getattr(tok, "model_max_length", None) or 1024)
        if max_length > 1_000_000:
            max_length = 1024
    pad_id = getattr(tok, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tok, "eos_token_id", None) or 0
    try:
        device = next(hf.parameters()).device
    except (StopIteration, AttributeError):
        device = torch.device("cpu")

    encoded = [tok(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    # longest first keeps padding small; the result does not depend on the order
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    total_nll, total_tokens = 0.0, 0
    was_training = getattr(hf, "training", False)
    if hasattr(hf, "eval"):
        hf.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(order), batch_size):
                seqs = [encoded[i] for i in order[b : b + batch_size]]
                seqs = [s for s in seqs if len(s) >= 2]
                if not seqs:
                    continue
                ids, mask = pad(seqs, pad_id, side="right")
                ids, mask = ids.to(device), mask.to(device)
                logits = hf(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                target = ids[:, 1:]
                tmask = mask[:, 1:].bool()
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
                ).view_as(target)
                total_nll += float(nll[tmask].sum())
                total_tokens += int(tmask.sum())
    finally:
        if was_training and hasattr(hf, "train"):
            hf.train()
    if total_tokens == 0:
        raise ActlabError("perplexity: every text is shorter than two tokens; nothing to predict")
    return total_nll, total_tokens


def perplexity(model, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None,
               tokenizer=None) -> float:
    """Token-weighted perplexity ``exp(sum NLL / number of predicted tokens)`` over ``texts``.

    ``model`` is a Hugging Face causal LM (then ``tokenizer`` is required) or an actlab ``Model``
    (anything with ``.hf`` and ``.tokenizer``). Texts are tokenized with the tokenizer's special
    tokens, truncated to ``max_length`` tokens (default: the model's context length), batched with
    right padding and an attention mask; padding positions are ignored.
    """
    nll, n = token_losses(model, texts, batch_size=batch_size, max_length=max_length, tokenizer=tokenizer)
    return math.exp(nll / n)


__all__ = ["perplexity", "token_losses"]
