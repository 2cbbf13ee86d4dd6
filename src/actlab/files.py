"""The one way actlab writes and reads its user files: safetensors + a JSON-able metadata header.

Writes are atomic (temp file in the same folder, then rename) and every file carries a
``format`` tag and actlab's version, so a file of the wrong kind, a damaged file or a file from
another tool is a clear error instead of a stack trace from deep inside safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from actlab.errors import ActlabError


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], fmt: str, metadata: dict[str, str]) -> Path:
    """Atomically write ``tensors`` with string metadata tagged ``format=fmt`` and the actlab version."""
    from actlab import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": fmt, "actlab_version": __version__, **metadata}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def load_tensors(path: str | Path, fmt: str, what: str, hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by ``save_tensors``; ``what`` names the kind of file in error messages."""
    path = Path(path)
    if not path.is_file():
        raise ActlabError(f"{what} file '{path}' does not exist{'; ' + hint if hint else ''}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ActlabError(f"'{path}' is not a readable {what} file ({exc}); was it written by actlab?") from None
    if metadata.get("format") != fmt:
        raise ActlabError(f"'{path}' is not an actlab {what} file (format: {metadata.get('format')!r})")
    # loaded tensors can sit at unaligned addresses; a copy makes kernels (and results) identical to the originals
    return {k: v.clone() for k, v in tensors.items()}, metadata
