"""The spliced language-model loss: how much of the model's next-token loss survives when a site is
replaced by an SAE's reconstruction (or an MLP by a transcoder's prediction).

Reported against two ablations of the same site, as SAELens and the SAE papers do:
``recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean)``, 1 when splicing costs nothing
and 0 when it is as bad as ablating the site; with zero-ablation and with mean-ablation (the site
set to its mean over the evaluation tokens). ``kl`` is the mean KL(clean ‖ spliced) per token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from actlab.engine.hooks import ForwardState
from actlab.engine.progress import progress_bar
from actlab.errors import ActlabError
from actlab.sae.model import SparseAutoencoder
from actlab.sae.splice import reconstruction

__all__ = ["spliced_loss"]


class _Constant:
    """Engine edit: the site set to one vector at every token (zero- or mean-ablation)."""

    def __init__(self, site: str, value: torch.Tensor):
        self.site, self.value = site, value

    def __call__(self, h: torch.Tensor, state: ForwardState) -> torch.Tensor:
        return self.value.to(h.device, h.dtype).expand_as(h).clone()


def _site_mean(model, texts: Sequence[str], site: str, batch_size: int) -> torch.Tensor:
    total, count = None, 0
    for start in range(0, len(texts), batch_size):
        acts = model.collect(texts[start:start + batch_size], [site], positions="all",
                             batch_size=batch_size).acts[site].double()
        total = acts.sum(0) if total is None else total + acts.sum(0)
        count += acts.shape[0]
    return (total / max(count, 1)).float()


def _losses(model, ids: torch.Tensor, mask: torch.Tensor, clean_logp: torch.Tensor | None):
    """Summed next-token CE over real tokens, the summed KL to ``clean_logp``, the log-probs and the count."""
    logits = model(ids, attention_mask=mask).logits.float()[:, :-1]
    logp = logits.log_softmax(-1)
    target = ids[:, 1:].to(logp.device)
    real = (mask[:, 1:] > 0).to(logp.device)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ce = float(nll[real].double().sum())
    kl = 0.0
    if clean_logp is not None:
        kl = float((clean_logp.exp() * (clean_logp - logp)).sum(-1)[real].double().sum())
    return ce, kl, logp, int(real.sum())


@torch.no_grad()
def spliced_loss(model, sae: SparseAutoencoder, site: str, texts: Sequence[str], *, batch_size: int = 8,
                 max_length: int | None = None, site_mean: torch.Tensor | None = None, progress: bool = False) -> dict:
    """CE of the clean model, with ``site`` spliced, zero- and mean-ablated; KL of the splice; CE recovered.

    ``site`` is what the SAE reconstructs (``mlp.i`` for a transcoder). Texts are truncated to
    ``max_length`` tokens (default: the model's context). ``site_mean`` (the site's mean activation, for
    the mean-ablation) is measured on ``texts`` when not given."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ActlabError("spliced_loss needs at least one non-empty text")
    if not model.has_lm_head:
        raise ActlabError(f"{model.name} has no language-model head, so it has no next-token loss to splice")
    if site not in model.sites:
        model.resolve([site])
    if model.sites[site] != sae.d_out:
        raise ActlabError(f"the SAE writes width {sae.d_out}, but '{site}' has width {model.sites[site]}")
    sae.eval()
    mean = _site_mean(model, texts, site, batch_size) if site_mean is None else site_mean.float()
    conditions = {"spliced": reconstruction(sae, site), "zero": _Constant(site, torch.zeros_like(mean)),
                  "mean": _Constant(site, mean)}
    sums = {name: 0.0 for name in ("clean", *conditions)}
    kl, tokens = 0.0, 0
    with progress_bar("spliced loss", len(texts), unit="text", enabled=progress) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            ids, mask = model.tokenize(chunk, max_length=max_length or model.max_length)
            ce, _, clean_logp, n = _losses(model, ids, mask, None)
            sums["clean"] += ce
            tokens += n
            for name, edit in conditions.items():
                with model.edit(edit):
                    ce, part_kl, _, _ = _losses(model, ids, mask, clean_logp if name == "spliced" else None)
                sums[name] += ce
                kl += part_kl
            bar.advance(len(chunk))
    if tokens == 0:
        raise ActlabError("the texts have no next-token targets (every text is a single token)")
    ce = {name: value / tokens for name, value in sums.items()}

    def recovered(ablated: str) -> float:
        gap = ce[ablated] - ce["clean"]
        return (ce[ablated] - ce["spliced"]) / gap if abs(gap) > 1e-9 else float("nan")

    return {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce["zero"], "ce_mean": ce["mean"],
            "kl": kl / tokens, "ce_recovered_zero": recovered("zero"), "ce_recovered_mean": recovered("mean"),
            "tokens": tokens}
