"""What ``actlab sae train`` and ``sae eval`` call: an SAE (or transcoder) for a site of a model, trained
from the bundled text, a user's texts or a recorded store, written to a folder; and its evaluation.

The output folder holds ``actlab-sae.safetensors`` (the SAE, with the model's identity and the site),
``train.json`` (the config, the data, the logged history) and, while training, the checkpoint that
lets an interrupted run resume bit-identically (rerun the same command).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from actlab.errors import ActlabError
from actlab.files import write_json
from actlab.sae.feed import ModelStream, store_feed, train_many
from actlab.dist.env import Rank, current
from actlab.sae.distributed import RankSlices, agreed_steps, rank_texts
from actlab.sae.files import save_sae
from actlab.sae.metrics import evaluate_sae
from actlab.sae.model import SparseAutoencoder
from actlab.sae.spliced import spliced_loss
from actlab.sae.train import SAETrainConfig, SAETrainResult, train_sae

__all__ = ["SAE_FILE", "TrainPlan", "evaluate_on_model", "train_on_model", "train_several"]

SAE_FILE = "actlab-sae.safetensors"


@dataclasses.dataclass
class TrainPlan:
    """Where an SAE reads and what it trains on: ``site`` (``mlp.i`` with ``transcoder``: reads
    ``mlp.in.i``), ``expansion`` (latents = expansion × width, unless the config sets ``n_latents``),
    ``tokens`` (None: one pass over the texts or the store)."""

    site: str
    expansion: int = 8
    tokens: int | None = None
    transcoder: bool = False
    chunk_tokens: int = 1 << 17


def _sites(model, plan: TrainPlan, site: str | None = None) -> tuple[str, str | None]:
    """(the site read, the site predicted: None for an SAE) of one site of the plan."""
    if site is None:
        sites = model.resolve([plan.site])
        if len(sites) != 1:
            raise ActlabError(f"train_on_model trains one SAE; '{plan.site}' names {len(sites)} sites: pick one, "
                              f"e.g. {sites[0]}, or use train_several")
        site = sites[0]
    if plan.transcoder:
        if not site.startswith("mlp.") or site.startswith(("mlp.in.", "mlp.hidden.")):
            raise ActlabError(f"a transcoder predicts an MLP's output: give --site mlp.i, not '{site}'")
        return f"mlp.in.{site.split('.')[-1]}", site
    return site, None


def _config(model, plan: TrainPlan, read: str, config: SAETrainConfig | None, overrides: dict) -> SAETrainConfig:
    defaults = {"n_latents": plan.expansion * model.sites[read]}
    return SAETrainConfig.with_overrides(config, {**defaults, **overrides} if config is None else overrides)


def _write(out: Path, model, result: SAETrainResult, read: str, target: str | None, source: dict) -> None:
    site = target or read
    config = result.config.to_dict()
    save_sae(out / SAE_FILE, result.sae, model=model.identity(), site=site, extra={"reads": read, "train": config})
    write_json(out / "train.json", {"site": site, "reads": read, "config": config, "data": source,
                                    "steps": result.steps, "seconds": result.seconds, "history": result.history})


def train_several(model, plan: TrainPlan, out: str | Path, config: SAETrainConfig | None = None, *,
                  texts: Sequence[str] | None = None, progress: bool = False,
                  **overrides) -> dict[str, SAETrainResult]:
    """One SAE per site ``plan.site`` names (``resid.*``, ``resid.1,resid.3``), all from one stream of the
    model: each site's SAE goes to ``out/<site>/`` and equals the one ``train_on_model`` would train."""
    from actlab.datasets import training_text

    pairs = {site: _sites(model, plan, site) for site in model.resolve([plan.site])}
    configs = {site: _config(model, plan, read, config, overrides) for site, (read, _) in pairs.items()}
    first = next(iter(configs.values()))
    read_sites = list(dict.fromkeys(s for pair in pairs.values() for s in pair if s is not None))
    texts = training_text() if texts is None else list(texts)
    stream = ModelStream(model, texts, read_sites, batch_size=first.batch_size,
                         chunk_tokens=max(plan.chunk_tokens, first.batch_size), seed=first.seed)
    steps = max(1, (plan.tokens or stream.batches_per_epoch * first.batch_size) // first.batch_size)
    jobs = {site: (pair if pair[1] else pair[0], dataclasses.replace(configs[site], steps=steps))
            for site, pair in pairs.items()}
    results = train_many(stream, jobs, checkpoint_root=Path(out), progress=progress)
    for site, result in results.items():
        _write(Path(out) / site, model, result, *pairs[site], {"texts": len(stream.texts), "tokens": stream.tokens})
    return results


def train_on_model(model, plan: TrainPlan, out: str | Path, config: SAETrainConfig | None = None, *,
                   texts: Sequence[str] | None = None, store=None, progress: bool = False,
                   distributed: bool = False, **overrides) -> SAETrainResult:
    """Train an SAE for ``plan.site`` of ``model`` and write it to ``out`` (see the module docstring).
    Data: ``store`` (an ``actlab.store.Store`` recorded from this model), else ``texts``, else the
    bundled training text (``actlab.datasets.training_text()``). ``distributed`` (inside torchrun):
    data-parallel over the ranks (``sae/distributed.py``): each rank reads its rows of every store batch,
    or streams its share of the texts; rank 0 writes the files."""
    read, target = _sites(model, plan)
    width = model.sites[read]
    rank = current() if distributed else Rank()
    config = _config(model, plan, read, config, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if store is not None:
        store.check_model(model)
        missing = [s for s in (read, target) if s is not None and s not in store.sites]
        if missing:
            raise ActlabError(f"the store has no {', '.join(missing)} (it holds {', '.join(store.sites)}); "
                              "record that site, or train from text")
        tokens = plan.tokens or store.n_tokens
        steps = max(1, tokens // config.batch_size)
        feed = store_feed(store, (read, target) if target else read, config.batch_size, steps, seed=config.seed)
        feed = RankSlices(feed, rank.rank, rank.world_size) if distributed else feed
        source = {"store": str(store.path) if hasattr(store, "path") else "store", "tokens": store.n_tokens}
    else:
        from actlab.datasets import training_text

        texts = training_text() if texts is None else list(texts)
        texts, rows = rank_texts(texts, config.batch_size) if distributed else (texts, config.batch_size)
        stream = ModelStream(model, texts, [read] + ([target] if target else []), batch_size=rows,
                             chunk_tokens=max(plan.chunk_tokens // rank.world_size, rows), seed=config.seed)
        tokens = plan.tokens or stream.batches_per_epoch * config.batch_size
        steps = agreed_steps(max(1, tokens // config.batch_size))
        feed = stream.pair(read, target) if target else stream.site(read)
        source = {"texts": len(stream.texts), "tokens": stream.tokens}
    config = dataclasses.replace(config, steps=steps)
    config.validate()
    result = train_sae(feed, width, config, d_out=model.sites[target] if target else None,
                       checkpoint_dir=out, progress=progress and rank.is_main, distributed=distributed)
    if rank.is_main:
        _write(out, model, result, read, target, source)
    return result


def _activations(model, texts: Sequence[str], sites: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    count = 0
    for start in range(0, len(texts), 32):
        acts = model.collect(texts[start:start + 32], sites, positions="all").acts
        for s in sites:
            parts[s].append(acts[s].float())
        count += acts[sites[0]].shape[0]
        if count >= max_tokens:
            break
    return {s: torch.cat(v)[:max_tokens] for s, v in parts.items()}


def evaluate_on_model(model, sae: SparseAutoencoder, site: str, *, texts: Sequence[str] | None = None,
                      max_tokens: int = 100_000, spliced: bool = True, progress: bool = False) -> dict:
    """Reconstruction and sparsity on held-out text (``texts``, default the bundled eval split), and with
    ``spliced`` the spliced LM loss (CE, KL, CE recovered vs zero- and mean-ablation)."""
    from actlab.datasets import training_text

    texts = training_text("eval") if texts is None else [t for t in texts if t.strip()]
    if not texts:
        raise ActlabError("no evaluation text: give non-empty texts")
    read = f"mlp.in.{site.split('.')[-1]}" if sae.transcoder else site
    sites = [read, site] if sae.transcoder else [site]
    acts = _activations(model, texts, sites, max_tokens)
    metrics = evaluate_sae(sae, acts[read], acts[site] if sae.transcoder else None)
    density = torch.tensor(metrics.pop("density"))
    metrics["density_histogram"] = _log_histogram(density)
    if spliced:
        used = _texts_for(model, texts, max_tokens)
        metrics.update(spliced_loss(model, sae, site, used, site_mean=acts[site].double().mean(0), progress=progress))
    return metrics


def _texts_for(model, texts: Sequence[str], max_tokens: int) -> list[str]:
    """The first texts holding about ``max_tokens`` tokens (the spliced loss runs the model four times)."""
    out, count = [], 0
    for text in texts:
        out.append(text)
        count += len(model.tokenizer(text)["input_ids"])
        if count >= max_tokens:
            break
    return out


def _log_histogram(density: torch.Tensor) -> dict:
    """Latents per decade of firing rate (the SAE papers' density histogram), plus the never-firing count."""
    edges = [10.0 ** e for e in range(-7, 1)]
    alive = density[density > 0]
    counts = torch.histc(alive.log10(), bins=7, min=-7, max=0).long().tolist() if alive.numel() else [0] * 7
    return {"never": int((density == 0).sum()), "edges": edges, "counts": counts}
