"""The causal check: does moving the activation along the probe's direction move what the model does (or what
it represents downstream) more than moving it as far along a random direction?

Two read-outs: for genre probes on a causal LM, the genre classifier's rate of the probe's class in sampled
continuations (``steer_generation``); otherwise, the mean probability a probe fitted at a later site gives the
class on held-out texts (``steer_readout``). Each scale is a multiple of the site's mean activation norm, so a
scale means the same on every model; the random direction is seeded and has exactly the probe vector's norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from actlab.engine.config import Config, check_fields
from actlab.errors import ActlabError
from actlab.probes.fit import LinearProbe

__all__ = ["CausalConfig", "steer_generation", "steer_readout", "steering_vectors", "mean_norm"]


@dataclass
class CausalConfig(Config):
    """Steering strengths (× the site's mean activation norm), prompts and sampling of the causal check."""

    scales: tuple[float, ...] = (0.5, 1.0)
    n_prompts: int = 48
    new_tokens: int = 24
    seed: int = 0

    def validate(self) -> None:
        check_fields(self, positive_ints=("n_prompts", "new_tokens"))
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or any(not (math.isfinite(s) and s > 0) for s in self.scales):
            raise ActlabError(f"causal scales must be positive numbers, not {list(self.scales)}")


def mean_norm(model, texts, site: str) -> float:
    """Mean ‖h‖ over the tokens of ``texts`` at ``site``: the unit of the steering scales."""
    acts = model.collect(texts, site, positions="all").acts[site].double()
    return float(acts.norm(dim=1).mean())


def steering_vectors(probe: LinearProbe, cls: str, norm: float, seed: int) -> dict[str, torch.Tensor]:
    """The probe's unit direction for ``cls`` and a seeded random unit direction, both scaled to ``norm``."""
    d = probe.direction(cls)
    if float(d.norm()) == 0:
        raise ActlabError(f"the probe has no direction for class {cls!r} (all its weights are zero)")
    r = torch.randn(probe.width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return {"probe": d / d.norm() * norm, "random": r / r.norm() * norm}


def _rate(values: list[bool]) -> dict:
    p = sum(values) / len(values)
    return {"rate": p, "se": math.sqrt(max(p * (1 - p), 0.0) / len(values)), "n": len(values)}


def steer_generation(model, probe: LinearProbe, site: str, prompts: list[str], config: CausalConfig | None = None,
                     classes: list[str] | None = None, **overrides) -> dict:
    """Rate of each class (default: all the probe's classes) among the genre classifier's verdicts on sampled
    continuations: unsteered, steered along the probe's direction, and along a random one of the same norm."""
    from actlab.evals.genre import bundled
    from actlab.interventions import SteeringVector

    config = CausalConfig.with_overrides(config, overrides)
    if not model.is_causal:
        raise ActlabError(f"{model.name} cannot generate text: use the read-out check (steer_readout)")
    clf = bundled()
    classes = classes or probe.classes
    unknown = [c for c in classes if c not in clf.genres]
    if unknown:
        raise ActlabError(f"the genre classifier cannot score class {unknown[0]!r}: the generation check is for "
                          f"genre probes ({', '.join(clf.genres)}); use steer_readout for other labels")
    prompts = prompts[: config.n_prompts]
    norm = mean_norm(model, prompts, site)

    def verdicts(vector=None) -> list[str]:
        edit = [] if vector is None else [SteeringVector(site=site, vector=vector.float(), model=model.identity())]
        with model.edit(*edit):
            texts = model.generate(prompts, max_new_tokens=config.new_tokens, do_sample=True, seed=config.seed)
        return clf.predict(texts)

    base = verdicts()
    out = {"site": site, "mean_norm": norm, "baseline": {c: _rate([v == c for v in base]) for c in classes},
           "steered": []}
    for c in classes:
        for scale in config.scales:
            vectors = steering_vectors(probe, c, scale * norm, config.seed + 1)
            row = {"class": c, "scale": scale}
            for kind, vec in vectors.items():
                row[kind] = _rate([v == c for v in verdicts(vec)])
            out["steered"].append(row)
    return out


def steer_readout(model, probe: LinearProbe, site: str, reader: LinearProbe, reader_site: str, data, cls: str,
                  config: CausalConfig | None = None, *, pooling: str = "mean", **overrides) -> dict:
    """Mean probability ``reader`` (a probe at the later ``reader_site``) gives ``cls`` on ``data``'s rows:
    unsteered, steered at ``site`` along ``probe``'s direction, and along a random one of the same norm."""
    from actlab.interventions import SteeringVector
    from actlab.probes.features import from_model

    config = CausalConfig.with_overrides(config, overrides)
    c = reader.classes.index(cls)
    norm = mean_norm(model, data.texts[: config.n_prompts], site)

    def readout(vector=None) -> float:
        edit = [] if vector is None else [SteeringVector(site=site, vector=vector.float(), model=model.identity())]
        with model.edit(*edit):
            rows = from_model(model, data, [reader_site], pooling=pooling)
        return float(reader.proba(rows.x[reader_site])[:, c].mean())

    out = {"site": site, "reader_site": reader_site, "class": cls, "mean_norm": norm, "baseline": readout(),
           "steered": []}
    for scale in config.scales:
        vectors = steering_vectors(probe, cls, scale * norm, config.seed + 1)
        out["steered"].append({"scale": scale, **{kind: readout(vec) for kind, vec in vectors.items()}})
    return out
