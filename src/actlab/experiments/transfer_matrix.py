"""The Command-V matrix: every target genre × both directions × vectors and adapters × seeds of the
contrast split, each cell one ``evaluate_transfer`` run, pooled over seeds with bootstrap intervals.

``matrix_cells`` lists the runs, ``run_cell`` runs one and writes its JSON (skipped when the file is
already there, so an interrupted matrix resumes), ``summarise`` pools the seeds of each (genre,
direction, kind) and ``markdown_table`` writes the table of ``docs/transfer.md``.
``benchmarks/transfer_matrix.py`` drives it over worker processes.

Pooling: a cell's ratio is the mean over seeds of the pasted effect over the mean of the direct effect
(each effect a mean over prompts of the rate against ``none``); its 95% interval resamples the prompts
of every seed independently (2,000 draws).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from actlab.experiments.transfer_results import TARGET_PASTED, TARGET_RANDOM

__all__ = ["Cell", "matrix_cells", "run_cell", "load_results", "summarise", "markdown_table", "targets_met",
           "DIRECTIONS", "TARGET_ADAPTER_MIN", "TARGET_VECTOR_MIN"]

DIRECTIONS = (("demo-llama", "demo-gpt2"), ("demo-gpt2", "demo-llama"))
TARGET_VECTOR_MIN = 0.6  # no vector cell below this (mean ≥ TARGET_PASTED)
TARGET_ADAPTER_MIN = 0.5
N_BOOT = 2000


@dataclass(frozen=True)
class Cell:
    """One run of the matrix."""

    genre: str
    donor: str
    recipient: str
    kind: str
    seed: int
    split: str = "eval"

    @property
    def name(self) -> str:
        return f"{self.split}-{self.kind}-{self.genre}-{self.donor}-to-{self.recipient}-seed{self.seed}"


def matrix_cells(genres: Sequence[str], kinds: Sequence[str] = ("vector", "adapter"), seeds: Sequence[int] = (0, 1, 2),
                 directions: Sequence[tuple[str, str]] = DIRECTIONS, split: str = "eval") -> list[Cell]:
    """Every combination, ordered so that the cheap vector cells come first."""
    return [Cell(g, d, r, k, s, split) for k in kinds for s in seeds for d, r in directions for g in genres]


def run_cell(cell: Cell, models: dict[str, Any], out_dir: str | Path, *, cache_dir: str | Path | None = None,
             **overrides) -> Path:
    """Run ``evaluate_transfer`` for ``cell`` (models by name) and write ``{cell.name}.json`` under ``out_dir``;
    a cell whose file exists is not run again."""
    from actlab.experiments.transfer_eval import evaluate_transfer

    path = Path(out_dir) / f"{cell.name}.json"
    if path.is_file():
        return path
    result = evaluate_transfer(models[cell.donor], models[cell.recipient], kind=cell.kind, target_genre=cell.genre,
                               split=cell.split, seed=cell.seed, cache_dir=cache_dir, **overrides)
    data = result.to_dict()
    data["cell"] = cell.__dict__ | {"name": cell.name}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)  # whole files only: an interrupted run leaves no half-written cell
    return path


def load_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished cell under ``out_dir``."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(Path(out_dir).glob("*.json"))]


def _per_prompt_effects(result: dict[str, Any], condition: str) -> np.ndarray:
    per = result["ratios"]["per_prompt"]
    return np.asarray(per[condition]) - np.asarray(per["none"])


def _pooled_ratio(results: list[dict], condition: str, rng: np.random.Generator) -> tuple[float, list[float]]:
    effects = [(_per_prompt_effects(r, condition), _per_prompt_effects(r, "direct")) for r in results]
    with np.errstate(divide="ignore", invalid="ignore"):  # no direct effect at all: no ratio (nan)
        point = np.float64(np.mean([e.mean() for e, _ in effects])) / np.mean([d.mean() for _, d in effects])
    point = point if np.isfinite(point) else math.nan
    num, den = np.zeros(N_BOOT), np.zeros(N_BOOT)
    for e, d in effects:
        idx = rng.integers(0, len(e), size=(N_BOOT, len(e)))
        num += e[idx].mean(axis=1)
        den += d[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = num / den
    boot = boot[np.isfinite(boot)]
    ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if len(boot) else [math.nan, math.nan]
    return float(point), ci


def _rounded(x: float | None) -> float | None:
    """A seed's ratio for the table; None when that seed's direct edit had no effect (no ratio)."""
    return None if x is None else round(x, 3)


def summarise(results: Iterable[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """One row per (kind, genre, donor → recipient), pooled over its seeds; vectors first."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        c = r["cell"]
        groups.setdefault((c["kind"], c["genre"], c["donor"], c["recipient"]), []).append(r)
    rng = np.random.default_rng(seed)
    rows = []
    for (kind, genre, donor, recipient), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "vector", kv[0])):
        pasted, pasted_ci = _pooled_ratio(rs, "pasted", rng)
        rand, rand_ci = _pooled_ratio(rs, "random", rng)
        donor_none = [r["donor_conditions"]["none"]["rate"] for r in rs if r.get("donor_conditions")]
        donor_edit = [r["donor_conditions"]["edited"]["rate"] for r in rs if r.get("donor_conditions")]
        rows.append({
            "kind": kind, "genre": genre, "donor": donor, "recipient": recipient, "seeds": [r["cell"]["seed"] for r in rs],
            "donor_none": float(np.mean(donor_none)) if donor_none else math.nan,
            "donor_edited": float(np.mean(donor_edit)) if donor_edit else math.nan,
            "none": float(np.mean([r["conditions"]["none"]["rate"] for r in rs])),
            "direct_effect": float(np.mean([r["conditions"]["direct"]["effect"] for r in rs])),
            "pasted_effect": float(np.mean([r["conditions"]["pasted"]["effect"] for r in rs])),
            "pasted_over_direct": pasted, "pasted_ci": pasted_ci, "random_over_direct": rand, "random_ci": rand_ci,
            "per_seed": [_rounded(r["ratios"]["pasted_over_direct"]) for r in rs],
            "perplexity": {k: float(np.mean([r["conditions"][k]["perplexity"] for r in rs]))
                           for k in ("none", "pasted", "direct")},
            "cosine": _mean_diag(rs, "cosine_pasted_direct"), "norm_ratio": _mean_diag(rs, "norm_ratio_pasted_direct"),
            "gains": [g for r in rs for g in (r["settings"].get("deattenuation_gains") or [])],
        })
    return rows


def _mean_diag(results: list[dict], key: str) -> float:
    values = [r["diagnostics"][key] for r in results if key in r["diagnostics"]]
    return float(np.mean(values)) if values else math.nan


def targets_met(rows: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The issue's targets for one kind: the mean and the minimum of pasted/direct, the largest |random/direct|."""
    mine = [r for r in rows if r["kind"] == kind]
    if not mine:
        return {}
    ratios = [r["pasted_over_direct"] for r in mine]
    floor = TARGET_VECTOR_MIN if kind == "vector" else TARGET_ADAPTER_MIN
    worst_random = max(abs(r["random_over_direct"]) for r in mine)
    # a cell whose direct edit had no effect has no ratio (nan): it fails both targets rather than vanishing
    return {"cells": len(mine), "no_ratio": sum(math.isnan(x) for x in ratios), "mean": float(np.mean(ratios)),
            "min": float(np.min(ratios)),
            "max_abs_random": float(worst_random), "mean_ok": bool(np.mean(ratios) >= TARGET_PASTED),
            "min_ok": bool(np.min(ratios) >= floor), "random_ok": bool(worst_random <= TARGET_RANDOM) if kind == "vector"
            else None}


def _short(name: str) -> str:
    return name.removeprefix("demo-")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The matrix as a markdown table (one line per pooled cell) with each kind's summary under it."""
    head = ("| kind | genre | donor → recipient | seeds | donor effect | direct effect | pasted / direct (95%) | "
            "per seed | random / direct (95%) | cosine, norm ratio | perplexity none / pasted / direct |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['genre']} | {_short(r['donor'])} → {_short(r['recipient'])} | {len(r['seeds'])} | "
            f"{r['donor_none']:.2f} → {r['donor_edited']:.2f} | {r['direct_effect']:+.3f} | "
            f"**{r['pasted_over_direct']:.2f}** ({r['pasted_ci'][0]:.2f}–{r['pasted_ci'][1]:.2f}) | "
            f"{', '.join('—' if x is None else f'{x:.2f}' for x in r['per_seed'])} | "
            f"{r['random_over_direct']:+.2f} ({r['random_ci'][0]:+.2f}–{r['random_ci'][1]:+.2f}) | "
            + ("—" if math.isnan(r["cosine"]) else f"{r['cosine']:.2f}, {r['norm_ratio']:.2f}")
            + f" | {r['perplexity']['none']:.0f} / {r['perplexity']['pasted']:.0f} / {r['perplexity']['direct']:.0f} |")
    for kind in ("vector", "adapter"):
        t = targets_met(rows, kind)
        if t:
            lines.append("")
            lines.append(f"{kind}: {t['cells']} cells, mean pasted/direct **{t['mean']:.2f}**, lowest **{t['min']:.2f}**, "
                         f"largest |random/direct| {t['max_abs_random']:.2f}")
    return "\n".join(lines)
