"""Training low-rank residual adapters (ReFT-style) by backpropagation through a frozen model.

``train_adapter`` learns a :class:`LowRankAdapter` at one site, ``h <- h + Rᵀ (W h + b − R h)``
(the LoReFT form, Wu et al. 2024), with the language-modelling loss of the model's next-token
predictions:

* ``data`` as a list of texts: cross-entropy on every token (but the first, which nothing predicts);
* ``data`` as ``(prompt, completion)`` pairs: cross-entropy on the completion tokens only. Prompts
  are left-padded and completions right-padded, so every prompt ends at the same column, exactly
  as ``Model.generate`` lays a batch out. During training the engine is told where the prompt ends,
  so an adapter with ``positions="generated"`` (or ``"prompt"``) acts during training on the same
  tokens it will act on at generation time. With ``positions="all"`` (the default) the adapter acts
  on prompt and completion tokens alike, as it will on prompt and generated tokens.

Parameters and their initialisation: ``R`` [rank, width] gets orthonormal rows (QR of a seeded
Gaussian matrix), ``W = R`` and ``b = 0``, so the initial change is exactly zero and the model starts
from its own behaviour. Internally ``W`` is trained as ``R + ΔW`` with AdamW's decoupled weight
decay on ``ΔW`` and ``b`` only, which pulls the adapter toward "no change" rather than toward
``W = 0`` (which would erase the subspace). ``R`` is kept orthonormal by re-projecting it after
every optimiser step (QR of ``Rᵀ`` with the signs fixed so the projection is the nearest
orthonormal frame and moves continuously); this keeps ``Rᵀ R`` a projection, as LoReFT requires,
without a parametrisation module.

The model's weights are frozen during training (their ``requires_grad`` flags are restored
afterwards) and only the adapter's tensors reach the optimiser. A fraction of the examples is held
out; the held-out loss is evaluated every ``eval_every`` steps, training stops after ``patience``
evaluations without improvement, and the best adapter is returned.
"""

from __future__ import annotations

import math
import random
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from actlab.engine.edits import POSITION_MODES
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.interventions.affine_fit import frozen_weights
from actlab.interventions.types import LowRankAdapter

Example = tuple[list[int], list[int]]  # (prompt ids — no loss, target ids — loss)


# ------------------------------------------------------------------------------------ data
def _as_pairs_or_texts(data) -> tuple[str, list]:
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
    """Tokenise texts or (prompt, completion) pairs into (prompt ids, target ids) examples."""
    kind, items = _as_pairs_or_texts(data)
    if model.tokenizer is None:
        raise ActlabError("this model has no tokenizer: load it with tokenizer=... to train on texts")
    tok = model.tokenizer
    limit = model.max_length
    out: list[Example] = []
    for i, item in enumerate(items):
        if kind == "texts":
            ids = list(tok([item], add_special_tokens=True)["input_ids"][0])[: min(max_tokens, limit)]
            if len(ids) < 2:
                raise ActlabError(f"training text {i} has {len(ids)} token(s); the loss needs at least 2: "
                                  f"{item[:40]!r}")
            out.append(([], ids))
        else:
            prompt, completion = item
            p = list(tok([prompt], add_special_tokens=True)["input_ids"][0]) if prompt else []
            c = list(tok([completion], add_special_tokens=not prompt)["input_ids"][0])[:max_tokens]
            if not c:
                raise ActlabError(f"training pair {i} has an empty completion after tokenisation: {completion[:40]!r}")
            if not p and len(c) < 2:
                raise ActlabError(f"training pair {i} has no prompt and a one-token completion; nothing to predict")
            if len(p) + len(c) > limit:
                p = p[-max(1, limit - len(c)):]
                c = c[: limit - len(p)]
            out.append((p, c))
    return kind, out


def _layout(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
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


def lm_loss(model, examples: Sequence[Example], *, prompt_length_known: bool, grad: bool) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the target tokens of ``examples`` and their count.

    Active edits apply. ``prompt_length_known`` tells the hooks where the prompts end, as generate does.
    """
    ids, mask, labels, P = _layout(examples, model.pad_token_id)
    targets = labels[:, 1:].to(model.device)
    state = model.hooks.state
    saved = state.prompt_length
    state.prompt_length = P if prompt_length_known else None
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            out = model.hf(**model.forward_inputs(ids, mask))
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                   reduction="sum")
    finally:
        state.prompt_length = saved
    return loss, int((targets != -100).sum())


def _eval_loss(model, examples, batch_size, prompt_length_known) -> float:
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = lm_loss(model, examples[i : i + batch_size], prompt_length_known=prompt_length_known, grad=False)
        total += float(loss)
        count += n
    return total / max(1, count)


# --------------------------------------------------------------------------------- adapter
def orthonormal_rows(rank: int, width: int, seed: int = 0) -> torch.Tensor:
    """[rank, width] with orthonormal rows: QR of a seeded Gaussian matrix."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(width, rank, generator=gen))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return (q * signs).T.contiguous()


def init_adapter(model, site: str, rank: int = 4, *, seed: int = 0, positions: str = "all") -> LowRankAdapter:
    """An untrained adapter: orthonormal R, W = R, b = 0, so its change is exactly zero."""
    names = model.resolve(site)
    if len(names) != 1:
        raise ActlabError(f"an adapter edits one site; {site!r} selects {len(names)} ({', '.join(names[:4])}...)")
    site = names[0]
    width = model.sites[site]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= width:
        raise ActlabError(f"rank must be an integer from 1 to the width of '{site}' ({width}), not {rank!r}")
    if positions not in POSITION_MODES:
        raise ActlabError(f"positions must be one of {POSITION_MODES}, not {positions!r}")
    R = orthonormal_rows(rank, width, seed)
    return LowRankAdapter(site=site, R=R, W=R.clone(), b=torch.zeros(rank), positions=positions,
                          model=model.identity(), params={"rank": rank})


def _reorthonormalise(R: torch.Tensor) -> None:
    """In place: the orthonormal frame nearest-by-QR to R's rows (signs fixed, so it moves continuously)."""
    q, r = torch.linalg.qr(R.T)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    R.copy_((q * signs).T)


def train_adapter(
    model,
    data,
    site: str,
    *,
    rank: int = 4,
    steps: int = 200,
    lr: float = 5e-3,
    batch_size: int = 8,
    val_fraction: float = 0.2,
    patience: int = 5,
    eval_every: int | None = None,
    weight_decay: float = 0.01,
    max_tokens: int = 128,
    seed: int = 0,
    positions: str = "all",
    progress: bool = False,
) -> LowRankAdapter:
    """Train a rank-``rank`` LoReFT adapter at ``site`` on texts or (prompt, completion) pairs.

    ``eval_every`` defaults to ``steps // 20`` (1 to 25); ``patience`` counts evaluations without
    improvement (0 disables early stopping); ``val_fraction`` 0 trains on everything and keeps the
    last adapter. Returns the adapter with the lowest held-out loss; ``params`` records ``rank``, ``steps_run``,
    ``best_step``, ``val_loss`` (best), ``val_loss_before`` (the model without adapter),
    ``train_seconds``, ``n_examples`` (and the train / held-out split), ``data`` ("texts" or
    "pairs") and the optimiser settings.
    """
    if not model.has_lm_head:
        raise ActlabError(f"{model.sitemap.model_class} has no language-model head: adapters are trained with "
                          "the next-token loss, so load a causal LM")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ActlabError(f"steps must be a positive integer, not {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ActlabError(f"lr must be a positive number, not {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ActlabError(f"batch_size must be a positive integer, not {batch_size!r}")
    if not (0 <= val_fraction < 1):
        raise ActlabError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ActlabError(f"weight_decay must be >= 0, not {weight_decay}")
    adapter = init_adapter(model, site, rank, seed=seed, positions=positions)
    kind, examples = encode_lm_data(model, data, max_tokens=max_tokens)
    if kind == "texts" and positions != "all":
        raise ActlabError(f"positions={positions!r} needs (prompt, completion) pairs: plain texts have no prompt "
                          "part; use positions='all'")
    prompt_known = kind == "pairs"

    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    n_val = int(round(len(examples) * val_fraction)) if len(examples) >= 2 else 0
    n_val = min(n_val, len(examples) - 1)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    eval_every = eval_every or max(1, min(25, steps // 20))

    device = model.device
    R = adapter.R.to(device).requires_grad_(True)
    dW = torch.zeros_like(R, requires_grad=True)
    b = torch.zeros(adapter.rank, device=device, requires_grad=True)
    opt = torch.optim.AdamW([{"params": [R], "weight_decay": 0.0}, {"params": [dW, b], "weight_decay": weight_decay}],
                            lr=lr)

    def sync() -> None:
        adapter.R, adapter.W, adapter.b = R, R + dW, b

    start = time.perf_counter()
    best_step = 0
    step = 0
    train_loss = math.nan
    with frozen_weights(model):
        # the held-out loss before training is that of the model itself (the adapter starts at zero change)
        val_before = _eval_loss(model, val, batch_size, prompt_known) if val else None
        if val_before is not None and not math.isfinite(val_before):
            raise ActlabError(f"the model's loss on the held-out data is {val_before}; check the data and the model "
                              "for NaN/inf")
        best_val = val_before if val_before is not None else math.inf
        best = (R.detach().clone(), dW.detach().clone(), b.detach().clone())
        bad = 0
        cursor = len(train)
        handle = model.edit(adapter)
        try:
            with progress_bar("training adapter", steps, unit="step", enabled=progress) as bar:
                for step in range(1, steps + 1):
                    if cursor + batch_size > len(train):
                        rng.shuffle(train)
                        cursor = 0
                    batch = train[cursor : cursor + batch_size]
                    cursor += batch_size
                    with torch.enable_grad():
                        sync()
                        loss_sum, n_tok = lm_loss(model, batch, prompt_length_known=prompt_known, grad=True)
                        loss = loss_sum / max(1, n_tok)
                    if not torch.isfinite(loss):
                        raise ActlabError(f"the adapter's training loss became {float(loss)} at step {step}; "
                                          "check the data for NaN/inf or lower lr")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        _reorthonormalise(R)
                    train_loss = float(loss.detach())
                    bar.advance(1)
                    if val and (step % eval_every == 0 or step == steps):
                        with torch.no_grad():
                            sync()
                        v = _eval_loss(model, val, batch_size, prompt_known)
                        if not math.isfinite(v):
                            raise ActlabError(f"the adapter's held-out loss became {v} at step {step}; lower lr")
                        bar.update(description=f"training adapter (held-out loss {v:.3f})")
                        if v < best_val - 1e-6:
                            best_val, best_step, bad = v, step, 0
                            best = (R.detach().clone(), dW.detach().clone(), b.detach().clone())
                        else:
                            bad += 1
                            if patience and bad >= patience:
                                break
        finally:
            handle.remove()
    if not val:
        best = (R.detach().clone(), dW.detach().clone(), b.detach().clone())
        best_step = step
        best_val = None
    R_best, dW_best, b_best = (t.detach().float().cpu() for t in best)
    params = {
        "method": "reft", "rank": adapter.rank, "steps": steps, "steps_run": step, "best_step": best_step,
        "val_loss": best_val, "val_loss_before": val_before, "train_loss_last": train_loss,
        "train_seconds": time.perf_counter() - start, "n_examples": len(examples), "n_train": len(train),
        "n_val": len(val), "data": kind, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
        "seed": seed, "orthonormal": "qr-reprojection",
    }
    return LowRankAdapter(site=adapter.site, R=R_best.clone(), W=(R_best + dW_best).clone(), b=b_best.clone(),
                          positions=positions, model=model.identity(), params=params)


# ------------------------------------------------------------------------------ demo data
def adapter_training_data_for_genre(genre: str, *, min_pairs: int = 32, max_pairs: int | None = None
                                    ) -> list[tuple[str, str]]:
    """(prompt, completion) pairs whose completion is in ``genre``, from the bundled contrast pairs.

    Each bundled contrast pair gives its shared prompt (the first words of a sentence) and its
    continuation in ``genre``. Genres with fewer than ``min_pairs`` such pairs (the bundled set has
    only a handful for "dictionary") are topped up from the bundled held-out passages of the genre,
    split after their first three words. Deterministic order.
    """
    from actlab.datasets import genres as g

    if genre not in g.GENRES:
        raise ActlabError(f"unknown genre {genre!r}; choose one of {', '.join(g.GENRES)}")
    pairs = [(r["prompt"], r["pos"]) for r in g.contrast_pairs(genre) if r.get("pos_genre", genre) == genre]
    if len(pairs) < min_pairs:
        for row in g.heldout(genre):
            words = row["text"].split(" ")
            if len(words) < 6:
                continue
            pairs.append((" ".join(words[:3]), " " + " ".join(words[3:])))
            if len(pairs) >= min_pairs:
                break
    if not pairs:
        raise ActlabError(f"no bundled training data for genre {genre!r}")
    return pairs[:max_pairs] if max_pairs else pairs
