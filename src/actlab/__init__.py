"""actlab: record, measure, edit and transfer the activations inside transformer models."""

from actlab.errors import ActlabError

__version__ = "0.1.0"

__all__ = ["ActlabError", "__version__", "load"]


def load(*args, **kwargs):
    """Load a model (a bundled demo name, a local directory, a hub id, or an HF model object)."""
    from actlab.models.loading import load as _load

    return _load(*args, **kwargs)
