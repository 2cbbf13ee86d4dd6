"""``actlab.load``: bundled demo names, local directories, hub ids, or an HF model object."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from actlab.errors import ActlabError
from actlab.models.model import Model

ZOO_DIR = Path(__file__).parent / "zoo"
DEFAULT_MODEL = "demo-llama"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def zoo_models() -> list[str]:
    """Names of the demo models bundled with actlab."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").is_file())


def resolve_path(name_or_path: str) -> str:
    """A bundled demo name becomes its package path; anything else is returned unchanged."""
    if name_or_path in zoo_models():
        return str(ZOO_DIR / name_or_path)
    return name_or_path


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ActlabError(f"unknown dtype '{dtype}'; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[dtype]


def _model_class(config):
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if causal_arch or (not archs and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return AutoModelForCausalLM
    return AutoModel


def load(
    name_or_model: str | os.PathLike | nn.Module = DEFAULT_MODEL,
    tokenizer=None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Model:
    """Load a model and its tokenizer as an ``actlab.Model``.

    ``name_or_model`` is a bundled demo name (``demo-gpt2``, ``demo-llama``), a local directory
    saved with ``save_pretrained``, a hub id (needs network), or an HF model object (then pass
    ``tokenizer=``). Remote code never runs unless the caller opts in with the ``trust_remote_code`` flag.
    """
    if isinstance(name_or_model, nn.Module):
        model = name_or_model.to(device)
        if dtype is not None and dtype != "auto":
            model = model.to(_dtype(dtype))
        return Model(model, tokenizer, name=getattr(model.config, "_name_or_path", None) or None)

    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    name = str(name_or_model)
    source = resolve_path(name)
    is_local = Path(source).is_dir()
    if not is_local and (name.startswith((".", "/", "~")) or os.sep in name and Path(name).parent.exists() and not Path(name).exists()):
        raise ActlabError(f"model directory '{name}' does not exist")
    if is_local and not (Path(source) / "config.json").is_file():
        raise ActlabError(f"'{source}' has no config.json: it is not a model saved with save_pretrained")
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        cls = _model_class(config)
        model = cls.from_pretrained(
            source, config=config, dtype=_dtype(dtype), revision=revision, trust_remote_code=trust_remote_code
        )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except ActlabError:
        raise
    except (OSError, ValueError) as exc:
        hint = (
            f"bundled models: {', '.join(zoo_models()) or 'none'}; a local directory; or a hub id "
            "(needs network: unset HF_HUB_OFFLINE)"
        )
        raise ActlabError(f"could not load model '{name}': {str(exc).splitlines()[0]} ({hint})") from None
    model = model.to(device)
    return Model(model, tokenizer, name=name)
