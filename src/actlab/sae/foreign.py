"""Checked reading of another library's SAE folder (``cfg.json`` + one safetensors file) into our module.

Shared by the SAELens and sparsify readers in ``actlab.sae.interop``: every cfg value is
type-checked and every tensor checked for presence, floating dtype, the shape the cfg implies
and finite values, so a foreign file that is damaged or not what it claims to be is an
ActlabError naming the file and the field, never a wrong SAE or a stack trace from torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from actlab.errors import ActlabError
from actlab.files import brief
from actlab.sae.model import SparseAutoencoder

__all__ = ["TINY_THRESHOLD", "ForeignFolder", "assemble"]

_REQUIRED = object()
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}
# JumpReLU thresholds at or below zero (a latent that fires whenever it is positive) become the smallest
# normal float32, so that log_threshold stays finite; the two rules differ only for 0 < pre <= 1.2e-38
TINY_THRESHOLD = torch.finfo(torch.float32).tiny


class ForeignFolder:
    """A folder of ``library`` holding ``cfg.json`` and ``weights`` (e.g. ``sae_weights.safetensors``)."""

    def __init__(self, library: str, folder: str | Path, weights: str, hint: str):
        self.library, self.folder, self.hint = library, Path(folder), hint
        self.cfg_path, self.weights_path = self.folder / "cfg.json", self.folder / weights
        if not self.folder.is_dir():
            what_is = "is a file, not a folder" if self.folder.exists() else "does not exist"
            raise ActlabError(f"{library} folder '{self.folder}' {what_is}; give the folder that holds "
                              f"cfg.json and {weights}")
        missing = [p.name for p in (self.cfg_path, self.weights_path) if not p.is_file()]
        if missing:
            raise ActlabError(f"'{self.folder}' is not a {library} SAE folder: it has no {' and no '.join(missing)} "
                              f"(a {library} folder holds cfg.json and {weights}); {hint}")

    # ------------------------------------------------------------------ errors
    def bad(self, detail: str, path: Path | None = None) -> ActlabError:
        return ActlabError(f"{self.library} file '{path or self.cfg_path}': {detail}; {self.hint}")

    # ------------------------------------------------------------------ cfg.json
    def read_cfg(self) -> dict:
        """The parsed ``cfg.json`` (a JSON object)."""
        return self.read_json(self.cfg_path)

    def read_json(self, path: Path) -> dict:
        """A JSON object from ``path`` (a file of this folder)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self.bad(f"is not readable JSON ({brief(e)})", path) from None
        if not isinstance(data, dict):
            raise self.bad(f"should hold a JSON object, not {type(data).__name__}", path)
        return data

    def field(self, obj: dict, key: str, types: type | tuple[type, ...], default: Any = _REQUIRED,
              where: str = "") -> Any:
        """``obj[key]`` of one of ``types`` (never a boolean for a number), or ``default`` where absent."""
        name = f"{where}.{key}" if where else key
        if key not in obj:
            if default is _REQUIRED:
                raise self.bad(f"has no '{name}' field")
            return default
        value = obj[key]
        types = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise self.bad(f"'{name}' should be {wanted}, not {brief(value, 40)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.bad(f"'{name}' should be a finite number, not {value}")
        return value

    def size(self, obj: dict, key: str, default: Any = _REQUIRED, *, zero_ok: bool = False, where: str = "") -> int:
        """A width or count: an integer from 1 (0 where ``zero_ok``) to 2^24."""
        value = self.field(obj, key, int, default, where)
        if not (0 if zero_ok else 1) <= value <= 1 << 24:
            raise self.bad(f"'{key}' should be a {'non-negative' if zero_ok else 'positive'} integer "
                           f"of at most 2^24, not {value}")
        return value

    def choice(self, obj: dict, key: str, allowed: tuple, default: Any = _REQUIRED) -> Any:
        value = self.field(obj, key, (str, type(None)) if None in allowed else str, default)
        if value not in allowed:
            raise self.bad(f"'{key}' is {brief(value)}, which actlab does not know (known: "
                           f"{', '.join(map(repr, allowed))})")
        return value

    # ------------------------------------------------------------------ weights
    def read_weights(self) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.weights_path))
        except Exception as e:  # safetensors raises several types on truncated or garbage files
            raise self.bad(f"is not a readable safetensors file ({brief(e)})", self.weights_path) from None

    def tensor(self, tensors: dict[str, torch.Tensor], key: str, shape: list[int], why: str) -> torch.Tensor:
        """``tensors[key]`` as float32, checked: present, floating point, of ``shape`` (``why`` says whence), finite."""
        t = tensors.get(key)
        if t is None:
            raise self.bad(f"has no tensor '{key}' (expected {shape}, {why}; it holds {sorted(tensors)})",
                           self.weights_path)
        if not t.dtype.is_floating_point or list(t.shape) != shape:
            raise self.bad(f"tensor '{key}' should be floating point {shape} ({why}), not {t.dtype} "
                           f"{list(t.shape)}", self.weights_path)
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise self.bad(f"tensor '{key}' has {bad} values that are NaN or infinite (as float32)", self.weights_path)
        return t.clone()

    def no_others(self, tensors: dict[str, torch.Tensor], used: set[str], arch: str) -> None:
        """Refuse tensors this architecture does not use (the library itself loads strictly)."""
        extra = sorted(set(tensors) - used)
        if extra:
            raise self.bad(f"holds tensors a {arch} SAE does not have: {extra} (expected {sorted(used)})",
                           self.weights_path)


def assemble(kind: str, k: int | None, W_enc, b_enc, W_dec, b_dec, *, transcoder: bool, W_skip=None,
             threshold=None, input_scale: float = 1.0) -> SparseAutoencoder:
    """Our module (eval mode) holding these float32 tensors; ``threshold`` [n] for JumpReLU (clamped to
    ``TINY_THRESHOLD`` before its log is taken). ``W_*`` follow our conventions ([d_in, n], [n, d_out])."""
    d_in, n = W_enc.shape
    sae = SparseAutoencoder(d_in, n, kind, k, d_out=W_dec.shape[1] if transcoder else None, skip=W_skip is not None)
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec),
                            ("W_skip", W_skip)):
            if value is not None:
                getattr(sae, name).copy_(value)
        if threshold is not None:
            sae.log_threshold.copy_(threshold.clamp_min(TINY_THRESHOLD).log())
        sae.input_scale.fill_(input_scale)
    return sae.eval()
