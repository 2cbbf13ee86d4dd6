"""Evaluations: perplexity of a language model, and a genre classifier for the demo corpus."""

from actlab.evals.perplexity import perplexity

__all__ = ["perplexity", "GenreClassifier", "genre_rate"]


def __getattr__(name):
    # the genre classifier pulls in numpy/safetensors only when asked for
    if name in ("GenreClassifier", "genre_rate"):
        from actlab.evals import genre

        return getattr(genre, name)
    raise AttributeError(f"module 'actlab.evals' has no attribute {name!r}")
