"""Interventions: serialisable, composable edits of a site (see docs/steering.md)."""

from actlab.interventions.base import (
    Composition,
    Intervention,
    load_interventions,
    load_with_coef,
    save_interventions,
)
from actlab.interventions.latents import LatentEdit, latent_direction, latent_edit
from actlab.interventions.types import AffineMap, LowRankAdapter, NeuronClamp, SteeringVector

load = load_interventions

__all__ = [
    "AffineMap", "Composition", "Intervention", "LatentEdit", "LowRankAdapter", "NeuronClamp", "SteeringVector",
    "latent_direction", "latent_edit",
    "load", "load_interventions", "load_with_coef", "save_interventions",
]
