"""Command-V: paste an intervention from a donor model into a recipient via activation profiles."""

from actlab.transfer.converters import ConverterSet, LinearMap, fit_converters, fit_linear_map, match_layers_by_depth, parse_layer_map
from actlab.transfer.paste import adapter_as_affine, paste, predicted_effect
from actlab.transfer.profiles import ActivationProfile, cached_profile, profile_model



def __getattr__(name: str):
    """``evaluate_transfer`` lives with the demo-model validation; imported on first use."""
    if name in ("evaluate_transfer", "TransferEvaluation", "default_profile_prompts"):
        from actlab.transfer import evaluate

        return getattr(evaluate, name)
    raise AttributeError(name)


__all__ = ["evaluate_transfer", "TransferEvaluation", "default_profile_prompts",
    "ActivationProfile", "ConverterSet", "LinearMap", "adapter_as_affine", "fit_converters", "fit_linear_map",
    "match_layers_by_depth", "parse_layer_map", "paste", "profile_model", "cached_profile", "predicted_effect",
]
