"""Models larger than one device: device maps checked, inferred and dispatched through ``accelerate``.

A device map names modules (``model.layers.3``) and the device each one runs on: ``cuda:N`` (or the
ordinal ``N``), ``cpu``, or ``disk``. accelerate (the standard the HF stack uses) installs a hook on each
placed module that moves its inputs to its execution device, so a forward pass hands the residual stream
from device to device at the block boundaries. ``cpu`` and ``disk`` modules are *offloaded* when the map
also has a GPU: their weights wait in CPU memory (or on disk) and are copied to the first GPU for each
forward; on a CPU-only machine ``cpu`` modules run in place and ``disk`` ones read their weights from the
offload folder each time. This module checks maps before any weight moves (ActlabError naming the bad key,
device or missing module), infers ``auto`` maps from a memory budget, and answers where a module runs.
Under torchrun with several ranks on a machine of several GPUs, a strategy keeps to this rank's GPUs and
an explicit map naming GPUs is refused (below, ``restrict_for_rank``).
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import torch
from torch import nn

from actlab.engine.runner import check_device
from actlab.errors import ActlabError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_OFFLOAD = ("cpu", "disk")


# ------------------------------------------------------------------------------------------ checking
def _check_target(key, value, what: str = "device_map") -> str:
    """One map value as accelerate takes it: "cpu", "disk" or a device string such as "cuda:1"."""
    where = f"{what}[{key!r}]"
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise ActlabError(f"{where} is {value!r}; a device is 'cpu', 'disk', 'cuda:N' or a GPU ordinal N")
    if isinstance(value, int):
        if value < 0:
            raise ActlabError(f"{where} is {value}; a GPU ordinal is 0 or more")
        value = f"cuda:{value}"
    value = str(value)
    if value == "disk":
        return value
    if value == "meta":
        raise ActlabError(f"{where} is 'meta': a module there would have no weights; use 'cpu', 'disk' or a GPU")
    try:
        dev = check_device(value)
    except ActlabError as e:
        raise ActlabError(f"{where}: {e}") from None
    if dev.type != "cpu" and dev.index is None:
        dev = torch.device(dev.type, 0)
    return str(dev)


def _near(name: str, names: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def check_map(hf: nn.Module, device_map) -> dict[str, str]:
    """An explicit device map checked against ``hf`` (which may live on the meta device): every key a module
    of the model, no key inside another, every device real, every weight and buffer covered."""
    if not isinstance(device_map, dict) or not device_map:
        raise ActlabError(f"device_map must be one of {', '.join(STRATEGIES)} or a non-empty dict of module name -> "
                          f"device, not {device_map!r}")
    modules = dict(hf.named_modules())
    names = sorted(n for n in modules if n)
    out: dict[str, str] = {}
    for key, value in device_map.items():
        if not isinstance(key, str):
            raise ActlabError(f"device_map keys are module names (strings), not {key!r}")
        if key not in modules:
            raise ActlabError(f"device_map names '{key}', which is not a module of {type(hf).__name__}"
                              f"{_near(key, names)}; its top-level modules: "
                              f"{', '.join(n for n, _ in hf.named_children())}")
        out[key] = _check_target(key, value)
    for key in out:
        outer = [k for k in out if k != key and (k == "" or key.startswith(k + "."))]
        if outer:
            raise ActlabError(f"device_map places '{key}' and also '{outer[0] or '(the whole model)'}', which "
                              "contains it: give each weight one device")
    _check_ties(hf, out)
    missing = [name for name in hf.state_dict() if not any(k == "" or name == k or name.startswith(k + ".")
                                                            for k in out)]
    if missing:
        owners = sorted({name.rsplit(".", 1)[0] for name in missing})
        raise ActlabError(f"device_map leaves {len(missing)} weight(s) without a device, in "
                          f"{', '.join(owners[:6])}{' …' if len(owners) > 6 else ''}: add those modules "
                          "(or a module containing them) to the map, or use device_map='auto'")
    return out


def _device_of(name: str, device_map: dict[str, str]) -> str:
    return next(device_map[k] for k in sorted(device_map, key=len, reverse=True)
                if k == "" or name == k or name.startswith(k + "."))


def _check_ties(hf: nn.Module, device_map: dict[str, str]) -> None:
    """Tied weights (GPT-2's and Llama-style LM heads share the embedding) are one tensor: one device."""
    from accelerate.utils import find_tied_parameters

    for group in find_tied_parameters(hf):
        try:
            placed = {name: _device_of(name, device_map) for name in group}
        except StopIteration:
            continue  # not covered: reported as missing
        if len(set(placed.values())) > 1:
            a, b = group[0], next(n for n in group if placed[n] != placed[group[0]])
            raise ActlabError(f"'{a}' and '{b}' are one tied weight, but the device map puts them on {placed[a]} and "
                              f"{placed[b]}: place {a.rsplit('.', 1)[0]} and {b.rsplit('.', 1)[0]} on one device")


def check_memory(max_memory) -> dict | None:
    """A ``max_memory`` budget: device ("cpu", "disk", N or "cuda:N") -> bytes or a size such as "2GiB"."""
    if max_memory is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    if not isinstance(max_memory, dict) or not max_memory:
        raise ActlabError(f"max_memory must be a dict of device -> size (e.g. {{0: '70GiB', 'cpu': '200GiB'}}), "
                          f"not {max_memory!r}")
    out: dict = {}
    for key, size in max_memory.items():
        target = _check_target(key, key, "max_memory (keys are devices)")
        key = "cpu" if target == "cpu" else "disk" if target == "disk" else torch.device(target).index
        try:
            value = convert_file_size_to_int(size)
        except (ValueError, TypeError):
            value = -1
        if isinstance(size, bool) or value < 0:
            raise ActlabError(f"max_memory[{key!r}] is {size!r}; give bytes or a size such as '2GiB' or '500MB'")
        out[key] = value
    return out


# ------------------------------------------------------------------------------ torchrun ranks
# torchrun starts one process per GPU with the same command line, so ``device_map="auto"`` would spread every
# rank's copy of the model over all the GPUs. A rank owns a slice of its machine's GPUs instead: a strategy's
# budget names those only (and an equal share of the CPU memory the ranks share); a map or budget that cannot
# be right for every rank (the same explicit map naming GPUs) is refused on every rank alike, so none waits
# for one that stopped. Alone on its machine, or without GPUs, nothing changes. Pure functions of (local
# rank, ranks on the machine, visible GPUs), tested with made-up counts; ``restrict_for_rank`` applies them.
def _torchrun_local() -> tuple[int, int, int]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE, WORLD_SIZE) from torchrun's environment; (0, 1, 1) alone."""
    values = []
    for name, default in (("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", None), ("WORLD_SIZE", 1)):
        value = os.environ.get(name)
        try:
            values.append(int(value) if value else default)
        except ValueError:
            raise ActlabError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None
    local_rank, local_world, world = values
    return local_rank, world if local_world is None else local_world, world


def rank_gpus(local_rank: int, local_world: int, n_gpus: int) -> list[int]:
    """The GPUs a rank's device map may use: an equal, contiguous slice of the machine's ``n_gpus``."""
    if n_gpus == 0:
        return []
    if local_world <= 1:
        return list(range(n_gpus))
    if n_gpus == 1:
        return [0]  # each rank sees its own GPU (CUDA_VISIBLE_DEVICES set per rank)
    if n_gpus % local_world:
        raise ActlabError(f"a device map needs the GPUs shared evenly among the ranks of a machine: {n_gpus} GPUs "
                          f"for {local_world} ranks is ambiguous; start a number of ranks per machine that divides "
                          f"{n_gpus} (--nproc-per-node), or give --device cuda (one GPU per rank)")
    k = n_gpus // local_world
    return list(range(local_rank * k, (local_rank + 1) * k))


def rank_budget(budget: dict | None, local_rank: int, local_world: int, n_gpus: int,
                measured: Callable[[], dict]) -> dict | None:
    """The ``max_memory`` of a device-map strategy for this rank: only its GPUs. No budget: the measured one
    (``measured()``, accelerate's) for its GPUs and a ``1/local_world`` share of the CPU memory. A budget
    naming GPUs keeps those of this rank; it must name some GPU of every rank (else it is refused)."""
    if local_world <= 1 or n_gpus <= 1:
        return budget
    mine = rank_gpus(local_rank, local_world, n_gpus)
    if budget is None:  # one GPU: 90% of it, the buffer accelerate keeps for the forward when it measures itself
        full = measured()
        out: dict = {g: int(full[g] * 0.9) if len(mine) == 1 else full[g] for g in mine if g in full}
        out.update({k: v // local_world if k == "cpu" else v for k, v in full.items() if not isinstance(k, int)})
        return out
    named = {k for k in budget if isinstance(k, int)}
    if not named:
        return budget
    bare = [r for r in range(local_world) if not named & set(rank_gpus(r, local_world, n_gpus))]
    if bare:
        raise ActlabError(f"max_memory names GPUs {sorted(named)}, but the ranks of a machine each own a slice of "
                          f"its {n_gpus} GPUs and LOCAL_RANK {bare[0]}'s ({rank_gpus(bare[0], local_world, n_gpus)}) "
                          "has none: name every GPU, or leave the GPUs out (each rank measures its own)")
    return {k: v for k, v in budget.items() if not isinstance(k, int) or k in mine}


def check_rank_map(device_map: dict[str, str], local_world: int, n_gpus: int) -> None:
    """An explicit device map is the same on every rank, so with several ranks on a machine of several
    GPUs one naming a GPU would put them all there: refused (on every rank alike)."""
    if local_world <= 1 or n_gpus <= 1:
        return
    gpus = sorted({v for v in device_map.values() if v not in ("cpu", "disk")})
    if gpus:
        raise ActlabError(f"the device map names {', '.join(gpus)}, but torchrun started {local_world} ranks on this "
                          f"machine of {n_gpus} GPUs and every rank gets the same map: use --device-map auto, "
                          "balanced or sequential (each rank keeps to its own GPUs), or one rank per machine")


def restrict_for_rank(device_map, budget: dict | None) -> dict | None:
    """A strategy's budget restricted to this rank's GPUs (an explicit map checked instead), when torchrun's
    environment describes several ranks on this machine; otherwise ``budget`` as it is."""
    local_rank, local_world, world = _torchrun_local()
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world <= 1 or local_world <= 1 or n_gpus <= 1:
        return budget
    if isinstance(device_map, dict):
        check_rank_map(device_map, local_world, n_gpus)
        return budget
    if device_map == "balanced_low_0":  # accelerate keeps GPU 0 light, which is one rank's, not each rank's first
        raise ActlabError(f"device_map 'balanced_low_0' with {local_world} ranks on a machine of {n_gpus} GPUs would "
                          "keep only GPU 0 light; use 'balanced', 'auto' or 'sequential' (each rank its own GPUs)")
    from accelerate import utils

    return rank_budget(budget, local_rank, local_world, n_gpus, utils.get_max_memory)


# --------------------------------------------------------------------------------------- inferring
def infer_map(hf: nn.Module, strategy: str, max_memory: dict | None, dtype: torch.dtype | None) -> dict[str, str]:
    """The map accelerate chooses for ``strategy`` within ``max_memory`` (blocks are never split)."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    if strategy not in STRATEGIES:
        raise ActlabError(f"device_map '{strategy}' is not a strategy; use one of {', '.join(STRATEGIES)}, or a dict "
                          "of module name -> device")
    no_split = list(getattr(hf, "_no_split_modules", None) or [])
    if strategy == "sequential":
        budget = get_max_memory(max_memory)
    else:
        budget = get_balanced_memory(hf, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=strategy == "balanced_low_0")
    inferred = infer_auto_device_map(hf, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    return {k: _check_target(k, v) for k, v in inferred.items()}


def resolve_map(hf: nn.Module, device_map, max_memory, dtype: torch.dtype | None,
                offload_folder) -> dict[str, str]:
    """The checked, explicit map for ``device_map`` (a strategy or a dict); a map with disk entries needs a folder."""
    budget = check_memory(max_memory)
    if isinstance(device_map, str):
        resolved = infer_map(hf, device_map, restrict_for_rank(device_map, budget), dtype)
    else:
        if budget is not None:
            raise ActlabError("max_memory is for device_map strategies ('auto', 'balanced', ...); an explicit map "
                              "already says where each module goes")
        resolved = check_map(hf, device_map)
        restrict_for_rank(resolved, None)
    if resolved.get("") == "disk" and not list(hf.named_parameters(recurse=False)):
        # the whole model on disk (a budget smaller than any block): name its parts, which accelerate can offload
        resolved = {name: "disk" for name, _ in hf.named_children()}
    if "disk" in resolved.values() and offload_folder is None:
        disk = [k for k, v in resolved.items() if v == "disk"]
        raise ActlabError(f"the device map offloads {', '.join(disk[:4])}{' …' if len(disk) > 4 else ''} to disk: "
                          "pass offload_folder= (a directory for their weights; command line: --offload-folder)")
    if offload_folder is not None:
        os.makedirs(offload_folder, exist_ok=True)
    return resolved


def dispatch(hf: nn.Module, device_map: dict[str, str], offload_folder) -> nn.Module:
    """Place ``hf`` (a model with real weights) on the devices of a checked map, with accelerate's hooks."""
    from accelerate import dispatch_model

    skip = getattr(hf, "_skip_keys_device_placement", None)
    return dispatch_model(hf, device_map=device_map, offload_dir=None if offload_folder is None else str(offload_folder),
                          skip_keys=skip)


# ---------------------------------------------------------------------------------------- where
def is_dispatched(hf: nn.Module) -> bool:
    """Whether accelerate placed ``hf`` (a device map with hooks, or one spanning several devices)."""
    placed = getattr(hf, "hf_device_map", None)
    return bool(placed) and (len(set(map(str, placed.values()))) > 1 or "disk" in placed.values()
                             or any(hasattr(m, "_hf_hook") for m in hf.modules()))


def _hook_device(module: nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(h, "execution_device", None)
        if device is not None and not isinstance(device, dict):
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def execution_device(hf: nn.Module, path: str) -> torch.device:
    """Where module ``path`` of ``hf`` computes: its own (or nearest enclosing) accelerate hook's execution
    device, else the device of its first weight that is not on the meta device, else the CPU."""
    parts = path.split(".") if path else []
    chain = [hf] + [hf.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts))]
    for module in reversed(chain):
        device = _hook_device(module)
        if device is not None:
            return device
    for module in reversed(chain):
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.device.type != "meta":
                return tensor.device
    return torch.device("cpu")


def devices(hf: nn.Module) -> list[torch.device]:
    """Every device ``hf`` computes on, in the order its device map first names them."""
    placed = getattr(hf, "hf_device_map", None)
    if not placed or not is_dispatched(hf):
        return [next(hf.parameters()).device]
    seen: list[torch.device] = []
    for key in placed:
        device = execution_device(hf, key)
        if device not in seen:
            seen.append(device)
    return seen


def state_tensors(hf: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``hf.state_dict()`` with offloaded (meta) tensors read back from accelerate's weights map, so a fingerprint
    of the weights is the same however the model is placed."""
    for name, tensor in hf.state_dict().items():
        if tensor.device.type == "meta":
            owner, _, local = name.rpartition(".")
            module = hf.get_submodule(owner) if owner else hf
            hook = getattr(module, "_hf_hook", None)
            for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
                weights = getattr(h, "weights_map", None)
                if weights is not None:
                    try:
                        tensor = weights[local]
                        break
                    except KeyError:
                        continue
        yield name, tensor
