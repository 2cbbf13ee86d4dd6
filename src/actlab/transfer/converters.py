"""Linear converters between two models' residual streams, fitted by ridge regression.

For each matched layer pair we fit, independently in both directions, an affine map
``y ≈ (x − μ_x) C + μ_y`` (centering optional) by ridge least squares. λ is chosen per pair
from a grid by error on held-out prompts — never silently zero — and the held-out R² of the
chosen λ is reported. The reference implementation used an unregularised pinv on N < d rows,
which interpolates the profile set exactly and says nothing about unseen prompts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from actlab.errors import ActlabError
from actlab.files import NUMBER, HeaderFields, load_tensors, save_tensors
from actlab.linalg import LAMBDA_GRID, fit_ridge, fit_ridge_both_ways
from actlab.transfer.profiles import ActivationProfile

FORMAT = "actlab.converters"
# The floor on the ridge λ used when pasting (``actlab paste run`` and the Command-V evaluation): the
# held-out error alone picks λ ≈ 1e-4 on all-token profiles, which predicts activations best but gives
# large gains to donor directions the profile barely varies in; a pasted adapter then becomes a large,
# unrelated edit (docs/transfer.md). The one place the floor is set.
MIN_LAMBDA = 0.1
PASTE_LAMBDAS = tuple(lam for lam in LAMBDA_GRID if lam >= MIN_LAMBDA)  # (0.1, 0.3, 1.0, 3.0, 10.0)


def match_layers_by_depth(n_donor: int, n_recipient: int, donor_layers: Sequence[int] | None = None) -> dict[int, int]:
    """Donor layer → recipient layer with the nearest relative depth ((i + 1) / n_layers).

    Works in both directions (donor deeper or shallower than the recipient); every donor layer
    gets exactly one recipient layer, and the last layer maps to the last.
    """
    layers = list(range(n_donor)) if donor_layers is None else list(donor_layers)
    mapping = {}
    for d in layers:
        if not 0 <= d < n_donor:
            raise ActlabError(f"donor layer {d} is out of range (donor has {n_donor} layers)")
        depth = (d + 1) / n_donor
        mapping[d] = min(range(n_recipient), key=lambda r: (abs((r + 1) / n_recipient - depth), r))
    return mapping


def parse_layer_map(text: str, n_donor: int, n_recipient: int) -> dict[int, int]:
    """``"0:0,2:3"`` → {0: 0, 2: 3} (donor:recipient), validated against both models."""
    mapping = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            d, r = (int(x) for x in part.split(":"))
        except ValueError:
            raise ActlabError(f"--map expects donor:recipient pairs like 0:0,2:3, not {part!r}") from None
        if not 0 <= d < n_donor or not 0 <= r < n_recipient:
            raise ActlabError(f"--map pair {part}: the donor has layers 0..{n_donor - 1}, the recipient 0..{n_recipient - 1}")
        mapping[d] = r
    if not mapping:
        raise ActlabError("--map is empty")
    return mapping


@dataclass
class LinearMap:
    """y = (x − x_mean) @ weight + y_mean; fitted with ridge ``lam`` (relative to the mean eigenvalue)."""

    weight: torch.Tensor  # [d_in, d_out]
    x_mean: torch.Tensor  # [d_in]
    y_mean: torch.Tensor  # [d_out]
    lam: float
    r2: float  # held-out R² at the chosen lambda
    train_r2: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean.to(x.device, x.dtype)) @ self.weight.to(x.device, x.dtype) + self.y_mean.to(x.device, x.dtype)

    def linear(self, delta: torch.Tensor) -> torch.Tensor:
        """Map a *difference* of activations: offsets cancel, only the weight acts."""
        return delta @ self.weight.to(delta.device, delta.dtype)


def fit_linear_map(
    x: torch.Tensor, y: torch.Tensor, *, center: bool = True, holdout: float = 0.2, seed: int = 0,
    lambdas: Sequence[float] = LAMBDA_GRID,
) -> LinearMap:
    """Ridge regression x → y with λ chosen on a held-out split, then refitted on all rows (``linalg.fit_ridge``)."""
    _check_rows(x, y)
    return _as_linear_map(fit_ridge(x, y, lambdas=lambdas, holdout=holdout, seed=seed, center=center))


def _check_rows(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise ActlabError(f"profiles have different row counts ({x.shape[0]} vs {y.shape[0]}): profile both models on "
                          "the same prompts with the same positions")
    if x.shape[0] < 4:
        raise ActlabError(f"only {x.shape[0]} profile rows: converters need at least a few dozen prompts (hundreds is better)")


def _as_linear_map(fit) -> LinearMap:
    return LinearMap(weight=fit.weight.float(), x_mean=fit.x_mean.float(), y_mean=fit.y_mean.float(), lam=fit.lam,
                     r2=fit.r2, train_r2=fit.train_r2)


def fit_linear_maps_both_ways(x: torch.Tensor, y: torch.Tensor, *, center: bool = True, holdout: float = 0.2,
                              seed: int = 0, lambdas: Sequence[float] = LAMBDA_GRID) -> tuple[LinearMap, LinearMap]:
    """``(x → y, y → x)``: ``fit_linear_map`` both ways on the same split, sharing the cross product."""
    _check_rows(x, y)
    forward, backward = fit_ridge_both_ways(x, y, lambdas=lambdas, holdout=holdout, seed=seed, center=center)
    return _as_linear_map(forward), _as_linear_map(backward)


@dataclass
class ConverterSet:
    """Converters for matched layer pairs: ``to_donor[l_D]`` maps recipient l_R → donor l_D, ``to_recipient`` back."""

    layer_map: dict[int, int]  # donor layer → recipient layer
    to_donor: dict[int, LinearMap]
    to_recipient: dict[int, LinearMap]
    donor: dict
    recipient: dict
    prompts_hash: str
    fit_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def report(self) -> list[dict]:
        return [
            {"donor_layer": d, "recipient_layer": r, "r2_to_donor": self.to_donor[d].r2,
             "r2_to_recipient": self.to_recipient[d].r2, "lambda_to_donor": self.to_donor[d].lam,
             "lambda_to_recipient": self.to_recipient[d].lam}
            for d, r in self.layer_map.items()
        ]

    def save(self, path: str | Path) -> Path:
        tensors, fits = {}, {}
        for d in self.layer_map:
            for direction, table in (("to_donor", self.to_donor), ("to_recipient", self.to_recipient)):
                m = table[d]
                for name in ("weight", "x_mean", "y_mean"):
                    tensors[f"{direction}.{d}.{name}"] = getattr(m, name)
                fits[f"{direction}.{d}"] = {"lam": m.lam, "r2": m.r2, "train_r2": m.train_r2}
        metadata = {
            "layer_map": json.dumps(self.layer_map), "donor": json.dumps(self.donor),
            "recipient": json.dumps(self.recipient), "prompts_hash": self.prompts_hash, "fits": json.dumps(fits),
            "fit_seconds": str(self.fit_seconds),
        }
        return save_tensors(path, tensors, FORMAT, metadata)

    @classmethod
    def load(cls, path: str | Path) -> "ConverterSet":
        """Every matrix is restored (the reference code's compressed format came back as zeros); the
        header and the tensors are checked first (ActlabError naming the file and what is wrong)."""
        tensors, meta = load_tensors(path, FORMAT, "converter")
        fields = HeaderFields(path, "converter", meta)
        raw_map, fits = fields.json("layer_map", dict), fields.json("fits", dict)
        if not raw_map:
            raise fields.damaged("its layer_map is empty")
        layer_map = {}
        for k, v in raw_map.items():
            if not (k.isascii() and k.isdigit() and len(k) < 7) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise fields.damaged(f"layer_map entry {k[:20]!r}: {str(v)[:20]} is not a pair of layer numbers")
            layer_map[int(k)] = v
        tables: dict[str, dict[int, LinearMap]] = {"to_donor": {}, "to_recipient": {}}
        for d in layer_map:
            for direction in tables:
                tables[direction][d] = _load_map(fields, tensors, fits, f"{direction}.{d}")
        fit_seconds = fields.number("fit_seconds", float, "0")
        return cls(layer_map=layer_map, to_donor=tables["to_donor"], to_recipient=tables["to_recipient"],
                   donor=fields.json("donor", dict), recipient=fields.json("recipient", dict),
                   prompts_hash=fields.text("prompts_hash"), fit_seconds=fit_seconds)


def _load_map(fields: HeaderFields, tensors: dict[str, torch.Tensor], fits: dict, key: str) -> LinearMap:
    """One direction of one layer pair: weight [d_in, d_out], x_mean [d_in], y_mean [d_out], finite floats."""
    fit = fields.check(fits.get(key), dict, f"fits['{key}']")
    numbers = {name: fields.item(fit, name, NUMBER, f"fits['{key}']") for name in ("lam", "r2", "train_r2")}
    parts = {}
    for name in ("weight", "x_mean", "y_mean"):
        t = tensors.get(f"{key}.{name}")
        if t is None or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise fields.damaged(f"tensor '{key}.{name}' is missing, not floating point or not finite")
        parts[name] = t
    w = parts["weight"]
    if w.ndim != 2 or parts["x_mean"].shape != (w.shape[0],) or parts["y_mean"].shape != (w.shape[1],):
        raise fields.damaged(f"the shapes of '{key}' disagree (weight {list(w.shape)}, x_mean "
                             f"{list(parts['x_mean'].shape)}, y_mean {list(parts['y_mean'].shape)})")
    return LinearMap(**parts, **numbers)


def fit_converters(
    donor: ActivationProfile,
    recipient: ActivationProfile,
    *,
    layer_map: dict[int, int] | None = None,
    center: bool = True,
    holdout: float = 0.2,
    seed: int = 0,
    lambdas: Sequence[float] | None = None,
    min_lambda: float = 0.0,
) -> ConverterSet:
    """Fit C(R→D) and C(D→R) for every matched layer pair (relative depth unless ``layer_map``).

    λ is chosen per pair by held-out error from ``lambdas`` (default ``LAMBDA_GRID``) restricted to
    values ≥ ``min_lambda``. For pasting trained adapters a floor of 0.1 matters: the held-out error
    alone picks λ ≈ 1e-4 on all-token profiles, which predicts activations best but amplifies donor
    directions the profile barely varies in (see docs/transfer.md); pasting uses ``MIN_LAMBDA``.
    """
    grid = [float(x) for x in (lambdas if lambdas is not None else LAMBDA_GRID)]
    if any(not (x > 0) or x != x or x == float("inf") for x in grid) or min_lambda < 0:
        raise ActlabError(f"ridge λ values must be positive and finite, not {grid} (min_lambda {min_lambda})")
    grid = [x for x in grid if x >= min_lambda] or [float(min_lambda)]
    if donor.prompts_hash != recipient.prompts_hash:
        raise ActlabError("the two profiles were made on different prompts; profile both models on the same prompt file")
    if donor.positions != recipient.positions:
        raise ActlabError(f"the profiles use different positions ({donor.positions} vs {recipient.positions})")
    if donor.row_prompt.shape != recipient.row_prompt.shape or not torch.equal(donor.row_prompt, recipient.row_prompt):
        raise ActlabError("the profiles' rows do not align (different tokenizers give different token counts); "
                          "use positions='last' (one row per prompt)")
    mapping = layer_map or match_layers_by_depth(donor.n_layers, recipient.n_layers)
    start = time.perf_counter()
    to_donor, to_recipient = {}, {}
    for d, r in mapping.items():
        if d not in donor.acts or r not in recipient.acts:
            raise ActlabError(f"layer pair {d}:{r} is outside the profiles ({donor.n_layers} and {recipient.n_layers} layers)")
        to_recipient[d], to_donor[d] = fit_linear_maps_both_ways(donor.acts[d], recipient.acts[r], center=center,
                                                                 holdout=holdout, seed=seed, lambdas=grid)
    return ConverterSet(layer_map=dict(mapping), to_donor=to_donor, to_recipient=to_recipient, donor=donor.model,
                        recipient=recipient.model, prompts_hash=donor.prompts_hash,
                        fit_seconds=time.perf_counter() - start, extra={"lambda_grid": grid})
