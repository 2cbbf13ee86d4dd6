"""``actlab sparsify`` (calibrate activation-sparsity thresholds) and ``actlab sparse eval`` (their perplexity cost)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from actlab.cli import DeviceOpt, DtypeOpt, ModelArg, app, at_least, console, floats, friendly, load_model, names
from actlab.errors import ActlabError

sparse_app = typer.Typer(help="Activation-sparse inference: evaluate calibrated thresholds.", no_args_is_help=True)
app.add_typer(sparse_app, name="sparse")

METHOD_HELP = ("teal (|x| per input), wina (|x| × weight column norm), cats (|act(gate)|, hidden input only) or "
               "cett (the Sparsing Law's CETT rule, hidden input only).")


def _fraction(value: float, option: str) -> None:
    if not 0 <= value < 1:
        raise ActlabError(f"{option} is a fraction in [0, 1), e.g. 0.5; not {value}")


@app.command("sparsify")
@friendly
def sparsify(
    model: str = ModelArg,
    out: Path = typer.Option(..., "--out", "-o", help="Thresholds file to write (.safetensors)."),
    method: str = typer.Option("teal", help=METHOD_HELP),
    sparsity: float = typer.Option(0.5, help="Target fraction of each input's channels to skip."),
    tokens: int = typer.Option(16384, help="Calibration tokens of the bundled training text."),
    attention: bool = typer.Option(True, help="TEAL / WINA: sparsify the attention's q/k/v and o-projection inputs too."),
    allocation: str = typer.Option("uniform", help="uniform (every input at the target) or greedy (TEAL's per-block "
                                                   "allocation; teal and wina)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Calibrate per-channel thresholds of the attention inputs (q/k/v and o) and the MLP inputs (gate/up and down)
    to a target sparsity on the bundled text, and save them for the model (load with
    actlab.sparse.thresholds.load_thresholds; run with actlab.sparse.mlp.splice)."""
    from actlab.io.outputs import check_output_file
    from actlab.sparse.thresholds import METHODS, calibrate

    if method not in METHODS:
        raise ActlabError(f"--method must be one of {', '.join(METHODS)}; not {method!r}")
    if allocation not in ("uniform", "greedy") or (allocation == "greedy" and method not in ("teal", "wina")):
        raise ActlabError(f"--allocation is uniform, or greedy for teal and wina; not {allocation!r} for {method}")
    _fraction(sparsity, "--sparsity")
    at_least(tokens, 16, "--tokens")
    check_output_file(out)
    m = load_model(model, device, dtype)
    with console.status(f"calibrating {method} thresholds at {sparsity:.0%}…"):
        thresholds = calibrate(m, method, sparsity, tokens=tokens, attention=attention, allocation=allocation)
    path = thresholds.save(out)
    console.print(f"[green]thresholds:[/] {escape(str(path))} ({len(thresholds.tensors)} inputs, "
                  f"{thresholds.info.get('tokens', 0):,} calibration tokens)")


@sparse_app.command("eval")
@friendly
def sparse_eval(
    model: str = ModelArg,
    out: Path = typer.Option(Path("sparse-eval"), "--out", "-o", help="Folder for evaluation.json and report.html."),
    methods: str = typer.Option("teal,wina,cats,cett", help="Methods, comma separated: " + METHOD_HELP
                                + " teal-greedy / wina-greedy: TEAL's per-block allocation."),
    sparsities: str = typer.Option("0.25,0.4,0.5", help="Target sparsities, comma separated."),
    tokens: int = typer.Option(8192, help="Calibration tokens of the bundled training text."),
    genre_prompts: int = typer.Option(4, help="Held-out prompts per genre for the genre rate (0: not measured)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Perplexity and the genre rate of continuations of the bundled neutral passages against sparsity per method, and the kernel's exactness against
    the dense model with the same zeros; writes evaluation.json and report.html."""
    from actlab.io import check_output_dir
    from actlab.sparse.evaluate import VARIANTS, evaluate_sparsity, write_evaluation

    chosen = names(methods)
    if not chosen or any(c not in VARIANTS for c in chosen):
        raise ActlabError(f"--methods: choose from {', '.join(VARIANTS)}; not {methods!r}")
    levels = floats(sparsities, "--sparsities", "0.25,0.5")
    for level in levels:
        _fraction(level, "--sparsities")
    at_least(tokens, 16, "--tokens")
    at_least(genre_prompts, 0, "--genre-prompts")
    check_output_dir(out, ("evaluation.json", "report.html"), what="sparse evaluations")
    m = load_model(model, device, dtype)
    result = evaluate_sparsity(m, chosen, levels, calibration_tokens=tokens, genre_per_genre=genre_prompts,
                               progress=lambda r: console.print(f"{r['method']} {r['target']:.0%}: perplexity "
                                                                f"{r['ppl']:.3f} ({r['increase']:+.2%}), genre rate "
                                                                f"{r['genre_rate']:.0%}"))
    for line in result.table():
        console.print(escape(line))
    _, html_path = write_evaluation(result, out, m.identity())
    console.print(f"[green]report:[/] {escape(str(html_path.resolve()))}")
