"""Activation-sparse inference building blocks: thresholds that decide which MLP neurons to skip.

``actlab.sparse.cett`` is the CETT rule of the Sparsing Law (Luo et al., 2024): per-layer
thresholds on each neuron's contribution ``|a_j| * ||w_out,j||``, calibrated to a shared
cumulative error of tail truncation. It needs only torch and ``actlab.errors``, so an inference
package can import it without the profile analyses.
"""

from actlab.sparse.cett import (
    CettCurve, ContributionThreshold, calibrate_threshold, cett, contributions, mean_cett, output_norms,
)

__all__ = ["CettCurve", "ContributionThreshold", "calibrate_threshold", "cett", "contributions", "mean_cett", "output_norms"]
