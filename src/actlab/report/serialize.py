"""Results to disk: JSON that never holds NaN (null instead) or numpy/torch scalars, and saved figures.

The JSON serialiser itself lives in ``actlab.files`` (the one place that writes actlab's files);
it is re-exported here, where reports have always found it.
"""

from __future__ import annotations

from pathlib import Path

from actlab.files import to_jsonable, write_json

__all__ = ["save_figure", "to_jsonable", "write_json"]


def save_figure(fig, path: str | Path | None):
    """Save ``fig`` as PNG when ``path`` is given; return the figure either way."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(path), dpi=110)
    return fig
