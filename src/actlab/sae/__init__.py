"""Sparse autoencoders: the module (TopK, BatchTopK, JumpReLU), its file format, the trainer and metrics.

This package trains on activations the caller holds (a tensor, a function of the step, or an
iterable of batches); reading the store, streaming from a model and splicing build on it.
"""

from actlab.sae.files import FORMAT, load_sae, save_sae
from actlab.sae.metrics import evaluate_sae
from actlab.sae.model import KINDS, SparseAutoencoder
from actlab.sae.train import CHECKPOINT_NAME, SAETrainConfig, SAETrainResult, train_sae

__all__ = ["CHECKPOINT_NAME", "FORMAT", "KINDS", "SAETrainConfig", "SAETrainResult", "SparseAutoencoder",
           "evaluate_sae", "load_sae", "save_sae", "train_sae"]
