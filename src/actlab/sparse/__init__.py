"""Activation-sparse inference (docs/sparse.md): thresholds that decide which attention and MLP inputs to skip
(TEAL, WINA, CATS, CETT; TEAL's greedy allocation in ``allocate``), a compiled CPU kernel over input-major weights,
the sparse MLP and attention projections spliced into a model, and ReLU-fication (``relufy``).

``actlab.sparse.cett`` is the CETT rule of the Sparsing Law (Luo et al., 2024): per-layer
thresholds on each neuron's contribution ``|a_j| * ||w_out,j||``, calibrated to a shared
cumulative error of tail truncation. It needs only torch and ``actlab.errors``, so an inference
package can import it without the profile analyses.
"""

from actlab.sparse.cett import (
    CettCurve, ContributionThreshold, calibrate_threshold, cett, contributions, mean_cett, output_norms,
)
from actlab.sparse.attention import SparseLinear, same_zeros
from actlab.sparse.kernel import input_major, kernel_available, sparse_matvec
from actlab.sparse.mlp import SparseMLP, SparseSplice, mask_edits, measured_sparsity, sparse_edits, splice, zero_edits
from actlab.sparse.thresholds import METHODS, Thresholds, calibrate, load_thresholds

# actlab.sparse.evaluate (perplexity and the report vs sparsity) is imported where used: it pulls in evals and report.
__all__ = ["CettCurve", "ContributionThreshold", "METHODS", "SparseLinear", "SparseMLP", "SparseSplice", "Thresholds", "calibrate",
           "calibrate_threshold", "cett", "contributions", "input_major", "kernel_available", "load_thresholds",
           "mask_edits", "mean_cett", "measured_sparsity", "output_norms", "same_zeros", "sparse_edits", "sparse_matvec", "splice",
           "zero_edits"]
