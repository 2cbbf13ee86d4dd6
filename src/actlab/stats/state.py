"""What a ``ChannelStats`` saves: its tensors (names, dtypes, shapes) and the checks a loaded state
must pass, so a corrupt or foreign stats file is a clear error rather than wrong numbers."""

from __future__ import annotations

from typing import Any

import torch

from actlab.errors import ActlabError

# name -> (dtype, shape kind); "scalar" is 0-dim, the others are 1-D of the named length.
FIELDS: dict[str, tuple[torch.dtype, str]] = {
    "count": (torch.int64, "scalar"),
    "nonfinite": (torch.int64, "width"),
    "mean": (torch.float64, "width"),
    "m2": (torch.float64, "width"),
    "min": (torch.float64, "width"),
    "max": (torch.float64, "width"),
    "absmax": (torch.float64, "width"),
    "zeros": (torch.int64, "width"),
    "small": (torch.int64, "width"),
    "active": (torch.int64, "width"),
    "hist": (torch.int64, "hist"),
    "sparsity_hist": (torch.int64, "sparsity"),
    "top_value": (torch.float64, "topk"),
    "top_channel": (torch.int64, "topk"),
    "top_doc": (torch.int64, "topk"),
    "top_position": (torch.int64, "topk"),
    "top_token": (torch.int64, "topk"),
}
STATE_FIELDS = tuple(FIELDS)
CONFIG_KEYS = ("width", "eps", "hist_range", "bins_per_octave", "sparsity_bins", "topk")
# per-channel / per-site tensors kept as attributes of the same name ("mean" is kept as "_mean")
PLAIN_FIELDS = ("nonfinite", "m2", "min", "max", "absmax", "zeros", "small", "active", "hist", "sparsity_hist")


def check_config(config: Any, where: str) -> None:
    if not isinstance(config, dict):
        raise ActlabError(f"{where}: the stats config must be a JSON object, got {config!r}")
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown or "width" not in config:
        raise ActlabError(
            f"{where}: bad stats config {config!r} (needs 'width'; unknown keys: {sorted(unknown)})"
        )


def check_state(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], topk: int, where: str) -> int:
    """Raise unless every field is there with its dtype and shape; returns the number of top entries.
    ``shapes`` maps the shape kinds ``scalar`` / ``width`` / ``hist`` / ``sparsity`` to shapes."""
    missing = [k for k in FIELDS if k not in state]
    if missing:
        raise ActlabError(f"{where}: missing stats tensors {missing}; the file is incomplete or corrupt")
    n_top = state["top_value"].shape[0] if state["top_value"].dim() == 1 else -1
    if not 0 <= n_top <= topk:
        raise ActlabError(f"{where}: top_value holds {n_top} entries but topk is {topk}")
    for name, (dtype, kind) in FIELDS.items():
        t = state[name]
        shape = (n_top,) if kind == "topk" else shapes[kind]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ActlabError(
                f"{where}: stats tensor {name!r} should be {dtype} {shape}, got {got}; "
                "the file is corrupt or was written by an incompatible actlab"
            )
    if int(state["count"]) < 0:
        raise ActlabError(f"{where}: negative token count {int(state['count'])}; the file is corrupt")
    return n_top


def check_int(name: str, value, lo: int, hi: int) -> int:
    """A config integer in [lo, hi] (bools refused), or ActlabError."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ActlabError(f"{name} must be an integer between {lo} and {hi}, got {value!r}")
    return value


def check_eps(eps) -> float:
    """The small / active threshold as a float: 0 or a magnitude float32 can compare against."""
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ActlabError(f"eps must be a number such as 1e-3, got {eps!r}") from None
    if not (eps == 0.0 or 2.0**-80 <= eps <= 2.0**80):
        raise ActlabError(
            f"eps must be 0 (count exact zeros only) or between 1e-24 and 1e24, got {eps!r}"
        )
    return eps
