"""The ``actlab`` command line: a thin typer shell over the library functions.

This module holds the app, its sub-command groups, the error wrapper and the options several commands
share; each command group lives in its own module (``data``: record / stats / store, ``profile``,
``steer``: steer / adapter, ``paste``, ``model``: sites / generate, ``demo``). Commands import the
library lazily, so ``actlab --help`` does not load torch.
"""

from __future__ import annotations

import functools
import inspect
import os
import typing
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console

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
console = Console()
err_console = Console(stderr=True)

MODEL_HELP = "A bundled demo model (demo-llama, demo-gpt2), a local model directory, or a hub id (needs network)."
DATA_HELP = (
    "Input documents: .txt (one per line, or blank-line separated paragraphs), .jsonl with a 'text' field, "
    "or a token-id file. Default: actlab's bundled prompt set."
)
SITES_HELP = "Sites to read, e.g. 'resid.*', 'mlp.hidden.1-3', 'resid.-1', comma separated. See `actlab sites MODEL`."

# options shared by several commands (the same option, defined once)
ModelArg = typer.Argument("demo-llama", help=MODEL_HELP)
DeviceOpt = typer.Option("cpu", help="Torch device, e.g. cpu or cuda.")
DtypeOpt = typer.Option("float32", help="Weights dtype: float32, bfloat16 or float16.")
DataOpt = typer.Option(None, help=DATA_HELP)
MaxTokensOpt = typer.Option(None, help="Stop after this many input tokens.")
BatchOpt = typer.Option(8, help="Documents per forward pass.")
NewTokensOpt = typer.Option(24, help="New tokens per continuation.")
MaxGainOpt = typer.Option(1.5, help="Cap on the de-attenuation gain (1 = off).")


def friendly(fn: Callable) -> Callable:
    """Print ActlabErrors as one red line (exit 2) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        warnings.filterwarnings("ignore", message=".*Model config.*")
        try:
            return fn(*args, **kwargs)
        except ActlabError as exc:
            err_console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: finished work is kept; run the same command again to resume")
            raise typer.Exit(130)

    return wrapper


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


def load_model(model: str, device: str = "cpu", dtype: str = "float32"):
    import actlab

    with console.status(f"loading {model}…"):
        return actlab.load(model, device=device, dtype=dtype)


def documents(data: Optional[Path], model, max_tokens: Optional[int]):
    """The documents of ``--data`` (default: the bundled prompts), cut to ``--max-tokens``."""
    from actlab.datasets import default_prompts
    from actlab.io import budget, read_documents

    docs = default_prompts() if data is None else read_documents(data)
    if max_tokens is not None:
        docs = budget(docs, model.tokenizer, max_tokens)
    return docs


def prompt_list(path: Optional[Path]) -> list[str]:
    """The prompts of a file (default: the bundled prompt set)."""
    from actlab.datasets import default_prompts
    from actlab.io import read_documents

    return default_prompts() if path is None else list(read_documents(path))


def floats(text: str, option: str, example: str) -> List[float]:
    """``"1,2.5"`` → [1.0, 2.5], or a one-line error naming ``option``."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ActlabError(f"{option} expects numbers separated by commas, e.g. {example}; not {text!r}") from None


def names(text: str) -> List[str]:
    """``"a, b,"`` → ["a", "b"]."""
    return [x.strip() for x in text.split(",") if x.strip()]


def main() -> None:  # pragma: no cover
    app()


# the command modules register themselves on the apps above (in this order, which is the order of --help)
from actlab.cli import demo, model, data, profile, steer, paste  # noqa: E402,F401

__all__ = ["app", "main", "friendly", "console", "err_console"]
