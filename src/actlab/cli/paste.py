"""``actlab paste profile`` / ``paste run`` / ``paste eval``: Command-V from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import typer
from rich.markup import escape
from rich.table import Table

from actlab.cli import (
    DeviceOpt, DtypeOpt, MaxGainOpt, ModelArg, NewTokensOpt, at_least, console, floats, friendly, load_model, one_of,
    paste_app, prompt_list, takes,
)
from actlab.errors import ActlabError

POSITIONS = ("auto", "all", "last")  # actlab.transfer.profiles.POSITIONS (not imported here: it pulls in torch)
ADAPTER_PASTES = ("effect", "weights")  # actlab.transfer.pipeline.ADAPTER_PASTES (likewise)
EFFECT_COLUMNS = ("donor site", "recipient site", "kind", "held-out R² R→D", "held-out R² D→R", "|Δ|/|h| donor",
                  "|Δ|/|h| pasted", "expected ratio")


def profile_prompt_list(path: Optional[Path]) -> list[str]:
    """The profile prompts of a file (default: ``actlab.datasets.profile_texts()``)."""
    from actlab.datasets import profile_texts

    return profile_texts() if path is None else prompt_list(path)


def parse_lambdas(text: str) -> Sequence[float] | None:
    """``paste`` (λ ≥ MIN_LAMBDA), ``auto`` (fit_converters' own grid) or numbers separated by commas."""
    if text == "paste":
        from actlab.transfer.converters import PASTE_LAMBDAS

        return PASTE_LAMBDAS
    if text == "auto":
        return None
    values = floats(text, "--lambdas (paste, auto or numbers)", "0.1,1,10")
    if min(values) < 0:
        raise ActlabError(f"--lambdas are ridge penalties: numbers >= 0, not {text!r}")
    return values


@paste_app.command("profile")
@friendly
def paste_profile(
    model: str = ModelArg,
    out: Path = typer.Option(..., "--out", "-o", help="Profile file (.safetensors)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompt file (default: the bundled prompt set). Use the same file for both models."),
    positions: str = typer.Option("last", help="last (last prompt token, one row per prompt) or all (every token; same tokenizer only)."),
    batch_size: int = typer.Option(16, help="Prompts per forward pass."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Record resid.{i} of every layer on a prompt set: the activation profile Command-V fits converters on."""
    from actlab.io import check_output_file
    from actlab.transfer import profile_model

    one_of(positions, ("last", "all"), "--positions")
    at_least(batch_size, 1, "--batch-size")
    check_output_file(out)
    texts = profile_prompt_list(prompts)
    m = load_model(model, device, dtype)
    profile = profile_model(m, texts, positions=positions, batch_size=batch_size, progress=True)
    profile.save(out)
    console.print(f"[green]wrote[/] {escape(str(out))}: {profile.n_layers} layers × {profile.acts[0].shape[0]} rows × {profile.d_model}")


def _print_paste(result, intervention: Path, donor: str, recipient: str, n_prompts: int, max_gain: float) -> None:
    table = Table(title=f"pasted {intervention.name} from {donor} into {recipient} "
                        f"(converters fitted in {result.converters.fit_seconds:.2f} s on {n_prompts} prompts)")
    for col in EFFECT_COLUMNS:
        table.add_column(col, justify="right")
    for row in result.rows:
        table.add_row(row["donor_site"], row["recipient_site"], row["kind"], f"{row['r2_to_donor']:.3f}",
                      f"{row['r2_to_recipient']:.3f}", f"{row['donor_rel_norm']:.3f}", f"{row['recipient_rel_norm']:.3f}",
                      f"{row['expected_ratio']:.2f}")
    console.print(table)
    for item in result.pasted.edits():
        gains = item.params.get("deattenuation", {}).get("gains")
        shared = item.params.get("shared_correlations") or []
        if item.params.get("method") == "effect":
            console.print(f"{item.site}: pasted by its effect on the last layer ({item.params['donor_site']} of the donor): "
                          f"the fitted edit reproduces {item.params['effect_r2']:.0%} of the mapped donor change on held-out "
                          f"rows; expected effect ratio {item.params['expected_ratio']:.2f} of the recipient's own "
                          "(docs/transfer.md)")
            continue
        if gains:
            console.print(f"{item.site}: de-attenuation gains {', '.join(f'{g:.2f}' for g in gains)} (cap {max_gain:g})")
        console.print(f"{item.site}: expected effect ratio {item.params.get('expected_ratio', 1.0):.2f} of the recipient's "
                      f"own intervention (shared correlation along the edit {', '.join(f'{r:.2f}' for r in shared)}; "
                      "docs/transfer.md)")
    for note in result.notes:
        console.print(f"[yellow]note[/]: {escape(note)}")


class PasteRunOptions:
    """The options of ``actlab paste run`` (see ``takes``)."""

    donor: str = typer.Option(..., help="Donor model (the one the intervention was made for).")
    recipient: str = typer.Option(..., help="Recipient model (receives the pasted intervention).")
    intervention: Path = typer.Option(..., help="Donor intervention file (steering vector, affine map or adapter at resid.{i}).")
    out: Path = typer.Option(..., "--out", "-o", help="Recipient intervention file to write.")
    prompts: Optional[Path] = typer.Option(None, help="Profile prompt file (default: the bundled profile texts, ~820 "
                                                      "prompts and passages).")
    layer_map: Optional[str] = typer.Option(None, "--map", help="Explicit donor:recipient layer pairs, e.g. 0:0,2:3 (default: relative depth).")
    positions: str = typer.Option("auto", help="Profile positions: auto (every token when the two tokenizers agree, "
                                               "else the last prompt token), all or last.")
    cache_dir: Path = typer.Option(Path(".actlab-cache"), help="Where profiles are cached between runs.")
    converters_out: Optional[Path] = typer.Option(None, help="Also save the fitted converters here.")
    min_lambda: Optional[float] = typer.Option(
        None, show_default=False, help="Floor on the ridge λ chosen by held-out error (default: actlab.transfer.MIN_LAMBDA, "
        "0.1, which keeps pasted adapters from amplifying directions the profile barely varies in; 0 = pure held-out "
        "choice).")
    deattenuate: bool = typer.Option(True, help="Restore the length the regression converters lose along the edit's "
                                                "directions (geometric-mean slope; see docs/transfer.md).")
    max_gain: float = MaxGainOpt
    calibrate: bool = typer.Option(True, help="Give pasted adapters / affine maps the donor edit's size relative to "
                                              "the stream (steering vectors are left to the converters).")
    adapter_paste: str = typer.Option("effect", help="Adapters / affine maps: effect (an edit of the recipient's last "
                                                     "layer fitted to the donor edit's change there) or weights (the "
                                                     "closed-form paste at the matched layer). See docs/transfer.md.")
    device: str = DeviceOpt
    dtype: str = DtypeOpt


def _check_paste_run(o: PasteRunOptions) -> None:
    """The options of ``paste run`` and its output paths, before any model is loaded."""
    from actlab.io import check_output_dir, check_output_file

    one_of(o.positions, POSITIONS, "--positions")
    one_of(o.adapter_paste, ADAPTER_PASTES, "--adapter-paste")
    at_least(o.max_gain, 1, "--max-gain")
    at_least(o.min_lambda, 0, "--min-lambda")
    check_output_file(o.out)
    if o.converters_out is not None:
        check_output_file(o.converters_out, "--converters-out")
    check_output_dir(o.cache_dir, option="--cache-dir", what="profile cache")


@paste_app.command("run")
@friendly
@takes(PasteRunOptions)
def paste_run(o: PasteRunOptions):
    """Profile both models (cached) → fit converters → paste the donor intervention into the recipient."""
    from actlab.interventions import load_interventions
    from actlab.transfer import parse_layer_map, paste_between

    _check_paste_run(o)
    texts = profile_prompt_list(o.prompts)
    d_model, r_model = load_model(o.donor, o.device, o.dtype), load_model(o.recipient, o.device, o.dtype)
    donor_edit = load_interventions(o.intervention, d_model)
    mapping = parse_layer_map(o.layer_map, d_model.n_layers, r_model.n_layers) if o.layer_map else None
    floor = {} if o.min_lambda is None else {"min_lambda": o.min_lambda}
    result = paste_between(d_model, r_model, donor_edit, texts, positions=o.positions, cache_dir=o.cache_dir,
                           layer_map=mapping, deattenuate=o.deattenuate, max_gain=o.max_gain, calibrate=o.calibrate,
                           adapter_paste=o.adapter_paste, progress=True, **floor)
    if o.converters_out is not None:
        result.converters.save(o.converters_out)
    result.pasted.save(o.out)
    _print_paste(result, o.intervention, o.donor, o.recipient, len(texts), o.max_gain)
    console.print(f"[green]wrote[/] {escape(str(o.out))}: apply it with "
                  f"`actlab generate {escape(o.recipient)} PROMPT --edit {escape(str(o.out))}:1.0`")


class PasteEvalOptions:
    """The options of ``actlab paste eval``."""

    donor: str = typer.Option("demo-llama", help="Donor model.")
    recipient: str = typer.Option("demo-gpt2", help="Recipient model.")
    kind: str = typer.Option("vector", help="What to make in the donor and paste: vector (mean-diff) or adapter (trained).")
    genre: str = typer.Option("scripture", help="Target genre of the behaviour.")
    site: Optional[str] = typer.Option(None, help="Donor site (default: the middle layer).")
    coef: Optional[float] = typer.Option(None, help="Coefficient (default 0.5 for vectors, 1 for adapters).")
    positions: str = typer.Option("auto", help="Profile rows: auto (as paste run), all tokens or the last token.")
    lambdas: str = typer.Option("paste", help="Converter ridge grid: paste (λ ≥ 0.1), auto (full grid) or numbers.")
    prompts: int = typer.Option(80, help="Held-out prompts continued per condition.")
    samples: int = typer.Option(4, help="Samples per prompt.")
    tokens: int = NewTokensOpt
    seed: int = typer.Option(0, help="Sampling seed.")
    deattenuate: bool = typer.Option(True, help="De-attenuate the pasted (and random) interventions, as paste run does.")
    max_gain: float = MaxGainOpt
    split: str = typer.Option("eval", help="Contrast texts and prompts from the tuning split (tune: for choosing "
                                           "settings) or the evaluation split (eval).")
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory for the JSON result and the bar chart.")
    name: Optional[str] = typer.Option(None, help="File stem under --out.")


@paste_app.command("eval")
@friendly
@takes(PasteEvalOptions)
def paste_eval(o: PasteEvalOptions):
    """Validate Command-V: genre rate of the recipient with the pasted intervention vs its own directly fitted one
    vs a pasted random one vs none, with perplexity, converter R² and compute."""
    from actlab.experiments.genre_data import SPLITS
    from actlab.experiments.transfer_eval import evaluate_transfer
    from actlab.experiments.transfer_results import write_result
    from actlab.io import check_output_dir

    one_of(o.kind, ("vector", "adapter"), "--kind")
    one_of(o.positions, POSITIONS, "--positions")
    one_of(o.split, SPLITS, "--split")
    for value, option in ((o.prompts, "--prompts"), (o.samples, "--samples"), (o.tokens, "--tokens")):
        at_least(value, 1, option)
    at_least(o.seed, 0, "--seed")
    at_least(o.max_gain, 1, "--max-gain")
    lambdas = parse_lambdas(o.lambdas)
    if o.out is not None:
        check_output_dir(o.out, option="--out", what="transfer evaluations")
    result = evaluate_transfer(load_model(o.donor), load_model(o.recipient), kind=o.kind, target_genre=o.genre,
                               donor_site=o.site, coef=o.coef, positions=o.positions, n_eval_prompts=o.prompts,
                               samples_per_prompt=o.samples, max_new_tokens=o.tokens,
                               converter_lambdas=lambdas, seed=o.seed, deattenuate=o.deattenuate,
                               max_gain=o.max_gain, split=o.split,
                               progress=True)
    for line in result.summary_lines():
        console.print(line)
    if o.out is not None:
        paths = write_result(result, o.out, o.name)
        console.print(f"[green]wrote[/] {escape(', '.join(str(p) for p in paths))}")
