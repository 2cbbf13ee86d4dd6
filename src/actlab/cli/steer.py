"""``actlab steer fit`` / ``steer eval`` / ``adapter train``: make interventions and measure them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from actlab.cli import (
    DeviceOpt, DtypeOpt, ModelArg, NewTokensOpt, adapter_app, at_least, console, floats, friendly, load_model, names,
    one_of, positive, steer_app,
)
from actlab.errors import ActlabError


def _sweep_table(m, contrast, sites, out: Path, method: str, **fit_kwargs) -> None:
    """Several sites: fit a vector per layer, write each (best to ``out``) and print the ranking."""
    from actlab.interventions.fit import sweep_layers

    rows = sweep_layers(m, contrast, sites, method=method, **fit_kwargs)
    table = Table(title=f"layer sweep: {method} vectors fitted on 75% of the contrast set, scored on the rest "
                        "(gain = rise of log p(pos) − log p(neg) per token at coefficient 1)")
    for col in ("site", "gain (nats/token)", "norm", "file"):
        table.add_column(col, justify="right")
    for rank, row in enumerate(rows):
        path = out if rank == 0 else out.with_name(f"{out.stem}.{row['site']}{out.suffix}")
        row["vector"].save(path)
        table.add_row(row["site"] + (" [bold green](best)[/]" if rank == 0 else ""), f"{row['gain']:+.4f}",
                      f"{row['norm']:.3f}", escape(str(path)))
    console.print(table)
    console.print(f"best layer {rows[0]['site']} written to {escape(str(out))}; `actlab steer eval` draws genre dose-response curves")


@steer_app.command("fit")
@friendly
def steer_fit(
    model: str = ModelArg,
    pos: Path = typer.Option(..., help="Positive examples: a text file, or a JSONL of pairs with prompt/pos/neg (then omit --neg)."),
    neg: Optional[Path] = typer.Option(None, help="Negative examples (text file)."),
    site: str = typer.Option("resid.mid", help="Site(s): resid.mid is the middle layer; several (e.g. resid.*) fits a vector per layer, or one joint affine map."),
    method: str = typer.Option("mean-diff", help="mean-diff (CAA), pca, dims (top-m dimensions) or affine (LinEAS-style)."),
    aggregate: str = typer.Option("mean", help="Per-example activation: mean over the example's tokens, or last token."),
    dims: Optional[int] = typer.Option(None, help="Dimensions kept by --method dims (default d_model/16)."),
    positions: str = typer.Option("all", help="Where the result acts when applied: all, prompt or generated."),
    out: Path = typer.Option(Path("steer.safetensors"), "--out", "-o", help="Intervention file to write."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Fit a steering intervention from contrast sets and save it (safetensors + JSON header)."""
    from actlab.interventions.contrast import read_contrast
    from actlab.interventions.fit import METHODS, fit_steering
    from actlab.io import check_output_file

    one_of(method, METHODS, "--method")
    one_of(aggregate, ("mean", "last"), "--aggregate")
    one_of(positions, ("all", "prompt", "generated"), "--positions")
    at_least(dims, 1, "--dims")
    check_output_file(out)
    m = load_model(model, device, dtype)
    contrast = read_contrast(pos, neg)
    if method == "affine":
        from actlab.interventions.affine_fit import fit_affine

        result = fit_affine(m, contrast, site, positions=positions, progress=True)
        result.save(out)
        console.print(f"[green]wrote[/] {escape(str(out))}: affine maps at {', '.join(i.site for i in result)}")
        return
    sites = m.resolve(site)
    if len(sites) > 1:
        return _sweep_table(m, contrast, sites, out, method, aggregate=aggregate, dims=dims, positions=positions)
    vec = fit_steering(m, contrast, sites, method=method, aggregate=aggregate, dims=dims, positions=positions)[sites[0]]
    vec.save(out)
    console.print(f"[green]wrote[/] {escape(str(out))}: {method} vector at {sites[0]}, norm {vec.vector.norm():.3f} "
                  f"(|mean diff| {vec.params['mean_diff_norm']:.3f}, mean |h| {vec.params['resid_norm']:.3f})")


@steer_app.command("eval")
@friendly
def steer_eval(
    model: str = ModelArg,
    genre: str = typer.Option("techdoc", help="Target genre (scripture, fortunes, jargon, techdoc, dictionary)."),
    site: Optional[str] = typer.Option(None, help="Site to steer at; default: a layer sweep picks the best resid layer."),
    methods: str = typer.Option("mean-diff,pca,dims,affine,adapter", help="Methods to fit and compare."),
    coefs: str = typer.Option("-2,-1,0,0.5,1,2,4", help="Coefficients of the dose-response grid."),
    prompts: int = typer.Option(16, help="Held-out prompts continued per point."),
    tokens: int = NewTokensOpt,
    seed: int = typer.Option(0, help="Sampling seed (shared by every point, so curves are comparable)."),
    out: Path = typer.Option(Path("steer-eval"), "--out", "-o", help="Directory for evaluation.json and the plots."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Dose-response of genre steering: genre rate of generations and neutral perplexity vs coefficient, per
    method, with a random-vector control (uses the bundled genre sets and classifier)."""
    from actlab.experiments.genre_eval import evaluate_genre, write_evaluation
    from actlab.io import check_output_dir

    grid = floats(coefs, "--coefs", "-1,0,1,2")
    for value, option in ((prompts, "--prompts"), (tokens, "--tokens")):
        at_least(value, 1, option)
    at_least(seed, 0, "--seed")
    check_output_dir(out, "evaluation.json", what="steering evaluations")
    m = load_model(model, device, dtype)
    result = evaluate_genre(m, genre, site=site, methods=names(methods), coefs=grid, n_prompts=prompts,
                            max_new_tokens=tokens, seed=seed, progress=True)
    if result.sweep is not None:
        console.print(f"layer sweep ({result.sweep.method} × {result.sweep.coef:g}): best {result.sweep.best_site}")
        console.print(result.sweep.table())
    console.print(f"dose-response at {result.site}: genre rate (neutral perplexity)")
    console.print(result.dose.table())
    paths = write_evaluation(result, out)
    console.print(f"[green]wrote[/] {escape(', '.join(str(p) for p in paths))} ({result.seconds:.0f} s)")


def _training_examples(data: Path) -> list:
    """JSONL pairs with 'prompt' and 'completion' → (prompt, completion) tuples; anything else → texts.
    A bad line (not JSON, not UTF-8, a field missing or not a string) is an error naming it."""
    from actlab.io import first_record_fields, read_documents, read_records

    if data.suffix == ".jsonl" and "completion" in first_record_fields(data):
        rows = read_records(data, ("completion",), ("prompt",))
        if not rows:
            raise ActlabError(f"{data} holds no training pairs (only blank lines)")
        return [(row["prompt"], row["completion"]) for row in rows]
    return list(read_documents(data))


@adapter_app.command("train")
@friendly
def adapter_train(
    model: str = ModelArg,
    data: Path = typer.Option(..., help="Training texts (.txt/.jsonl 'text'), or JSONL pairs with 'prompt' and 'completion'."),
    site: str = typer.Option("resid.mid", help="Residual site the adapter acts on (resid.mid: the middle layer)."),
    rank: Optional[int] = typer.Option(None, help="Adapter rank r (default: the library's, 4)."),
    steps: Optional[int] = typer.Option(None, help="Maximum optimisation steps, early stopping on a validation split "
                                        "(default: the library's, 200)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the library's, 5e-3)."),
    subspace: Optional[int] = typer.Option(None, help="Keep R inside the top-N principal directions of the site on "
                                           "the training texts, 0 anywhere (default: the library's); see docs/transfer.md."),
    out: Path = typer.Option(Path("adapter.safetensors"), "--out", "-o", help="Adapter file to write."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Train a low-rank residual adapter (h ← h + Rᵀ(Wh + b − Rh)) by backprop on a small dataset."""
    from actlab.interventions.adapter_train import AdapterConfig, train_adapter
    from actlab.io import check_output_file

    for value, option in ((rank, "--rank"), (steps, "--steps")):
        if value is not None:
            at_least(value, 1, option)
    if lr is not None:
        positive(lr, "--lr")
    if subspace is not None:
        at_least(subspace, 0, "--subspace")
    options = {k: v for k, v in dict(rank=rank, steps=steps, lr=lr, subspace=subspace).items() if v is not None}
    AdapterConfig(**options)  # the remaining checks (subspace >= rank) fail here, before the model loads
    check_output_file(out)
    examples = _training_examples(data)
    m = load_model(model, device, dtype)
    adapter = train_adapter(m, examples, site, progress=True, **options)  # AdapterConfig checks the options
    adapter.save(out)
    p = adapter.params
    console.print(f"[green]wrote[/] {escape(str(out))}: rank {adapter.rank} at {adapter.site}; validation loss {p.get('val_loss_before', float('nan')):.3f} → "
                  f"{p.get('val_loss', float('nan')):.3f} in {p.get('steps_run')} steps ({p.get('train_seconds', 0):.1f} s)")
