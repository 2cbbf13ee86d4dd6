"""``actlab sae``: train, evaluate and read sparse autoencoders and transcoders; make latent edits."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from actlab.cli import (
    DeviceOpt, DtypeOpt, ModelArg, app, at_least, console, friendly, load_model, load_sae_arg, one_of, positive, takes,
    text_documents,
)
from actlab.errors import ActlabError

sae_app = typer.Typer(help="Sparse autoencoders and transcoders: train, evaluate, read latents, edit them.",
                      no_args_is_help=True)
app.add_typer(sae_app, name="sae")

TEXT_HELP = ("Training text: .txt / .jsonl documents (default: actlab's bundled 2.1M-token training text, "
             "`actlab.datasets.training_text()`).")


def _texts(data: Optional[Path]):
    return text_documents(data, "SAE training")


def _load(path: Path):
    return load_sae_arg(path)


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise ActlabError(f"{option} expects integers separated by commas, e.g. 3,17; not {text!r}")
    return values


def _site_for(info: dict, given: Optional[str], path: Path) -> str:
    """--site, else the site our file records, else the other library's hook name translated to a site."""
    from actlab.sae.interop import site_from_hook

    where = given or info.get("site") or site_from_hook(info.get("hook_name"))
    if not where:
        hook = info.get("hook_name")
        raise ActlabError(f"{path} does not say which site it reads" + (f" (its hook '{hook}' has no actlab name)"
                          if hook else "") + ": pass --site, e.g. --site resid.2")
    return where


def _open(path: Path, model: Optional[str], site: Optional[str], device: str, dtype: str):
    """The SAE, the site it reads, and the model (checked to be the one it was made for)."""
    loaded, info = _load(path)
    where = _site_for(info, site, path)
    m = load_model(_model_for(info, model, path), device, dtype)
    _check_for(info, m, path)
    return loaded, where, m


def _model_for(info: dict, given: Optional[str], path: Path) -> str:
    if given:
        return given
    name = (info.get("model") or {}).get("model_name") or info.get("model_name")
    if not name:
        raise ActlabError(f"{path} does not say which model it reads: pass --model")
    return name


def _check_for(info: dict, model, path: Path) -> None:
    """Refuse an SAE our file says was trained on another model (other libraries' files name the model only)."""
    from actlab.models.model import same_model

    made_for = info.get("model")
    if isinstance(made_for, dict) and made_for and not same_model(made_for, model.identity()):
        raise ActlabError(f"{path} was trained on {made_for.get('model_name', 'another model')}, not {model.name}; "
                          "evaluate it on that model (or train one for this model with `actlab sae train`)")


class TrainOptions:
    model: str = ModelArg
    site: str = typer.Option("resid.mid", help="The site the SAE reads (a transcoder: the MLP output mlp.i it predicts); "
                             "several (resid.1,resid.3 or resid.*) train one SAE each from one forward pass, in OUT/<site>/.")
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (actlab-sae.safetensors, train.json; rerun to resume).")
    expansion: int = typer.Option(8, help="Latents per input dimension.")
    k: int = typer.Option(32, help="Active latents per token (TopK / BatchTopK).")
    kind: str = typer.Option("topk", help="topk, batchtopk or jumprelu.")
    tokens: Optional[int] = typer.Option(None, help="Training tokens (default: one pass over the data).")
    data: Optional[Path] = typer.Option(None, help=TEXT_HELP)
    store: Optional[Path] = typer.Option(None, help="Train from a recorded store (`actlab record`) instead of text.")
    transcoder: bool = typer.Option(False, help="Train a transcoder: read mlp.in.i, predict mlp.i.")
    skip: bool = typer.Option(False, help="Add a linear skip connection.")
    batch_size: int = typer.Option(4096, help="Tokens per training step.")
    lr: Optional[float] = typer.Option(None, help="Decoder learning rate (default: 2.4e-3 / sqrt(latents / 16384); the encoder takes half, its bias a twelfth).")
    revive_after: Optional[int] = typer.Option(None, help="Raise the encoder bias of a latent silent for this many "
                                               "tokens until it fires (default 16384; 0: never; docs/sae.md).")
    seed: int = typer.Option(0, help="Seed of the initial weights and the data order.")
    device: str = DeviceOpt
    dtype: str = DtypeOpt


@sae_app.command("train")
@friendly
@takes(TrainOptions)
def sae_train(o: TrainOptions):
    """Train an SAE (or transcoder) on a site, streaming activations from the model or reading a store.

    Under torchrun (`torchrun --nproc-per-node N --no-python actlab sae train ...`) the training is
    data-parallel: each rank streams its share of the texts (or reads its rows of each store batch),
    gradients and dead-latent counters are reduced, and rank 0 writes the checkpoint and the SAE."""
    from actlab.dist import init

    one_of(o.kind, ("topk", "batchtopk", "jumprelu"), "--kind")
    for value, option in ((o.expansion, "--expansion"), (o.k, "--k"), (o.batch_size, "--batch-size"),
                          (o.tokens, "--tokens")):
        at_least(value, 1, option)
    positive(o.lr, "--lr")
    at_least(o.revive_after, 0, "--revive-after")
    if o.store is not None and o.data is not None:
        raise ActlabError("give --data or --store, not both")
    with init() as rank:  # under torchrun: data-parallel over the ranks, rank 0 writes (sae/distributed.py)
        _train(o, rank)


def _train(o: TrainOptions, rank) -> None:
    from actlab.dist.placement import rank_device
    from actlab.sae.pipeline import SAE_FILE, TrainPlan, train_on_model, train_several

    m = load_model(o.model, rank_device(o.device, rank), o.dtype)
    store = None
    if o.store is not None:
        from actlab.store import Store

        store = Store(o.store)
    plan = TrainPlan(o.site, o.expansion, o.tokens, o.transcoder)
    options = dict(kind=o.kind, k=o.k, batch_size=o.batch_size, lr=o.lr, seed=o.seed, skip=o.skip,
                   **({} if o.revive_after is None else {"revive_after": o.revive_after}))
    sites = m.resolve([o.site])
    if len(sites) > 1:
        if rank.world_size > 1:
            raise ActlabError("under torchrun, train one site per job: give one --site (several sites from one "
                              "stream are single-process for now)")
        if store is not None:
            raise ActlabError("several sites train from one stream of the model: leave out --store, or give one site")
        results = train_several(m, plan, o.out, texts=_texts(o.data), progress=True, **options)
        outputs = {site: o.out / site / SAE_FILE for site in results}
    else:
        results = {sites[0]: train_on_model(m, plan, o.out, texts=_texts(o.data), store=store, progress=True,
                                            distributed=rank.world_size > 1, **options)}
        outputs = {sites[0]: o.out / SAE_FILE}
    if not rank.is_main:
        return
    for site, result in results.items():
        last = result.history[-1] if result.history else {}
        console.print(f"[green]trained[/] {site}: {result.sae.n_latents} latents, {result.steps} steps "
                      f"(resumed from {result.resumed_from}): fvu {last.get('fvu', float('nan')):.3f}, "
                      f"L0 {last.get('l0', float('nan')):.1f} → {escape(str(outputs[site]))}")


@sae_app.command("eval")
@friendly
def sae_eval(
    sae: Path = typer.Argument(..., help="An SAE: our .safetensors (or its folder), a SAELens or a sparsify folder."),
    model: Optional[str] = typer.Option(None, help="The model (default: the one the SAE's file records)."),
    site: Optional[str] = typer.Option(None, help="The site it reconstructs (default: the one its file records)."),
    data: Optional[Path] = typer.Option(None, help="Held-out text (default: the bundled eval split)."),
    max_tokens: int = typer.Option(50_000, help="Tokens to evaluate on."),
    spliced: bool = typer.Option(True, help="Also measure the spliced LM loss (runs the model 4 times)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the metrics as JSON here."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """MSE, FVU, L0, dead and dense latents, the density histogram, and the spliced CE / KL / CE recovered."""
    from actlab.files import write_json
    from actlab.sae.pipeline import evaluate_on_model

    at_least(max_tokens, 2, "--max-tokens")
    loaded, where, m = _open(sae, model, site, device, dtype)
    if spliced and not m.has_lm_head:
        console.print(f"note: {escape(m.name)} has no language-model head, so the spliced loss is skipped "
                      "(reconstruction and sparsity only)")
        spliced = False
    metrics = evaluate_on_model(m, loaded, where, texts=_texts(data), max_tokens=max_tokens, spliced=spliced,
                                progress=True)
    table = Table(title=f"{escape(str(sae))} on {m.name} {where}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4g}")
        elif isinstance(value, int):
            table.add_row(key, f"{value:,}")
    console.print(table)
    hist = metrics["density_histogram"]
    console.print("latents per firing-rate decade (1e-7 … 1): " + " ".join(map(str, hist["counts"]))
                  + f"; never fired: {hist['never']}")
    if out is not None:
        write_json(out, metrics)


@sae_app.command("latents")
@friendly
def sae_latents(
    sae: Path = typer.Argument(..., help="An SAE file or folder."),
    model: Optional[str] = typer.Option(None, help="The model (default: the one the SAE's file records)."),
    site: Optional[str] = typer.Option(None, help="The site it reads (default: from its file)."),
    latent: Optional[str] = typer.Option(None, help="Latents to show, comma separated (default: 8 across the firing rates)."),
    top: int = typer.Option(5, help="Contexts per latent."),
    data: Optional[Path] = typer.Option(None, help="Text to read (default: the bundled eval split)."),
    max_texts: int = typer.Option(400, help="Texts to read."),
    device: str = DeviceOpt,
):
    """Top-activating contexts of latents."""
    from actlab.datasets import training_text
    from actlab.sae.contexts import latent_contexts

    at_least(top, 1, "--top")
    chosen = _ints(latent, "--latent") if latent else None
    loaded, where, m = _open(sae, model, site, device, "float32")
    texts = (_texts(data) or training_text("eval"))[:max_texts]
    found = latent_contexts(m, loaded, where, texts, latents=chosen, top=top)
    for index, entry in found["latents"].items():
        console.print(f"[bold]latent {index}[/] fires on {entry['rate']:.2%} of tokens")
        for c in entry["contexts"]:
            console.print(f"  {c.value:7.2f}  {escape(c.before[-60:])!s}[reverse]{escape(c.token)}[/]{escape(c.after)}"
                          .replace("\n", "⏎"))


@sae_app.command("edit")
@friendly
def sae_edit(
    sae: Path = typer.Argument(..., help="An SAE file or folder."),
    latent: str = typer.Option(..., help="Latent indices, comma separated."),
    out: Path = typer.Option(..., "--out", "-o", help="The intervention file to write (use it with --edit)."),
    mode: str = typer.Option("clamp", help="clamp (set), add, scale, or direction (a steering vector along the decoder row)."),
    value: float = typer.Option(0.0, help="The value: clamp 0 ablates; for direction, the latent activation it stands for."),
    site: Optional[str] = typer.Option(None, help="The site (default: from the SAE's file)."),
    model: Optional[str] = typer.Option(None, help="Record this model as the one the edit is for (default: the SAE's)."),
):
    """Make an intervention file from SAE latents: clamp / ablate / add / scale them (error term kept), or steer along one."""
    from actlab.interventions.latents import latent_direction, latent_edit

    one_of(mode, ("clamp", "add", "scale", "direction"), "--mode")
    loaded, info = _load(sae)
    where = _site_for(info, site, sae)
    latents = _ints(latent, "--latent")
    m = load_model(model) if model else None
    if mode == "direction":
        if len(latents) != 1:
            raise ActlabError("--mode direction takes one latent")
        item = latent_direction(loaded, where, latents[0], scale=value or None, model=m)
    else:
        item = latent_edit(loaded, where, latents, value, mode=mode, model=m)
    if m is None and info.get("model"):
        item.model = info["model"]
    item.save(out)
    console.print(f"[green]wrote[/] {mode} of latent(s) {latents} at {where} → {escape(str(out))} "
                  "(apply with --edit FILE[:COEF])")
