"""actlab: record, measure, edit and transfer the activations inside transformer models."""

from actlab.errors import ActlabError

__version__ = "0.1.0"

__all__ = ["ActlabError", "__version__", "load", "Model", "SteeringVector", "AffineMap", "NeuronClamp",
           "LowRankAdapter", "Composition", "steering_vector", "fit_steering", "Replace"]


def load(*args, **kwargs):
    """Load a model (a bundled demo name, a local directory, a hub id, or an HF model object)."""
    from actlab.models.loading import load as _load

    return _load(*args, **kwargs)


def __getattr__(name: str):
    """Lazy top-level access to the main classes without importing torch-heavy modules at import time."""
    if name in ("SteeringVector", "AffineMap", "NeuronClamp", "LowRankAdapter", "Composition"):
        from actlab import interventions

        return getattr(interventions, name)
    if name in ("steering_vector", "fit_steering"):
        from actlab.interventions import fit

        return getattr(fit, name)
    if name == "Replace":
        from actlab.engine.edits import Replace

        return Replace
    if name == "datasets":
        import importlib

        return importlib.import_module("actlab.datasets")
    if name == "Model":
        from actlab.models.model import Model

        return Model
    raise AttributeError(f"module 'actlab' has no attribute {name!r}")
