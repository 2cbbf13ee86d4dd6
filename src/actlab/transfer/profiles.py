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
from actlab.files import HeaderFields, load_tensors, save_tensors

FORMAT = "actlab.profile"
POSITIONS = ("auto", "all", "last")  # "auto": every token when the tokenizers agree, else the last prompt token


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
        """Read a profile file; ActlabError (naming the file and what is wrong) unless every field and
        tensor is there, of the right type and shape, and the prompts match their hash."""
        hint = "make it with `actlab paste profile`"
        tensors, meta = load_tensors(path, FORMAT, "activation profile", hint)
        fields = HeaderFields(path, "activation profile", meta, hint)
        prompts = fields.json("prompts", list)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise fields.damaged("'prompts' should be a non-empty list of strings")
        if fields.text("prompts_hash") != prompts_hash(prompts):
            raise fields.damaged("its prompts do not match their hash")
        positions = fields.text("positions")
        if positions not in ("last", "all"):
            raise fields.damaged(f"'positions' should be 'last' or 'all', not {positions[:20]!r}")
        return cls(acts=_profile_acts(fields, tensors, len(prompts)), model=fields.json("model", dict),
                   prompts=prompts, positions=positions, row_prompt=tensors["row_prompt"])


def _profile_acts(fields: HeaderFields, tensors: dict[str, torch.Tensor], n_prompts: int) -> dict[int, torch.Tensor]:
    """``resid.0 … resid.{L-1}``: float [n_rows, d] each, rows aligned with ``row_prompt``."""
    row_prompt = tensors.get("row_prompt")
    if row_prompt is None or row_prompt.dtype != torch.int64 or row_prompt.ndim != 1:
        raise fields.damaged("it has no int64 'row_prompt' tensor of one dimension")
    if row_prompt.numel() == 0 or int(row_prompt.min()) < 0 or int(row_prompt.max()) >= n_prompts:
        raise fields.damaged(f"'row_prompt' should hold prompt indices 0..{n_prompts - 1}")
    names = sorted(k for k in tensors if k != "row_prompt")
    layers = [f"resid.{i}" for i in range(len(names))]
    if not names or sorted(layers) != names:
        raise fields.damaged(f"its tensors should be resid.0 .. resid.N and row_prompt, not {', '.join(names[:4])}")
    acts = {i: tensors[name] for i, name in enumerate(layers)}
    shape = (row_prompt.numel(), acts[0].shape[-1] if acts[0].ndim == 2 else -1)
    for i, a in acts.items():
        if not a.is_floating_point() or tuple(a.shape) != shape or shape[1] < 1:
            raise fields.damaged(f"resid.{i} should be a float tensor of shape {list(shape)}, not {a.dtype} {list(a.shape)}")
        if not bool(torch.isfinite(a).all()):
            raise fields.damaged(f"resid.{i} holds NaN or infinite values")
    return acts


def same_tokens(donor, recipient, prompts: Sequence[str]) -> bool:
    """Whether both tokenizers cut ``prompts`` into the same tokens (then all-token profile rows align)."""
    if donor.tokenizer is recipient.tokenizer:
        return True
    a = donor.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    b = recipient.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    return [list(x) for x in a] == [list(x) for x in b]


def resolve_positions(positions: str, donor, recipient, prompts: Sequence[str]) -> tuple[str, str | None]:
    """``(positions, note)``: "auto" becomes "all" when the two models tokenize ``prompts`` alike, else
    "last" (with a note saying so); "all" across different tokenizers is refused with the fix."""
    if positions not in POSITIONS:
        raise ActlabError(f"profile positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
    if positions == "last":
        return positions, None
    if same_tokens(donor, recipient, prompts):
        return "all", None
    if positions == "all":
        raise ActlabError(f"{donor.name} and {recipient.name} tokenize the profile prompts differently, so all-token "
                          "rows do not align; use positions 'last' (or 'auto')")
    return "last", (f"{donor.name} and {recipient.name} tokenize differently: the profile uses the last prompt token "
                    "only (one row per prompt; give more prompts for better converters)")


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
            if (cached.model.get("weights_hash") == weights and cached.prompts == list(prompts)
                    and cached.positions == positions):
                return cached
        except ActlabError:
            pass  # a damaged cache entry is simply recomputed
    result = profile_model(model, prompts, positions=positions, batch_size=batch_size, progress=progress)
    result.save(path)
    return result
