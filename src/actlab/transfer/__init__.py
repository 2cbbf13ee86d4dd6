"""Command-V: paste an intervention from a donor model into a recipient via activation profiles."""

from actlab.transfer.converters import ConverterSet, LinearMap, fit_converters, fit_linear_map, match_layers_by_depth, parse_layer_map
from actlab.transfer.paste import adapter_as_affine, paste, predicted_effect
from actlab.transfer.profiles import ActivationProfile, cached_profile, profile_model

__all__ = [
    "ActivationProfile", "ConverterSet", "LinearMap", "adapter_as_affine", "fit_converters", "fit_linear_map",
    "match_layers_by_depth", "parse_layer_map", "paste", "profile_model", "cached_profile", "predicted_effect",
]
