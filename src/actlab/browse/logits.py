"""Direct logit effects: a unit's output direction through the unembedding, with no pass over text.

A neuron of ``mlp.hidden.i`` writes its down-projection column into the residual stream; an SAE latent
writes its decoder row (in site units: ``W_dec[j] / target_scale``; an SAE on ``mlp.hidden.i`` writes
through the down projection). The direct effect is ``unembed(direction)``: the LM head (and OPT's
``project_out``) applied to the direction, skipping the later layers and the final norm, the usual
"direct logit attribution" reading (the final norm's gain and scale would only rescale it for RMSNorm).
A residual-stream coordinate's direction is its basis vector. Sites that are not in the residual basis (``mlp.in.i``, ``attn`` internals) have no such direction.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from actlab.errors import ActlabError

__all__ = ["output_directions", "logit_table"]

_RESIDUAL = re.compile(r"^(resid\.\d+|mlp\.\d+|attn\.\d+|embed|final)$")
_HIDDEN = re.compile(r"^mlp\.hidden\.(\d+)$")


def output_directions(model, site: str, units: np.ndarray, sae=None) -> tuple[torch.Tensor | None, str]:
    """``([U, d_model] directions, "")``, or ``(None, why)`` where the site has no residual-stream direction."""
    units_t = torch.as_tensor(np.asarray(units, dtype=np.int64))
    hidden = _HIDDEN.match(site)
    with torch.no_grad():
        if sae is not None:
            rows = (sae.W_dec[units_t] / sae.target_scale).float()
            if hidden:
                return rows @ model.anatomy.mlp_parts(int(hidden.group(1))).down.float().T, ""
            if _RESIDUAL.match(site):
                return rows, ""
            return None, f"the SAE's decoder writes into '{site}', which is not the residual stream"
        if hidden:
            return model.anatomy.mlp_parts(int(hidden.group(1))).down.float()[:, units_t].T.contiguous(), ""
        if _RESIDUAL.match(site):  # a residual coordinate: its basis vector
            return torch.eye(model.sites[site])[units_t], ""
    return None, f"'{site}' is not in the residual basis, so its units have no direct logit effect"


def logit_table(model, directions: torch.Tensor, n: int = 10, chunk: int = 256) -> dict[str, np.ndarray]:
    """The ``n`` most promoted and most suppressed tokens of each direction: ``{"top_ids", "top_values",
    "bottom_ids", "bottom_values"}``, each ``[U, n]`` (largest first / most negative first). Chunked over
    units, so a large vocabulary never needs a ``[units, vocab]`` matrix at once."""
    if directions.ndim != 2 or directions.shape[0] == 0:
        raise ActlabError("logit_table needs a [units, d_model] matrix of directions")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("top_ids", "top_values", "bottom_ids", "bottom_values")}
    with torch.no_grad():
        for start in range(0, directions.shape[0], chunk):
            logits = model.anatomy.unembed(directions[start:start + chunk]).float().cpu()
            k = min(n, logits.shape[1])
            top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
            parts["top_ids"].append(top.indices.numpy())
            parts["top_values"].append(top.values.numpy())
            parts["bottom_ids"].append(bottom.indices.numpy())
            parts["bottom_values"].append(bottom.values.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}
