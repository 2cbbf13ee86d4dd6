"""Activation profiles: ``resid.{i}`` of every layer on a prompt set, the input of Command-V.

Both models must be profiled on the same prompts; the file records a hash of them (and the
prompts themselves) so converters are never fitted on mismatched rows. Prompts are used as
given: no chat template is applied anywhere, so profiling and inference see the same text
(the reference code templated profile prompts twice).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from actlab.errors import ActlabError
from actlab.files import load_tensors, save_tensors

FORMAT = "actlab.profile"


def prompts_hash(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16]


@dataclass
class ActivationProfile:
    """``acts[layer]`` is ``[n_rows, d_model]`` float32: one row per prompt (last token) or per token."""

    acts: dict[int, torch.Tensor]
    model: dict  # Model.identity()
    prompts: list[str]
    positions: str
    row_prompt: torch.Tensor  # [n_rows] index of the prompt each row came from

    @property
    def n_layers(self) -> int:
        return len(self.acts)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.acts.values())).shape[1])

    @property
    def prompts_hash(self) -> str:
        return prompts_hash(self.prompts)

    def save(self, path: str | Path) -> Path:
        tensors = {f"resid.{i}": a for i, a in self.acts.items()}
        tensors["row_prompt"] = self.row_prompt
        metadata = {"model": json.dumps(self.model), "prompts": json.dumps(self.prompts),
                    "prompts_hash": self.prompts_hash, "positions": self.positions}
        return save_tensors(path, tensors, FORMAT, metadata)

    @classmethod
    def load(cls, path: str | Path) -> "ActivationProfile":
        tensors, meta = load_tensors(path, FORMAT, "activation profile", "make it with `actlab paste profile`")
        acts = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("resid.")}
        return cls(acts=dict(sorted(acts.items())), model=json.loads(meta["model"]),
                   prompts=json.loads(meta["prompts"]), positions=meta["positions"], row_prompt=tensors["row_prompt"])


def profile_model(
    model, prompts: Sequence[str], *, positions: str = "last", batch_size: int = 16, progress: bool = False
) -> ActivationProfile:
    """Record ``resid.{i}`` for every layer at the last prompt token (or every token)."""
    if len(prompts) == 0:
        raise ActlabError("no prompts to profile: give at least a few hundred varied prompts")
    if positions not in ("last", "all"):
        raise ActlabError(f"profile positions must be 'last' or 'all', not {positions!r}")
    sites = model.resolve("resid.*")
    batch = model.collect(list(prompts), sites, positions=positions, batch_size=batch_size, progress=progress,
                          description=f"profiling {model.name}")
    acts = {i: batch.acts[f"resid.{i}"].float() for i in range(model.n_layers)}
    for i, a in acts.items():
        if not torch.isfinite(a).all():
            raise ActlabError(f"{model.name}: resid.{i} has NaN/inf activations on the profile prompts")
    return ActivationProfile(acts=acts, model=model.identity(), prompts=list(prompts), positions=positions,
                             row_prompt=batch.doc_ids.clone())


def cached_profile(model, prompts: Sequence[str], *, positions: str = "last", cache_dir: str | Path = ".actlab-cache",
                   batch_size: int = 16, progress: bool = False) -> ActivationProfile:
    """Profile once per (model, prompts, positions) and reuse the file afterwards. The model is named by
    its config *and* weights fingerprint: a fine-tune or a retrain with the same config gets its own entry."""
    weights = model.weights_hash
    key = f"{model.config_hash}-{weights}-{prompts_hash(prompts)}-{positions}"
    path = Path(cache_dir) / "profiles" / f"{key}.safetensors"
    if path.is_file():
        try:
            cached = ActivationProfile.load(path)
            if cached.model.get("weights_hash") == weights:
                return cached
        except ActlabError:
            pass  # a damaged cache entry is simply recomputed
    result = profile_model(model, prompts, positions=positions, batch_size=batch_size, progress=progress)
    result.save(path)
    return result
