"""``actlab.load``: bundled demo names, local directories, hub ids, or an HF model object."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from actlab.engine.runner import check_device
from actlab.errors import ActlabError
from actlab.models import placement
from actlab.models.model import Model

ZOO_DIR = Path(__file__).parent / "zoo"
DEFAULT_MODEL = "demo-llama"

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
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
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ActlabError(f"dtype {dtype} is not a floating-point type; use float32, bfloat16 or float16")
        return dtype
    if not isinstance(dtype, str):
        raise ActlabError(f"dtype must be a name such as 'float32' or a torch.dtype, not {dtype!r}")
    if dtype not in _DTYPES:
        raise ActlabError(f"unknown dtype '{dtype}'; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[dtype]


def _check_safetensors(files: list[Path]) -> None:
    """Each weights file must be a complete safetensors file (a cut download is the usual culprit)."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            raise ActlabError(f"'{path}' is not a complete safetensors file ({str(exc).splitlines()[0]}): the "
                              "download or copy was probably cut short; fetch or save the model again") from None


def _use_safetensors(folder: Path, allow_pickle: bool) -> bool:
    """Whether a local model folder is loaded from safetensors (preferred whenever present); a folder with
    only pickle weights (pytorch_model.bin, *.pt) is refused unless ``allow_pickle``."""
    safe = sorted(folder.glob("*.safetensors"))
    if safe:
        _check_safetensors(safe)
        return True
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not pickles:
        raise ActlabError(f"'{folder}' has no model weights (no *.safetensors file); save the model there with "
                          "save_pretrained")
    if not allow_pickle:
        raise ActlabError(f"'{folder}' has only pickle weights ({', '.join(pickles[:2])}): loading pickle can run "
                          "arbitrary code, so actlab refuses it; convert the model to safetensors, or if you trust "
                          "the files pass allow_pickle=True (command line: actlab --allow-pickle ...)")
    return False


def _check_name(name_or_model) -> str:
    if isinstance(name_or_model, os.PathLike):
        name_or_model = os.fspath(name_or_model)
    if not isinstance(name_or_model, str) or not name_or_model.strip():
        raise ActlabError(f"load takes a model name, a local folder, a hub id or an HF model, not {name_or_model!r}; "
                          f"bundled models: {', '.join(zoo_models()) or 'none'}")
    return str(name_or_model)


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
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> Model:
    """Load a model and its tokenizer as an ``actlab.Model``.

    ``name_or_model`` is a bundled demo name (``demo-gpt2``, ``demo-llama``), a local directory
    saved with ``save_pretrained``, a hub id (needs network), or an HF model object (then pass
    ``tokenizer=``). Remote code never runs unless the caller opts in with the ``trust_remote_code`` flag.
    Weights load from safetensors; pickle weights (``pytorch_model.bin``), which can run code when
    read, only with ``allow_pickle=True``. The device (default cpu) must exist on this machine.

    A model larger than one device takes ``device_map`` instead of ``device`` (see docs/devices.md):
    ``"auto"`` / ``"balanced"`` / ``"balanced_low_0"`` / ``"sequential"`` (accelerate fills the GPUs within
    ``max_memory``, e.g. ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``), or a dict of module name -> device
    (``"cuda:N"``, ``N``, ``"cpu"``, ``"disk"``). Maps are checked on an empty (meta-device) copy before any
    weight is read; modules placed on ``"disk"`` need ``offload_folder``. An HF model that accelerate
    already dispatched (it has ``hf_device_map``) is used as it is.
    """
    torch_dtype = _dtype(dtype)
    if device_map is not None and device is not None:
        raise ActlabError("pass device= (one device) or device_map= (a model split over devices), not both")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ActlabError("max_memory and offload_folder go with device_map=; pass device_map='auto' or a map")
    dev = check_device("cpu" if device is None else device)
    if isinstance(name_or_model, nn.Module):
        return Model(_place_module(name_or_model, dev, torch_dtype, device_map, max_memory, offload_folder,
                                   explicit_device=device is not None),
                     tokenizer, name=getattr(name_or_model.config, "_name_or_path", None) or None)
    name = _check_name(name_or_model)
    split = None if device_map is None else (device_map, max_memory, offload_folder)
    model, tokenizer = _from_pretrained(name, tokenizer, torch_dtype, revision=revision, split=split,
                                        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    return Model(model if device_map is not None else model.to(dev), tokenizer, name=name)


def _place_module(model: nn.Module, dev: torch.device, torch_dtype, device_map, max_memory, offload_folder,
                  *, explicit_device: bool) -> nn.Module:
    """An HF model object on one device, split by ``device_map``, or (already dispatched) left where it is."""
    if placement.is_dispatched(model):
        if device_map is not None or explicit_device:
            raise ActlabError("this model is already dispatched over devices by accelerate (it has hf_device_map): "
                              "load it without device= or device_map=, or pass the model before dispatching it")
        if torch_dtype is not None and model.dtype != torch_dtype:
            raise ActlabError(f"this dispatched model holds {model.dtype} weights; convert it before dispatching, "
                              "or pass dtype=None")
        return model
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    if device_map is None:
        return model.to(dev)
    resolved = placement.resolve_map(model, device_map, max_memory, torch_dtype or model.dtype, offload_folder)
    return placement.dispatch(model, resolved, offload_folder)


def _split_kwargs(cls, config, torch_dtype, split, trust_remote_code: bool) -> dict:
    """``from_pretrained`` keywords for a split model: the map resolved and checked on an empty (meta-device)
    model built from the config, so a bad map fails before any weight is read."""
    if split is None:
        return {}
    from accelerate import init_empty_weights

    device_map, max_memory, offload_folder = split
    with init_empty_weights():
        empty = cls.from_config(config, trust_remote_code=trust_remote_code)
    empty.tie_weights()  # tied weights are one tensor, so a map keeps them together
    dtype = torch_dtype or getattr(config, "dtype", None)  # sizes for 'auto' maps: the dtype the weights load in
    if not isinstance(dtype, torch.dtype):
        dtype = getattr(torch, str(dtype), torch.float32)
    resolved = placement.resolve_map(empty, device_map, max_memory, dtype, offload_folder)
    kwargs = {"device_map": resolved}
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs


def _from_pretrained(name: str, tokenizer, torch_dtype, *, revision, trust_remote_code: bool, allow_pickle: bool,
                     split=None):
    """The HF model and tokenizer of a bundled name, local folder or hub id (split over devices by ``split``:
    device map, memory budget, offload folder); any failure is one ActlabError."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = resolve_path(name)
    is_local = Path(source).is_dir()
    if not is_local and (name.startswith((".", "/", "~")) or os.sep in name and Path(name).parent.exists() and not Path(name).exists()):
        raise ActlabError(f"model directory '{name}' does not exist")
    if is_local and not (Path(source) / "config.json").is_file():
        raise ActlabError(f"'{source}' has no config.json: it is not a model saved with save_pretrained")
    use_safetensors = _use_safetensors(Path(source), allow_pickle) if is_local else (None if allow_pickle else True)
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        cls = _model_class(config)
        model = cls.from_pretrained(
            source, config=config, dtype=torch_dtype, revision=revision, trust_remote_code=trust_remote_code,
            use_safetensors=use_safetensors, **_split_kwargs(cls, config, torch_dtype, split, trust_remote_code),
        )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except ActlabError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        hint = (
            f"bundled models: {', '.join(zoo_models()) or 'none'}; a local directory; or a hub id "
            "(needs network: unset HF_HUB_OFFLINE)"
        )
        if is_local:
            hint = "check that folder's config.json and tokenizer files, or save the model there again with save_pretrained"
        elif "safetensors" in str(exc) and not allow_pickle:
            hint = "actlab loads safetensors weights only; pass allow_pickle=True (--allow-pickle) for pickle ones"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ActlabError(f"could not load model '{name}': {first} ({hint})") from None
    return model, tokenizer
