"""What a ``Model`` is given, checked and encoded: texts, token ids, generation prompts and settings.

Every public entry point that takes inputs (``model(...)``, ``tokenize``, ``generate``) comes through
here, so a string where a list is expected, a token id outside the vocabulary, an empty list or a
prompt longer than the context is one clear ``ActlabError`` (or, for long prompts, a warning that
states the real numbers), never an IndexError from deep inside torch.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from actlab.engine.batching import check_token_range, id_lists, pad
from actlab.engine.config import positive_int, positive_number
from actlab.errors import ActlabError

_INPUTS_HELP = "a text, a list of texts, a list of token-id lists or a token-id tensor"


# ------------------------------------------------------------------------- texts
def text_list(value: Any, name: str, *, single_ok: bool) -> list[str]:
    """``value`` as a list of strings. A bare string is one text when ``single_ok``, else refused
    (a string is a sequence of characters: taking it for a list of examples is never what was meant)."""
    if isinstance(value, str):
        if single_ok:
            return [value]
        shown = value[:30]
        raise ActlabError(f"{name} must be a list of texts, not the single string {shown!r}; "
                          f"wrap one text in a list: [{shown!r}]")
    if isinstance(value, (bytes, bytearray, dict)) or torch.is_tensor(value) or not hasattr(value, "__iter__"):
        raise ActlabError(f"{name} must be a list of texts, not {type(value).__name__}")
    items = list(value)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ActlabError(f"{name}[{i}] is {type(item).__name__}, not a text: {name} must be a list of strings")
    return items


def id_rows(value: Sequence, vocab: int | None, name: str = "inputs") -> list[list[int]]:
    """Token-id lists (a flat list of ints is one row), each non-empty and inside the vocabulary."""
    items = list(value)
    if items and not isinstance(items[0], (list, tuple)) and getattr(items[0], "ndim", 0) == 0:
        items = [items]  # one flat list of ids: one row, like a 1-D tensor
    rows = id_lists(items, name, allow_empty=False)
    check_token_range(min(min(r) for r in rows), max(max(r) for r in rows), vocab)
    return rows


def check_id_tensor(ids: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """A [batch, T] token-id tensor (1-D becomes one row), checked."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ActlabError(f"a token-id tensor must hold integers, not {ids.dtype}")
    ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
    if ids.ndim != 2:
        raise ActlabError(f"a token-id tensor must be [batch, tokens] (or 1-D), not of shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ActlabError("empty input: the token tensor has no tokens")
    check_token_range(int(ids.min()), int(ids.max()), vocab)
    return ids


# ------------------------------------------------------------------------- encoding
def encode(model, texts: list[str]) -> list[list[int]]:
    if model.tokenizer is None:
        raise ActlabError("this model has no tokenizer: pass token ids, or load it with tokenizer=...")
    if not texts:
        raise ActlabError("no texts given: pass at least one string")
    encoded = [list(e) for e in model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
    if any(len(e) == 0 for e in encoded):
        raise ActlabError("an input text is empty after tokenisation; remove empty strings")
    return encoded


def tokenize(model, texts, *, padding_side: str = "right", max_length: int | None = None):
    """Token ids and mask of texts; a text longer than ``max_length`` (default: the context) loses its end."""
    if padding_side not in ("left", "right"):
        raise ActlabError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    if max_length is not None:
        positive_int(max_length, "max_length")
    encoded = encode(model, text_list(texts, "texts", single_ok=True))
    limit = max_length or model.max_length
    long = [len(e) for e in encoded if len(e) > limit]
    if long:
        warnings.warn(f"{len(long)} text(s) of up to {max(long)} tokens truncated to their first {limit} tokens "
                      f"(the model context is {model.max_length} tokens)", stacklevel=3)
        encoded = [e[:limit] for e in encoded]
    return pad(encoded, model.pad_token_id, side=padding_side)


def as_inputs(model, inputs, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(inputs)``'s inputs as (ids, mask): texts are tokenised, token ids checked."""
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
        return tokenize(model, inputs)
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ActlabError("no inputs given: pass at least one text or token-id list")
        return pad(id_rows(inputs, model.vocab_size), model.pad_token_id)
    if not torch.is_tensor(inputs):
        raise ActlabError(f"inputs must be {_INPUTS_HELP}, not {type(inputs).__name__}")
    ids = check_id_tensor(inputs, model.vocab_size)
    if attention_mask is None:
        return ids, torch.ones_like(ids)
    if not torch.is_tensor(attention_mask) or tuple(attention_mask.shape) != tuple(ids.shape):
        shown = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
        raise ActlabError(f"attention_mask must be a tensor of the ids' shape {tuple(ids.shape)}, not {shown}")
    return ids, attention_mask


# ------------------------------------------------------------------------- generation
def check_generation(*, max_new_tokens, do_sample, temperature, top_p, seed) -> None:
    """The settings of ``Model.generate``, each named in the error it raises."""
    positive_int(max_new_tokens, "max_new_tokens")
    if not isinstance(do_sample, bool):
        raise ActlabError(f"do_sample must be True or False, not {do_sample!r}")
    if do_sample:
        try:
            positive_number(temperature, "temperature")
        except ActlabError as e:
            raise ActlabError(f"{e} (sampling divides the scores by it; use do_sample=False for greedy decoding)") from None
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ActlabError(f"top_p must be a number in (0, 1], not {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ActlabError(f"seed must be None or an integer in [0, 2**63), not {seed!r}")


def _keep_end(rows: list[list[int]], model, max_new_tokens: int) -> list[list[int]]:
    """Prompts that do not leave room for ``max_new_tokens`` keep their end (what the continuation follows)."""
    context = model.max_length
    if max_new_tokens >= context:
        raise ActlabError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt: the model's context is "
                          f"{context} tokens; ask for at most {context - 1} new tokens")
    room = context - max_new_tokens
    long = [len(r) for r in rows if len(r) > room]
    if long:
        many = f"{len(long)} prompts of up to" if len(long) > 1 else "a prompt of"
        warnings.warn(f"{many} {max(long)} tokens does not fit the model's context of {context} tokens with "
                      f"max_new_tokens={max_new_tokens}: kept its last {room} tokens (ask for fewer new tokens to "
                      "keep more of the prompt)", stacklevel=4)
    return [r[-room:] for r in rows]


def prompt_inputs(model, prompts, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, mask) of generation prompts: texts, token-id lists or a token-id tensor."""
    if torch.is_tensor(prompts):
        ids = check_id_tensor(prompts, model.vocab_size)
        rows = [row.tolist() for row in ids]
        if len(rows[0]) <= model.max_length - max_new_tokens:
            return ids, torch.ones_like(ids)
    elif isinstance(prompts, (list, tuple)) and prompts and not isinstance(prompts[0], str):
        rows = id_rows(prompts, model.vocab_size, "prompts")
    else:
        texts = text_list(prompts, "prompts", single_ok=True)
        if not texts:
            raise ActlabError("no prompts given: pass at least one text")
        rows = encode(model, texts)
    return pad(_keep_end(rows, model, max_new_tokens), model.pad_token_id, side="left")


def usable_scores():
    """A logits processor that stops generation when the next-token scores are unusable: NaN, +inf, or
    all equal (what an edit far too strong leaves, e.g. a coefficient of 1e30 that overflows the norms)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class UsableScores(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            broken = torch.isnan(scores).any() | torch.isposinf(scores).any()
            if bool(broken | (scores.amax(-1) == scores.amin(-1)).any()):  # one device sync per step
                what = "not finite (NaN or inf)" if bool(broken) else "all equal"
                raise ActlabError(f"the model's next-token scores are {what}: an active edit is far too strong "
                                  "(e.g. a huge coefficient) or the weights are broken; lower the edit's coefficient")
            return scores

    return LogitsProcessorList([UsableScores()])
