"""Evaluation harnesses over actlab's verbs — the verbs never import this package.

| module | job |
|---|---|
| ``genre_data`` | the disjoint data of the genre experiments (fit pairs, prompts, neutral texts, profile prompts; the tuning / evaluation splits) |
| ``genre_scoring`` | ``GenreScorer``: continuations under an edit → genre hits per row + neutral perplexity |
| ``steering_eval`` | ``dose_response`` and ``layer_sweep`` over steering interventions |
| ``steering_results`` | their results: ``DoseResponse``, ``LayerSweep`` (summaries, tables, figures, JSON) |
| ``genre_eval`` | ``evaluate_genre`` (``actlab steer eval``): sweep → fit every method → dose-response |
| ``transfer_eval`` | ``evaluate_transfer`` (``actlab paste eval``): Command-V validated in steps |
| ``transfer_controls`` / ``transfer_scoring`` / ``transfer_compute`` | its random controls, scoring, compute accounting |
| ``transfer_results`` | ``TransferEvaluation`` |
| ``transfer_matrix`` | the genre × direction × kind × seed matrix of ``evaluate_transfer`` runs, pooled (``benchmarks/transfer_matrix.py``) |
| ``known_pairs`` | recipients with a known answer: the donor in a rotated basis, the donor fine-tuned briefly |
| ``tour`` | ``actlab demo`` |
"""

from __future__ import annotations

import importlib

_WHERE = {
    "GenreSetup": "genre_data", "genre_setup": "genre_data", "neutral_texts": "genre_data",
    "default_profile_prompts": "genre_data", "adapter_training_data_for_genre": "genre_data",
    "split_setup": "genre_data", "passage_contrast": "genre_data",
    "split_prompts": "genre_data", "split_passages": "genre_data",
    "GenreScorer": "genre_scoring", "ScoringConfig": "genre_scoring",
    "dose_response": "steering_eval", "layer_sweep": "steering_eval",
    "DoseResponse": "steering_results", "LayerSweep": "steering_results", "spearman": "steering_results",
    "evaluate_genre": "genre_eval", "fit_methods": "genre_eval", "write_evaluation": "genre_eval",
    "GenreEvalConfig": "genre_eval",
    "evaluate_transfer": "transfer_eval", "TransferEvalConfig": "transfer_eval", "default_site": "transfer_eval",
    "TransferEvaluation": "transfer_results", "random_adapter_like": "transfer_controls",
    "run_tour": "tour",
    "matrix_cells": "transfer_matrix", "run_cell": "transfer_matrix", "summarise": "transfer_matrix",
    "rotated_copy": "known_pairs", "finetuned_copy": "known_pairs", "known_pair": "known_pairs",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    """Lazy: importing the package does not load torch, matplotlib or the demo data."""
    if name in _WHERE:
        return getattr(importlib.import_module(f"actlab.experiments.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'actlab.experiments' has no attribute {name!r}")
