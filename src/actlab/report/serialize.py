"""Results to disk: JSON that never holds NaN (null instead) or numpy/torch scalars, and saved figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def to_jsonable(value: Any) -> Any:
    """Plain JSON types, recursively: numpy/torch numbers and arrays become Python ones, NaN/inf become None."""
    try:
        import numpy as np
        import torch
    except ImportError:  # pragma: no cover
        np = torch = None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if torch is not None and isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if np is not None and isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if np is not None and isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, bool) or isinstance(value, int) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float) or (np is not None and isinstance(value, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return str(value)


def write_json(path: str | Path, data: Any, indent: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=indent) + "\n", encoding="utf-8")
    return path


def save_figure(fig, path: str | Path | None):
    """Save ``fig`` as PNG when ``path`` is given; return the figure either way."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(path), dpi=110)
    return fig
