"""The ``actlab`` command line: a thin typer shell over the library functions.

This module holds the app, its sub-command groups and the options and argument checks several
commands share; the error boundary every command runs in is ``boundary.friendly`` (one line and exit
2 for the user's mistakes, a crash log and exit 1 for bugs). Each command group lives in its own module
(``data``: record / stats / store, ``profile``, ``steer``: steer / adapter, ``paste``, ``model``:
sites / generate, ``demo``). Commands check their arguments and output paths before loading a model,
and import the library lazily, so ``actlab --help`` does not load torch.
"""

from __future__ import annotations

import inspect
import math
import typing
from pathlib import Path
from typing import Callable, List, Optional

import typer

from actlab.cli.boundary import console, err_console, friendly
from actlab.errors import ActlabError

app = typer.Typer(
    help="actlab: record, measure, edit and transfer the activations inside transformer models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(help="Inspect and check on-disk activation stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")
steer_app = typer.Typer(help="Fit and evaluate steering interventions.", no_args_is_help=True)
app.add_typer(steer_app, name="steer")
adapter_app = typer.Typer(help="Train low-rank residual adapters (ReFT-like).", no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")
paste_app = typer.Typer(help="Command-V: paste an intervention from a donor model into a recipient.", no_args_is_help=True)
app.add_typer(paste_app, name="paste")

_SETTINGS: dict = {"allow_pickle": False, "max_memory": None, "offload_folder": None}


@app.callback()
def _global_options(
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Also load model folders that only have pickle weights (pytorch_model.bin). "
        "Reading pickle can run code: use it only for files you trust."),
    max_memory: Optional[str] = typer.Option(
        None, "--max-memory", help="Memory budget for --device-map auto/balanced/sequential, per device: "
        "'0=70GiB,1=70GiB,cpu=200GiB'."),
    offload_folder: Optional[Path] = typer.Option(
        None, "--offload-folder", help="Folder for the weights a device map puts on 'disk'."),
) -> None:
    _SETTINGS.update(allow_pickle=allow_pickle, max_memory=max_memory, offload_folder=offload_folder)


MODEL_HELP = "A bundled demo model (demo-llama, demo-gpt2), a local model directory, or a hub id (needs network)."
DATA_HELP = (
    "Input documents: .txt (one per line, or blank-line separated paragraphs), .jsonl with a 'text' field, "
    "or a token-id file. Default: actlab's bundled prompt set."
)
SITES_HELP = "Sites to read, e.g. 'resid.*', 'mlp.hidden.1-3', 'resid.-1', comma separated. See `actlab sites MODEL`."

# options shared by several commands (the same option, defined once)
ModelArg = typer.Argument("demo-llama", help=MODEL_HELP)
DeviceOpt = typer.Option("cpu", "--device", "--device-map", help="Torch device, e.g. cpu or cuda:1; or a device "
                         "map for a model larger than one device: auto, balanced, sequential, or a JSON file of "
                         "module -> device (see docs/devices.md).")
DtypeOpt = typer.Option("float32", help="Weights dtype: float32, bfloat16 or float16.")
DataOpt = typer.Option(None, help=DATA_HELP)
MaxTokensOpt = typer.Option(None, help="Stop after this many input tokens.")
BatchOpt = typer.Option(8, help="Documents per forward pass.")
NewTokensOpt = typer.Option(24, help="New tokens per continuation.")
MaxGainOpt = typer.Option(1.5, help="Cap on the de-attenuation gain (1 = off).")


def takes(spec: type) -> Callable:
    """For commands with many options: ``spec`` declares them (class attributes ``name: type = typer.Option(...)``,
    in command-line order) and the command receives them as one ``spec`` object. Typer still sees one
    parameter per attribute, so the command line and its help are the same, but no function takes a dozen
    parameters."""
    hints = typing.get_type_hints(spec)
    names_ = list(spec.__annotations__)
    params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=getattr(spec, n), annotation=hints[n])
              for n in names_]

    def decorate(fn: Callable) -> Callable:
        def command(**values):
            options = spec.__new__(spec)
            options.__dict__.update(values)
            return fn(options)

        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(command, attr, getattr(fn, attr))
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {n: hints[n] for n in names_}
        return command

    return decorate


def placement(device: str) -> dict:
    """``actlab.load`` keywords for ``--device`` / ``--device-map``: one device, a map strategy, or a JSON map file."""
    import json

    from actlab.models.placement import STRATEGIES

    if device not in STRATEGIES and not device.endswith(".json"):
        if _SETTINGS["max_memory"] is not None or _SETTINGS["offload_folder"] is not None:
            raise ActlabError("--max-memory and --offload-folder go with --device-map (auto, balanced, sequential "
                              "or a JSON map file)")
        return {"device": device}
    device_map = device
    if device.endswith(".json"):
        try:
            device_map = json.loads(Path(device).read_text())
        except (OSError, ValueError) as e:
            raise ActlabError(f"--device-map {device}: cannot read a JSON device map there ({e})") from None
    budget = None
    if _SETTINGS["max_memory"]:
        try:
            budget = {k.strip(): v.strip() for k, v in (part.split("=", 1) for part in _SETTINGS["max_memory"].split(","))}
        except ValueError:
            raise ActlabError(f"--max-memory {_SETTINGS['max_memory']!r}: write device=size pairs such as "
                              "'0=70GiB,cpu=200GiB'") from None
        budget = {int(k) if k.isdigit() else k: v for k, v in budget.items()}
    return {"device_map": device_map, "max_memory": budget, "offload_folder": _SETTINGS["offload_folder"]}


def load_model(model: str, device: str = "cpu", dtype: str = "float32"):
    import actlab

    where = placement(device)
    with console.status(f"loading {model}…"):
        return actlab.load(model, dtype=dtype, allow_pickle=_SETTINGS["allow_pickle"], **where)


def documents(data: Optional[Path], model, max_tokens: Optional[int]):
    """The documents of ``--data`` (default: the bundled prompts), cut to ``--max-tokens``; token ids are
    checked against the model's vocabulary here, before anything is written."""
    from actlab.datasets import default_prompts
    from actlab.engine.batching import check_token_range
    from actlab.io import budget, read_documents

    docs = default_prompts() if data is None else read_documents(data)
    if docs and not isinstance(docs[0], str):
        try:
            check_token_range(min(min(d) for d in docs if d), max(max(d) for d in docs if d), model.vocab_size)
        except ActlabError as e:
            raise ActlabError(f"{data}: {e}") from None
    if max_tokens is not None:
        docs = budget(docs, model.tokenizer, max_tokens)
    return docs


def text_documents(data: Optional[Path], what: str) -> Optional[list[str]]:
    """The text documents of ``--data`` (None when not given); token-id files are refused for ``what``."""
    if data is None:
        return None
    from actlab.io import read_documents

    docs = list(read_documents(data))
    if not docs or not isinstance(docs[0], str):
        raise ActlabError(f"{data}: {what} reads text documents (.txt or .jsonl), not token ids")
    return docs


def load_sae_arg(path: Path):
    """An SAE given on the command line: our file or the folder `actlab sae train` wrote, SAELens or sparsify."""
    from actlab.sae.interop import load_external
    from actlab.sae.pipeline import SAE_FILE

    return load_external(path / SAE_FILE if path.is_dir() and (path / SAE_FILE).exists() else path)


def prompt_list(path: Optional[Path]) -> list[str]:
    """The prompts of a file (default: the bundled prompt set)."""
    from actlab.datasets import default_prompts
    from actlab.io import read_documents

    return default_prompts() if path is None else list(read_documents(path))


def floats(text: str, option: str, example: str) -> List[float]:
    """``"1,2.5"`` → [1.0, 2.5] (finite numbers, at least one), or a one-line error naming ``option``."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise ActlabError(f"{option} expects finite numbers separated by commas, e.g. {example}; not {text!r}")
    return values


def at_least(value, minimum, option: str) -> None:
    """``--option`` (when given) is a number >= ``minimum``, else a one-line error naming it."""
    if value is not None and not (math.isfinite(value) and value >= minimum):
        raise ActlabError(f"{option} must be at least {minimum}, not {value}")


def positive(value: Optional[float], option: str) -> None:
    """``--option`` (when given) is a finite number > 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ActlabError(f"{option} must be a positive number, not {value}")


def one_of(value: str, allowed: typing.Sequence[str], option: str) -> None:
    if value not in allowed:
        raise ActlabError(f"{option} must be one of {', '.join(allowed)}; not {value!r}")


def names(text: str) -> List[str]:
    """``"a, b,"`` → ["a", "b"]."""
    return [x.strip() for x in text.split(",") if x.strip()]


def main() -> None:  # pragma: no cover
    app()


# the command modules register themselves on the apps above (in this order, which is the order of --help)
from actlab.cli import demo, model, data, profile, steer, paste, sae, browse, probe, sparse  # noqa: E402,F401

__all__ = ["app", "main", "friendly", "console", "err_console", "at_least", "positive", "one_of"]
