"""The Intervention protocol: a serialisable edit of one site, scaled by a coefficient, composable.

Every intervention is an engine Edit (``site`` + ``__call__(h, state) -> new h``), so it runs
through the same hooks as captures. Additive ones also expose ``delta(h)`` — the change they add
— which is what Command-V converts between models. Files are safetensors with a JSON header that
records the model the intervention was made for; loading it onto another model is refused.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch

from actlab.engine.edits import POSITION_MODES, check_finite, column_mask
from actlab.engine.hooks import ForwardState
from actlab.errors import ActlabError
from actlab.files import NUMBER, HeaderFields, load_tensors, save_tensors

FORMAT = "actlab.intervention"
FORMAT_VERSION = 1
_REGISTRY: dict[str, type["Intervention"]] = {}


def register(cls):
    _REGISTRY[cls.kind] = cls
    return cls


@dataclass
class Intervention:
    """Base class: subclasses set ``kind``, ``tensor_names`` and implement ``delta`` or ``apply``."""

    kind: ClassVar[str] = "base"
    tensor_names: ClassVar[tuple[str, ...]] = ()

    site: str
    coef: float = 1.0
    positions: str = "all"  # all | prompt | generated
    model: dict[str, Any] = field(default_factory=dict)  # identity of the model it was made for
    params: dict[str, Any] = field(default_factory=dict)  # hyper-parameters and fit diagnostics

    def __post_init__(self) -> None:
        check_finite(self.coef, "the coefficient")
        if self.positions not in POSITION_MODES:
            raise ActlabError(f"positions must be one of {POSITION_MODES}, not {self.positions!r}")
        for name in self.tensor_names:
            value = getattr(self, name)
            if value is not None:
                check_finite(value, f"{self.kind} tensor '{name}'")

    # ----------------------------------------------------------------- math
    additive: ClassVar[bool] = True

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The change added to ``h`` at coefficient 1 (additive interventions)."""
        raise NotImplementedError

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """The edited activation at all positions (default: h + coef * delta)."""
        return h + self.coef * self.delta(h)

    def __call__(self, h: torch.Tensor, state: ForwardState) -> torch.Tensor:
        if h.shape[-1] != self.width:
            raise ActlabError(
                f"{self.kind} for '{self.site}' has width {self.width} but the model's site has width {h.shape[-1]}; "
                "it was made for another model: use `actlab paste` to transfer it"
            )
        new = self.apply(h)
        cols = column_mask(state, self.positions)
        if cols is None:
            return new
        keep = cols.to(h.device).view(1, -1, *([1] * (h.ndim - 2)))
        return torch.where(keep, new, h)

    @property
    def width(self) -> int:
        raise NotImplementedError

    def edits(self) -> list["Intervention"]:
        return [self]

    # ------------------------------------------------------------ algebra
    def scaled(self, coef: float) -> "Intervention":
        """A copy with the coefficient multiplied by ``coef``."""
        check_finite(coef, "the coefficient")
        new = copy.copy(self)
        new.coef = self.coef * float(coef)
        return new

    def __mul__(self, coef: float) -> "Intervention":
        return self.scaled(coef)

    __rmul__ = __mul__

    def __neg__(self) -> "Intervention":
        return self.scaled(-1.0)

    def __add__(self, other) -> "Composition":
        return Composition(self.edits() + other.edits())

    def at(self, positions: str) -> "Intervention":
        new = copy.copy(self)
        new.positions = positions
        new.__post_init__()
        return new

    # ---------------------------------------------------------- model check
    def check_model(self, model) -> None:
        """Refuse to apply to a model of another shape (or, with a config hash, another model)."""
        if self.site not in model.sites:
            model.resolve([self.site])  # raises the unknown-site error
        expected = model.sites[self.site]
        made_for = self.model.get("model_name", "another model")
        if self.width and expected != self.width:  # width 0: not recorded (e.g. a clamp made by hand)
            raise ActlabError(
                f"this {self.kind} was made for {made_for} ('{self.site}' width {self.width}); "
                f"{model.name} has width {expected} there. Transfer it with `actlab paste run` instead"
            )
        ours = self.model.get("config_hash")
        if ours and ours != model.config_hash:
            raise ActlabError(
                f"this {self.kind} was made for {made_for} (config {ours}); {model.name} has another configuration "
                f"({model.config_hash}). Transfer it with `actlab paste run` instead"
            )

    # ------------------------------------------------------------- files
    def header(self) -> dict[str, Any]:
        from actlab import __version__

        return {
            "kind": self.kind, "site": self.site, "coef": self.coef, "positions": self.positions,
            "model": self.model, "params": self.params, "actlab_version": __version__,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n).detach().float().contiguous().cpu() for n in self.tensor_names
                if getattr(self, n) is not None}

    def save(self, path: str | Path) -> Path:
        return save_interventions([self], path)


class Composition:
    """Several interventions applied together (in order); saved as one file."""

    def __init__(self, items: Iterable[Intervention]):
        self.items = list(items)

    def edits(self) -> list[Intervention]:
        return list(self.items)

    def __add__(self, other) -> "Composition":
        return Composition(self.items + other.edits())

    def __mul__(self, coef: float) -> "Composition":
        return Composition(i.scaled(coef) for i in self.items)

    __rmul__ = __mul__

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def check_model(self, model) -> None:
        for item in self.items:
            item.check_model(model)

    def save(self, path: str | Path) -> Path:
        return save_interventions(self.items, path)


def save_interventions(items: list[Intervention], path: str | Path) -> Path:
    """Write interventions to one safetensors file; tensors are keyed ``{index}/{name}``."""
    items = list(items)
    if not items:
        raise ActlabError(f"nothing to save to {path}: the composition holds no intervention")
    tensors: dict[str, torch.Tensor] = {}
    headers = []
    for i, item in enumerate(items):
        headers.append(item.header())
        for name, tensor in item.tensors().items():
            tensors[f"{i}/{name}"] = tensor
    return save_tensors(path, tensors, FORMAT, {"format_version": str(FORMAT_VERSION), "interventions": json.dumps(headers)})


_LOAD_ERRORS = (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError, OverflowError)


def _check_version(fields: HeaderFields) -> None:
    version = fields.text("format_version", default=str(FORMAT_VERSION))
    if not (version.isascii() and version.isdigit() and len(version) < 4) or int(version) < 1:
        raise fields.damaged(f"its format_version is {version[:20]!r}, not a version number")
    if int(version) > FORMAT_VERSION:
        raise ActlabError(f"'{fields.path}' has intervention format version {version}, newer than this actlab "
                          f"understands ({FORMAT_VERSION}); upgrade actlab to read it")


def _rebuild(fields: HeaderFields, i: int, header: Any, tensors: dict[str, torch.Tensor]) -> Intervention:
    """Intervention ``i`` of a file from its JSON header and its tensors; checked field by field."""
    where = f"interventions[{i}]"
    header = fields.check(header, dict, where)
    kind = fields.item(header, "kind", str, where)
    cls = _REGISTRY.get(kind)
    if cls is None:
        raise ActlabError(f"'{fields.path}' holds an intervention of unknown kind {kind[:40]!r}; upgrade actlab")
    args = {"site": fields.item(header, "site", str, where), "coef": fields.item(header, "coef", NUMBER, where),
            "positions": fields.item(header, "positions", str, where),
            "model": fields.item(header, "model", dict, where), "params": fields.item(header, "params", dict, where)}
    own = {name: tensors[f"{i}/{name}"] for name in cls.tensor_names if f"{i}/{name}" in tensors}
    for name, t in own.items():
        if not t.is_floating_point() and (t.dtype == torch.bool or (t.numel() and int(t.min()) < 0)):
            raise fields.damaged(f"{where} tensor '{name}' holds negative or boolean entries")
    try:
        item = cls(**args, **own)
        if item.additive and item.width < 1:
            raise ValueError("its tensors are empty")
        ints = [int(t.max()) for t in own.values() if not t.is_floating_point() and t.numel()]
        probe = torch.zeros(1, 1, item.width or 1 + max(ints, default=0))
        if item.apply(probe).shape != probe.shape:  # tensors of shapes that disagree fail here, not in a forward pass
            raise ValueError("its output has another shape than its input")
    except ActlabError as e:
        raise fields.damaged(f"{where} ({kind}): {e}") from None
    except _LOAD_ERRORS as e:
        raise fields.damaged(f"{where} ({kind}) does not fit its tensors ({type(e).__name__}: {str(e)[:120]})") from None
    return item


def load_interventions(path: str | Path, model=None) -> Intervention | Composition:
    """Read an intervention file; with ``model``, refuse one made for a different model.

    The header is checked field by field and the tensors against it (ActlabError naming the file
    and the field); a file that holds no intervention is refused."""
    tensors, metadata = load_tensors(path, FORMAT, "intervention")
    fields = HeaderFields(path, "intervention", metadata)
    _check_version(fields)
    headers = fields.json("interventions", list)
    if not headers:
        raise ActlabError(f"intervention file '{path}' holds no intervention (its list is empty): it would change "
                          "nothing; make it again with `actlab steer fit` or save a non-empty composition")
    kinds = [h.get("kind") if isinstance(h, dict) and isinstance(h.get("kind"), str) else None for h in headers]
    expected = {f"{i}/{name}" for i, kind in enumerate(kinds) for name in getattr(_REGISTRY.get(kind), "tensor_names", ())}
    extra = sorted(set(tensors) - expected)
    items = [_rebuild(fields, i, header, tensors) for i, header in enumerate(headers)]
    if extra:
        raise fields.damaged(f"it holds tensors no intervention uses ({', '.join(extra[:3])})")
    result: Intervention | Composition = items[0] if len(items) == 1 else Composition(items)
    if model is not None:
        result.check_model(model)
    return result


def load_with_coef(spec: str, model=None) -> Intervention | Composition:
    """``FILE`` or ``FILE:COEF`` (the CLI's --edit syntax) → a loaded, scaled intervention."""
    path, _, coef = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not path:
        path, coef = spec, ""
    try:
        value = float(coef) if coef else 1.0
    except ValueError:
        raise ActlabError(f"--edit expects FILE or FILE:COEF, e.g. vec.safetensors:4.0, not {spec!r}") from None
    check_finite(value, f"the coefficient in {spec!r}")
    return load_interventions(path, model) * value
