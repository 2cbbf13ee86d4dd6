"""The ``actlab`` command line: a thin typer shell over the library functions."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

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


def _load(model: str, device: str, dtype: str):
    import actlab

    with console.status(f"loading {model}…"):
        return actlab.load(model, device=device, dtype=dtype)


def _documents(data: Optional[Path], model, max_tokens: Optional[int]):
    from actlab.datasets import default_prompts
    from actlab.io import budget, read_documents

    docs = default_prompts() if data is None else read_documents(data)
    if max_tokens is not None:
        docs = budget(docs, model.tokenizer, max_tokens)
    return docs


def _positions(value: str):
    if value in ("all", "last"):
        return value
    try:
        lo, hi = value.split(":")
        return (int(lo) if lo else None, int(hi) if hi else None)
    except ValueError:
        raise ActlabError(f"--positions must be 'all', 'last' or a span 'start:stop' (e.g. 0:32), not {value!r}") from None


DeviceOpt = typer.Option("cpu", help="Torch device, e.g. cpu or cuda.")
DtypeOpt = typer.Option("float32", help="Weights dtype: float32, bfloat16 or float16.")


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="Where the tour writes report.html and its files."),
    quick: bool = typer.Option(False, help="Fewer prompts and coefficients (about half the time)."),
):
    """The guided tour on the bundled models: profile, steer, paste (Command-V), one HTML report."""
    from actlab.tour import run_tour

    run_tour(out, quick=quick, console=console)


@app.command()
@friendly
def sites(model: str = typer.Argument("demo-llama", help=MODEL_HELP), device: str = DeviceOpt, dtype: str = DtypeOpt):
    """List a model's sites and their widths."""
    m = _load(model, device, dtype)
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
    model: str = typer.Argument("demo-llama", help=MODEL_HELP),
    prompt: str = typer.Argument(..., help="Prompt text."),
    max_new_tokens: int = typer.Option(48, help="Tokens to generate."),
    edit: List[str] = typer.Option([], help="Intervention file with coefficient, FILE:COEF (repeatable)."),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (with --sample)."),
    seed: int = typer.Option(0, help="Random seed for sampling."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Generate text, optionally with interventions applied, streaming tokens to the terminal."""
    from transformers import TextStreamer

    m = _load(model, device, dtype)
    edits = []
    if edit:
        from actlab.interventions import load_with_coef

        edits = [load_with_coef(spec, m) for spec in edit]
    streamer = TextStreamer(m.tokenizer, skip_prompt=True, skip_special_tokens=True)
    console.print(f"[bold]{prompt}[/]", end="")
    sys.stdout.flush()
    with m.edit(*edits):
        m.generate(prompt, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, seed=seed,
                   streamer=streamer)


@app.command()
@friendly
def record(
    model: str = typer.Argument("demo-llama", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Store directory (created; resumed if it holds a partial run)."),
    data: Optional[Path] = typer.Option(None, help=DATA_HELP),
    sites: str = typer.Option("resid.*", help=SITES_HELP),
    positions: str = typer.Option("all", help="Tokens to record: all, last, or a span start:stop."),
    max_tokens: Optional[int] = typer.Option(None, help="Stop after this many input tokens."),
    batch_size: int = typer.Option(8, help="Documents per forward pass."),
    shard_tokens: Optional[int] = typer.Option(None, help="Tokens per shard file, the unit of resume (default: ~256 MiB shards)."),
    store_dtype: Optional[str] = typer.Option(None, "--store-dtype", help="Dtype on disk (default: the model's)."),
    overwrite: bool = typer.Option(False, help="Replace an existing store made with other settings."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Record activations into a sharded, checksummed, resumable on-disk store."""
    from actlab.store import record as record_store

    m = _load(model, device, dtype)
    docs = _documents(data, m, max_tokens)
    store = record_store(m, docs, sites, out, positions=_positions(positions), batch_size=batch_size,
                         shard_tokens=shard_tokens, dtype=store_dtype, overwrite=overwrite, progress=True)
    info = store.info()
    console.print(f"[green]stored[/] {info['n_tokens']:,} tokens × {len(info['sites'])} sites in {out}")


@app.command()
@friendly
def stats(
    model: str = typer.Argument("demo-llama", help=MODEL_HELP),
    data: Optional[Path] = typer.Option(None, help=DATA_HELP),
    sites: str = typer.Option("resid.*,mlp.hidden.*", help=SITES_HELP),
    out: Path = typer.Option(Path("stats.safetensors"), "--out", "-o", help="Output file (safetensors + JSON header)."),
    max_tokens: Optional[int] = typer.Option(None, help="Stop after this many input tokens."),
    batch_size: int = typer.Option(8, help="Documents per forward pass."),
    eps: float = typer.Option(1e-3, help="|x| below eps counts as (near) zero."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Streaming per-channel statistics (mean, variance, extrema, sparsity, histogram, top-k) of sites."""
    from actlab.stats import StatsSink

    m = _load(model, device, dtype)
    docs = _documents(data, m, max_tokens)
    names = m.resolve(sites)
    sink = StatsSink({s: m.sites[s] for s in names}, eps=eps)
    summary = m.run(docs, names, sink, batch_size=batch_size, progress=True, description="stats")
    sink.save(out, metadata=m.identity())
    table = Table(title=f"{summary.n_tokens:,} tokens, {summary.tokens_per_second:,.0f} tok/s")
    rows = sink.summary()
    columns = list(next(iter(rows.values())).keys())
    table.add_column("site")
    for c in columns:
        table.add_column(c, justify="right")
    for site, values in rows.items():
        table.add_row(site, *[f"{v:.4g}" if isinstance(v, float) else str(v) for v in values.values()])
    console.print(table)
    console.print(f"[green]wrote[/] {out}")


@app.command()
@friendly
def profile(
    model: str = typer.Argument("demo-llama", help=MODEL_HELP),
    data: Optional[Path] = typer.Option(None, help=DATA_HELP),
    out: Path = typer.Option(Path("profile"), "--out", "-o", help="Output directory for report.html and profile.json."),
    eval_data: Optional[Path] = typer.Option(None, help="Held-out texts for the perplexity checks (default: bundled neutral passages)."),
    max_tokens: Optional[int] = typer.Option(None, help="Stop after this many input tokens."),
    analyses: str = typer.Option(",".join(("sparsity", "dead", "ppl_sparsity", "massive", "linearity", "lenses", "redundancy", "readout")),
                                 help="Comma-separated analyses to run."),
    reservoir: int = typer.Option(4096, help="Tokens kept in the fixed-size sample used by fits (memory bound)."),
    batch_size: int = typer.Option(8, help="Documents per forward pass."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Per-layer activation profile (sparsity, dead neurons, PPL-p%, massive activations, linearity, lenses,
    redundancy, neuron readout) written as report.html + profile.json."""
    from actlab.analyses.profile import run_profile
    from actlab.io import read_documents

    m = _load(model, device, dtype)
    docs = _documents(data, m, max_tokens) if (data is not None or max_tokens is not None) else None
    eval_texts = list(read_documents(eval_data)) if eval_data is not None else None
    run = run_profile(m, docs, eval_texts=eval_texts, out_dir=out, analyses=[a.strip() for a in analyses.split(",") if a.strip()],
                      reservoir_size=reservoir, batch_size=batch_size, progress=True)
    console.print(run.headline_table(f"profile of {m.name} ({run.meta['n_tokens']:,} tokens, {run.seconds:.0f} s)"))
    console.print(f"[green]report:[/] {run.report_path.resolve()}")


@store_app.command("info")
@friendly
def store_info(path: Path = typer.Argument(..., help="Store directory.")):
    """Summarise a store: model, sites, tokens, shards."""
    from actlab.store import Store

    info = Store(path).info()
    table = Table(show_header=False)
    for key, value in info.items():
        table.add_row(str(key), str(value))
    console.print(table)


@store_app.command("verify")
@friendly
def store_verify(path: Path = typer.Argument(..., help="Store directory.")):
    """Check every shard against the manifest's checksums; exit 1 if anything is wrong."""
    from actlab.store import Store

    problems = Store(path).verify()
    if problems:
        for problem in problems:
            err_console.print(f"[red]✗[/] {problem}")
        raise typer.Exit(1)
    console.print(f"[green]✓[/] {path}: every shard matches its checksum")


@steer_app.command("fit")
@friendly
def steer_fit(
    model: str = typer.Argument("demo-llama", help=MODEL_HELP),
    pos: Path = typer.Option(..., help="Positive examples: a text file, or a JSONL of pairs with prompt/pos/neg (then omit --neg)."),
    neg: Optional[Path] = typer.Option(None, help="Negative examples (text file)."),
    site: str = typer.Option("resid.2", help="Site(s); several (e.g. resid.*) fits a vector per layer, or one joint affine map."),
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
    from actlab.interventions.fit import fit_steering

    m = _load(model, device, dtype)
    contrast = read_contrast(pos, neg)
    if method == "affine":
        from actlab.interventions.affine_fit import fit_affine

        result = fit_affine(m, contrast, site, positions=positions, progress=True)
        result.save(out)
        console.print(f"[green]wrote[/] {out}: affine maps at {', '.join(i.site for i in result)}")
        return
    names = m.resolve(site)
    if len(names) == 1:
        vec = fit_steering(m, contrast, names, method=method, aggregate=aggregate, dims=dims, positions=positions)[names[0]]
        vec.save(out)
        console.print(f"[green]wrote[/] {out}: {method} vector at {names[0]}, norm {vec.vector.norm():.3f} "
                      f"(|mean diff| {vec.params['mean_diff_norm']:.3f}, mean |h| {vec.params['resid_norm']:.3f})")
        return
    from actlab.interventions.fit import sweep_layers

    rows = sweep_layers(m, contrast, names, method=method, aggregate=aggregate, dims=dims, positions=positions)
    table = Table(title=f"layer sweep: {method} vectors fitted on 75% of the contrast set, scored on the rest "
                        "(gain = rise of log p(pos) − log p(neg) per token at coefficient 1)")
    for col in ("site", "gain (nats/token)", "norm", "file"):
        table.add_column(col, justify="right")
    for rank, row in enumerate(rows):
        path = out if rank == 0 else out.with_name(f"{out.stem}.{row['site']}{out.suffix}")
        row["vector"].save(path)
        table.add_row(row["site"] + (" [bold green](best)[/]" if rank == 0 else ""), f"{row['gain']:+.4f}",
                      f"{row['norm']:.3f}", str(path))
    console.print(table)
    console.print(f"best layer {rows[0]['site']} written to {out}; `actlab steer eval` draws genre dose-response curves")


@steer_app.command("eval")
@friendly
def steer_eval(
    model: str = typer.Argument("demo-llama", help=MODEL_HELP),
    genre: str = typer.Option("techdoc", help="Target genre (scripture, fortunes, jargon, techdoc, dictionary)."),
    site: Optional[str] = typer.Option(None, help="Site to steer at; default: a layer sweep picks the best resid layer."),
    methods: str = typer.Option("mean-diff,pca,dims,affine,adapter", help="Methods to fit and compare."),
    coefs: str = typer.Option("-2,-1,0,0.5,1,2,4", help="Coefficients of the dose-response grid."),
    prompts: int = typer.Option(16, help="Held-out prompts continued per point."),
    tokens: int = typer.Option(24, help="New tokens per continuation."),
    seed: int = typer.Option(0, help="Sampling seed (shared by every point, so curves are comparable)."),
    out: Path = typer.Option(Path("steer-eval"), "--out", "-o", help="Directory for evaluation.json and the plots."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Dose-response of genre steering: genre rate of generations and neutral perplexity vs coefficient, per
    method, with a random-vector control (uses the bundled genre sets and classifier)."""
    from actlab.interventions.evaluate import evaluate_genre, write_evaluation

    try:
        grid = [float(c) for c in coefs.split(",") if c.strip()]
    except ValueError:
        raise ActlabError(f"--coefs expects numbers separated by commas, e.g. -1,0,1,2; not {coefs!r}") from None
    m = _load(model, device, dtype)
    result = evaluate_genre(m, genre, site=site, methods=[x.strip() for x in methods.split(",") if x.strip()], coefs=grid,
                            n_prompts=prompts, max_new_tokens=tokens, seed=seed, progress=True)
    if result.sweep is not None:
        console.print(f"layer sweep ({result.sweep.method} × {result.sweep.coef:g}): best {result.sweep.best_site}")
        console.print(result.sweep.table())
    console.print(f"dose-response at {result.site}: genre rate (neutral perplexity)")
    console.print(result.dose.table())
    paths = write_evaluation(result, out)
    console.print(f"[green]wrote[/] {', '.join(str(p) for p in paths)} ({result.seconds:.0f} s)")


@adapter_app.command("train")
@friendly
def adapter_train(
    model: str = typer.Argument("demo-llama", help=MODEL_HELP),
    data: Path = typer.Option(..., help="Training texts (.txt/.jsonl 'text'), or JSONL pairs with 'prompt' and 'completion'."),
    site: str = typer.Option("resid.2", help="Residual site the adapter acts on."),
    rank: int = typer.Option(4, help="Adapter rank r."),
    steps: int = typer.Option(200, help="Maximum optimisation steps (early stopping on a validation split)."),
    lr: float = typer.Option(1e-2, help="Learning rate."),
    out: Path = typer.Option(Path("adapter.safetensors"), "--out", "-o", help="Adapter file to write."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Train a low-rank residual adapter (h ← h + Rᵀ(Wh + b − Rh)) by backprop on a small dataset."""
    import json as _json

    from actlab.interventions.adapter_train import train_adapter
    from actlab.io import read_documents

    m = _load(model, device, dtype)
    examples: list = []
    if data.suffix == ".jsonl" and "completion" in data.read_text(encoding="utf-8").split("\n", 1)[0]:
        for line in data.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = _json.loads(line)
                examples.append((row.get("prompt", ""), row["completion"]))
    else:
        examples = list(read_documents(data))
    adapter = train_adapter(m, examples, site, rank=rank, steps=steps, lr=lr, progress=True)
    adapter.save(out)
    p = adapter.params
    console.print(f"[green]wrote[/] {out}: rank {rank} at {site}; validation loss {p.get('val_loss_before', float('nan')):.3f} → "
                  f"{p.get('val_loss', float('nan')):.3f} in {p.get('steps_run')} steps ({p.get('train_seconds', 0):.1f} s)")


def _prompts(path: Optional[Path]) -> list[str]:
    from actlab.datasets import default_prompts
    from actlab.io import read_documents

    return default_prompts() if path is None else list(read_documents(path))


@paste_app.command("profile")
@friendly
def paste_profile(
    model: str = typer.Argument("demo-llama", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Profile file (.safetensors)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompt file (default: the bundled prompt set). Use the same file for both models."),
    positions: str = typer.Option("last", help="last (last prompt token, one row per prompt) or all (every token; same tokenizer only)."),
    batch_size: int = typer.Option(16, help="Prompts per forward pass."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Record resid.{i} of every layer on a prompt set: the activation profile Command-V fits converters on."""
    from actlab.transfer import profile_model

    m = _load(model, device, dtype)
    profile = profile_model(m, _prompts(prompts), positions=positions, batch_size=batch_size, progress=True)
    profile.save(out)
    console.print(f"[green]wrote[/] {out}: {profile.n_layers} layers × {profile.acts[0].shape[0]} rows × {profile.d_model}")


@paste_app.command("run")
@friendly
def paste_run(
    donor: str = typer.Option(..., help="Donor model (the one the intervention was made for)."),
    recipient: str = typer.Option(..., help="Recipient model (receives the pasted intervention)."),
    intervention: Path = typer.Option(..., help="Donor intervention file (steering vector, affine map or adapter at resid.{i})."),
    out: Path = typer.Option(..., "--out", "-o", help="Recipient intervention file to write."),
    prompts: Optional[Path] = typer.Option(None, help="Profile prompt file (default: the bundled prompt set)."),
    layer_map: Optional[str] = typer.Option(None, "--map", help="Explicit donor:recipient layer pairs, e.g. 0:0,2:3 (default: relative depth)."),
    positions: str = typer.Option("last", help="Profile positions: last or all."),
    cache_dir: Path = typer.Option(Path(".actlab-cache"), help="Where profiles are cached between runs."),
    converters_out: Optional[Path] = typer.Option(None, help="Also save the fitted converters here."),
    min_lambda: float = typer.Option(0.1, help="Floor on the ridge λ chosen by held-out error (0.1 keeps pasted adapters "
                                          "from amplifying directions the profile barely varies in; 0 = pure held-out choice)."),
    deattenuate: bool = typer.Option(True, help="Restore the length the regression converters lose along the edit's "
                                                "directions (geometric-mean slope; see docs/transfer.md)."),
    max_gain: float = typer.Option(1.5, help="Cap on the de-attenuation gain (1 = off)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Profile both models (cached) → fit converters → paste the donor intervention into the recipient."""
    from actlab.interventions import load_interventions
    from actlab.transfer import cached_profile, fit_converters, parse_layer_map, paste, predicted_effect

    d_model, r_model = _load(donor, device, dtype), _load(recipient, device, dtype)
    donor_edit = load_interventions(intervention, d_model)
    texts = _prompts(prompts)
    d_prof = cached_profile(d_model, texts, positions=positions, cache_dir=cache_dir, progress=True)
    r_prof = cached_profile(r_model, texts, positions=positions, cache_dir=cache_dir, progress=True)
    mapping = parse_layer_map(layer_map, d_model.n_layers, r_model.n_layers) if layer_map else None
    converters = fit_converters(d_prof, r_prof, layer_map=mapping, min_lambda=min_lambda)
    if converters_out is not None:
        converters.save(converters_out)
    pasted = paste(donor_edit, converters, r_model, deattenuate=deattenuate, max_gain=max_gain)
    pasted.save(out)
    table = Table(title=f"pasted {intervention.name} from {donor} into {recipient} "
                        f"(converters fitted in {converters.fit_seconds:.2f} s on {len(texts)} prompts)")
    for col in ("donor site", "recipient site", "kind", "held-out R² R→D", "held-out R² D→R", "|Δ|/|h| donor", "|Δ|/|h| pasted"):
        table.add_column(col, justify="right")
    for row in predicted_effect(donor_edit, pasted, d_prof, r_prof, converters):
        table.add_row(row["donor_site"], row["recipient_site"], row["kind"], f"{row['r2_to_donor']:.3f}",
                      f"{row['r2_to_recipient']:.3f}", f"{row['donor_rel_norm']:.3f}", f"{row['recipient_rel_norm']:.3f}")
    console.print(table)
    for item in pasted.edits():
        gains = item.params.get("deattenuation", {}).get("gains")
        if gains:
            console.print(f"{item.site}: de-attenuation gains {', '.join(f'{g:.2f}' for g in gains)} (cap {max_gain:g})")
    console.print(f"[green]wrote[/] {out}: apply it with `actlab generate {recipient} PROMPT --edit {out}:1.0`")


@paste_app.command("eval")
@friendly
def paste_eval(
    donor: str = typer.Option("demo-llama", help="Donor model."),
    recipient: str = typer.Option("demo-gpt2", help="Recipient model."),
    kind: str = typer.Option("vector", help="What to make in the donor and paste: vector (mean-diff) or adapter (trained)."),
    genre: str = typer.Option("scripture", help="Target genre of the behaviour."),
    site: Optional[str] = typer.Option(None, help="Donor site (default: the middle layer)."),
    coef: Optional[float] = typer.Option(None, help="Coefficient (default 0.5 for vectors, 1 for adapters)."),
    positions: str = typer.Option("all", help="Profile rows: all tokens (same tokenizer) or last token."),
    lambdas: str = typer.Option("paste", help="Converter ridge grid: paste (λ ≥ 0.1), auto (full grid) or numbers."),
    prompts: int = typer.Option(80, help="Held-out prompts continued per condition."),
    samples: int = typer.Option(4, help="Samples per prompt."),
    tokens: int = typer.Option(24, help="New tokens per continuation."),
    seed: int = typer.Option(0, help="Sampling seed."),
    deattenuate: bool = typer.Option(True, help="De-attenuate the pasted (and random) interventions, as paste run does."),
    max_gain: float = typer.Option(1.5, help="Cap on the de-attenuation gain (1 = off)."),
    tune: bool = typer.Option(False, help="Score on the fitted pairs' own prompts (the tuning set) instead of the "
                                          "held-out ones, to choose settings without touching the evaluation prompts."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory for the JSON result and the bar chart."),
    name: Optional[str] = typer.Option(None, help="File stem under --out."),
):
    """Validate Command-V: genre rate of the recipient with the pasted intervention vs its own directly fitted one
    vs a pasted random one vs none, with perplexity, converter R² and compute."""
    import actlab
    from actlab.transfer.evaluate import evaluate_transfer, evaluation_prompts, parse_lambdas, write_result

    tuning = list(dict.fromkeys(evaluation_prompts(genre)[0].contrast.prompts))[:prompts] if tune else None
    result = evaluate_transfer(actlab.load(donor), actlab.load(recipient), kind=kind, target_genre=genre, donor_site=site,
                               coef=coef, positions=positions, n_eval_prompts=prompts, samples_per_prompt=samples,
                               max_new_tokens=tokens, converter_lambdas=parse_lambdas(lambdas), seed=seed,
                               deattenuate=deattenuate, max_gain=max_gain, eval_prompts=tuning, progress=True)
    for line in result.summary_lines():
        console.print(line)
    if out is not None:
        paths = write_result(result, out, name)
        console.print(f"[green]wrote[/] {', '.join(str(p) for p in paths)}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
