"""SAE files: the module's tensors as safetensors, its config (plus the model and site it reads) as JSON.

Format ``actlab.sae``. Loading rebuilds the module from the header's ``config`` and checks that
every tensor is present, floating point, finite and of the shape the config implies, so a
damaged or foreign file is an ActlabError naming the file and the problem, never a wrong SAE.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from actlab.errors import ActlabError
from actlab.files import NUMBER, HeaderFields, load_tensors, save_tensors
from actlab.sae.model import SparseAutoencoder

__all__ = ["FORMAT", "load_sae", "read_state", "save_sae", "sae_from_config"]

FORMAT = "actlab.sae"
_HINT = "train the SAE again or copy the file anew"


def save_sae(path: str | Path, sae: SparseAutoencoder, *, model: dict | None = None, site: str | None = None,
             extra: dict | None = None) -> Path:
    """Write ``sae`` to ``path``; ``model`` (an identity dict) and ``site`` record what it reads."""
    metadata = {"config": json.dumps(sae.config())}
    if model is not None:
        metadata["model"] = json.dumps(model)
    if site is not None:
        metadata["site"] = site
    if extra:
        metadata["extra"] = json.dumps(extra)
    tensors = {k: v.detach().cpu() for k, v in sae.state_dict().items()}
    return save_tensors(path, tensors, FORMAT, metadata)


def load_sae(path: str | Path) -> tuple[SparseAutoencoder, dict]:
    """The SAE (in eval mode) and its header's ``model``, ``site`` and ``extra`` (None where absent)."""
    tensors, meta = load_tensors(path, FORMAT, "SAE", _HINT)
    fields = HeaderFields(path, "SAE", meta, _HINT)
    sae = sae_from_config(fields, fields.json("config", dict))
    read_state(fields, sae, tensors)
    info = {"model": fields.json("model", dict, None), "site": fields.text("site", None),
            "extra": fields.json("extra", dict, None)}
    return sae.eval(), info


def sae_from_config(fields: HeaderFields, config: dict) -> SparseAutoencoder:
    """A fresh module of the shape a header's ``config`` describes (its values type-checked)."""
    where = "config"
    d_in = fields.item(config, "d_in", int, where)
    n = fields.item(config, "n_latents", int, where)
    kind = fields.item(config, "kind", str, where)
    k = fields.item(config, "k", (int, type(None)), where)
    bandwidth = fields.item(config, "bandwidth", NUMBER, where, 0.001)
    d_out = fields.item(config, "d_out", (int, type(None)), where, None)
    skip = fields.item(config, "skip", bool, where, False)
    if not (0 < d_in <= 1 << 20 and 0 < n <= 1 << 24 and (d_out is None or 0 < d_out <= 1 << 20)):
        raise fields.damaged(f"its config has an implausible shape (d_in {d_in}, n_latents {n}, d_out {d_out})")
    try:
        return SparseAutoencoder(d_in, n, kind, k, d_out=d_out, skip=skip, bandwidth=float(bandwidth))
    except ActlabError as e:
        raise fields.damaged(f"its config is invalid ({e})") from None


def read_state(fields: HeaderFields, sae: SparseAutoencoder, tensors: dict[str, torch.Tensor],
               prefix: str = "") -> None:
    """Copy ``tensors[prefix + name]`` into every parameter and buffer of ``sae``, checked first."""
    state = {}
    for name, ref in sae.state_dict().items():
        t = tensors.get(prefix + name)
        if t is None or t.dtype != ref.dtype or t.shape != ref.shape or not bool(torch.isfinite(t).all()):
            got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
            raise fields.damaged(f"tensor '{prefix + name}' should be finite {ref.dtype} {list(ref.shape)}, "
                                 f"not {got}")
        state[name] = t
    sae.load_state_dict(state)
