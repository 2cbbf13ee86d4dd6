"""Sparse autoencoders and transcoders (docs/sae.md): the module (TopK, BatchTopK, JumpReLU; ReLU read from
other libraries), its file formats (ours, SAELens, sparsify), the trainer and its feeds (tensors, stores,
a model stream), metrics and the spliced LM loss, and attaching an SAE to a model as a site.
"""

from actlab.sae.files import FORMAT, load_sae, save_sae
from actlab.sae.interop import export_saelens, load_external, load_saelens, load_sparsify
from actlab.sae.metrics import evaluate_sae
from actlab.sae.model import KINDS, SparseAutoencoder
from actlab.sae.splice import attach, reconstruction
from actlab.sae.spliced import spliced_loss
from actlab.sae.train import CHECKPOINT_NAME, SAETrainConfig, SAETrainer, SAETrainResult, train_sae

__all__ = ["CHECKPOINT_NAME", "FORMAT", "KINDS", "SAETrainConfig", "SAETrainResult", "SAETrainer",
           "SparseAutoencoder", "attach", "evaluate_sae", "export_saelens", "load_external", "load_sae",
           "load_saelens", "load_sparsify", "reconstruction", "save_sae", "spliced_loss", "train_sae"]
