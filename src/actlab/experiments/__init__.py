"""Evaluation harnesses over actlab's verbs — the verbs never import this package.

| module | job |
|---|---|
| ``genre_data`` | the disjoint data of the genre experiments (fit pairs, prompts, neutral texts, profile prompts) |
| ``genre_scoring`` | ``GenreScorer``: continuations under an edit → genre hits per row + neutral perplexity |
| ``steering_eval`` | ``dose_response`` and ``layer_sweep`` over steering interventions |
| ``steering_results`` | their results: ``DoseResponse``, ``LayerSweep`` (summaries, tables, figures, JSON) |
| ``genre_eval`` | ``evaluate_genre`` (``actlab steer eval``): sweep → fit every method → dose-response |
| ``transfer_eval`` | ``evaluate_transfer`` (``actlab paste eval``): Command-V validated in steps |
| ``transfer_controls`` / ``transfer_scoring`` / ``transfer_compute`` | its random controls, scoring, compute accounting |
| ``transfer_results`` | ``TransferEvaluation`` |
| ``tour`` | ``actlab demo`` |
"""

from __future__ import annotations

import importlib

_WHERE = {
    "GenreSetup": "genre_data", "genre_setup": "genre_data", "evaluation_prompts": "genre_data",
    "default_profile_prompts": "genre_data", "adapter_training_data_for_genre": "genre_data",
    "tuning_prompts": "genre_data",
    "GenreScorer": "genre_scoring", "ScoringConfig": "genre_scoring",
    "dose_response": "steering_eval", "layer_sweep": "steering_eval",
    "DoseResponse": "steering_results", "LayerSweep": "steering_results", "spearman": "steering_results",
    "evaluate_genre": "genre_eval", "fit_methods": "genre_eval", "write_evaluation": "genre_eval",
    "GenreEvalConfig": "genre_eval",
    "evaluate_transfer": "transfer_eval", "TransferEvalConfig": "transfer_eval", "default_site": "transfer_eval",
    "TransferEvaluation": "transfer_results", "random_adapter_like": "transfer_controls",
    "run_tour": "tour",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    """Lazy: importing the package does not load torch, matplotlib or the demo data."""
    if name in _WHERE:
        return getattr(importlib.import_module(f"actlab.experiments.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'actlab.experiments' has no attribute {name!r}")
