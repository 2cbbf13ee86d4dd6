"""Command-V: paste an intervention from a donor model into a recipient via activation profiles.

The verbs only: profiles (``profiles``), ridge converters (``converters``), the closed-form paste
(``paste``), the paste of an adapter by its effect on the last layer (``effect_paste``) and the two-model pipeline the CLI runs (``pipeline.paste_between``). The validation on
the demo models is an experiment: ``actlab.experiments.transfer_eval``.
"""

from actlab.transfer.converters import (
    MIN_LAMBDA, PASTE_LAMBDAS, ConverterSet, LinearMap, fit_converters, fit_linear_map, match_layers_by_depth,
    parse_layer_map,
)
from actlab.transfer.paste import (
    adapter_as_affine, calibrate_scale, expected_ratio, paste, predicted_effect, shared_correlations,
)
from actlab.transfer.effect_paste import paste_effect
from actlab.transfer.pipeline import PasteConfig, PasteResult, fit_paste_converters, paste_between
from actlab.transfer.profiles import ActivationProfile, cached_profile, profile_model

__all__ = [
    "ActivationProfile", "ConverterSet", "LinearMap", "MIN_LAMBDA", "PASTE_LAMBDAS", "PasteConfig", "PasteResult",
    "adapter_as_affine", "calibrate_scale", "expected_ratio", "shared_correlations", "cached_profile",
    "fit_converters", "fit_linear_map", "fit_paste_converters",
    "match_layers_by_depth", "parse_layer_map", "paste", "paste_between", "paste_effect", "predicted_effect", "profile_model",
]
