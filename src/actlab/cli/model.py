"""``actlab sites`` and ``actlab generate``: what a model has, and what it says (optionally edited)."""

from __future__ import annotations

import sys
from typing import List

import typer
from rich.table import Table

from actlab.cli import DeviceOpt, DtypeOpt, ModelArg, app, at_least, console, friendly, load_model, positive


@app.command()
@friendly
def sites(model: str = ModelArg, device: str = DeviceOpt, dtype: str = DtypeOpt):
    """List a model's sites and their widths."""
    m = load_model(model, device, dtype)
    table = Table(title=f"{m.name}: {m.sitemap.model_class}, {m.n_layers} layers")
    table.add_column("site")
    table.add_column("width", justify="right")
    table.add_column("hooked module")
    for name, point in m.sitemap.points.items():
        table.add_row(name, str(point.width), f"{point.mode} of {point.module_path}")
    console.print(table)


@app.command()
@friendly
def generate(
    model: str = ModelArg,
    prompt: str = typer.Argument(..., help="Prompt text."),
    max_new_tokens: int = typer.Option(48, help="Tokens to generate."),
    edit: List[str] = typer.Option([], help="Intervention file with coefficient, FILE:COEF (repeatable)."),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (with --sample)."),
    seed: int = typer.Option(0, help="Random seed for sampling."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Generate text, optionally with interventions applied, streaming tokens to the terminal.

    A prompt too long to leave room for --max-new-tokens keeps its end (a warning gives the numbers)."""
    at_least(max_new_tokens, 1, "--max-new-tokens")
    at_least(seed, 0, "--seed")
    if sample:
        positive(temperature, "--temperature (with --sample)")
    m = load_model(model, device, dtype)
    edits = []
    if edit:
        from actlab.interventions import load_with_coef

        edits = [load_with_coef(spec, m) for spec in edit]
    with m.edit(*edits):
        m.generate(prompt, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, seed=seed,
                   streamer=_streamer(m.tokenizer, prompt))


def _streamer(tokenizer, prompt: str):
    """Streams the continuation to the terminal, after the prompt (printed as given, once generation starts:
    a refused request prints only its error)."""
    from transformers import TextStreamer

    class PromptFirst(TextStreamer):
        def put(self, value) -> None:
            if self.next_tokens_are_prompt:
                console.print(prompt, style="bold", end="", markup=False, highlight=False)
                sys.stdout.flush()
            super().put(value)

    return PromptFirst(tokenizer, skip_prompt=True, skip_special_tokens=True)
