"""``actlab demo``: the guided tour on the bundled models (what ``make demo`` runs).

profile both models → fit a genre steering vector in the donor → steered vs plain generations and
a dose-response curve → paste the vector into the recipient → pasted vs direct vs plain → a feature
browser for 32 neurons of the donor (``demo/browser/index.html``) → one
HTML report (``demo/report.html``) that combines the profiles with the steering and transfer results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

GENRE = "scripture"

__all__ = ["run_tour", "Section", "GENRE"]


@dataclass
class Section:
    """Adapts any result with to_dict()/figure(s) to the report's section protocol."""

    key: str
    title: str
    explanation: str
    headline_text: str
    data: dict[str, Any]
    figs: list = field(default_factory=list)
    rows: tuple[list[str], list[list[Any]]] | None = None

    def headline(self) -> str:
        return self.headline_text

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def figures(self) -> list:
        return list(self.figs)

    def table(self):
        return self.rows


def _generations_table(console: Console, title: str, prompts: list[str], columns: dict[str, list[str]]) -> list[list[str]]:
    table = Table(title=title, show_lines=True)
    table.add_column("prompt", style="bold")
    for name in columns:
        table.add_column(name)
    rows = []
    for i, prompt in enumerate(prompts):
        row = [prompt] + [columns[name][i].strip().replace("\n", " ")[:160] for name in columns]
        table.add_row(*row)
        rows.append(row)
    console.print(table)
    return rows


def _profiles(models, out: Path, quick: bool, console: Console) -> dict:
    from actlab.analyses.profile import run_profile
    from actlab.datasets import default_prompts
    from actlab.datasets.genres import neutral

    docs = default_prompts()[: 160 if quick else None]
    eval_texts = neutral()[:12]
    profiles = {}
    for model in models:
        run = run_profile(model, docs, eval_texts=eval_texts, out_dir=out / f"profile-{model.name}",
                          reservoir_size=2048, progress=True)
        profiles[model.name] = run
        console.print(run.headline_table(f"profile of {model.name}"))
    return profiles


def _steer(donor, quick: bool, console: Console) -> Section:
    """Fit the genre vector, show plain vs steered generations, draw its dose-response curve."""
    from actlab.experiments.genre_data import genre_setup
    from actlab.experiments.steering_eval import dose_response
    from actlab.experiments.transfer_eval import DEFAULT_VECTOR_COEF, default_site
    from actlab.interventions.fit import fit_steering

    setup = genre_setup(GENRE, n_prompts=8 if quick else 16)
    site = default_site(donor)  # step 4 pastes a vector made at the same layer (from contrast passages)
    vector = fit_steering(donor, setup.contrast, site, method="mean-diff")[site]
    coef = DEFAULT_VECTOR_COEF
    shown = setup.prompts[:3]
    plain = donor.generate(shown, max_new_tokens=24, do_sample=True, seed=0)
    with donor.edit(vector * coef):
        steered = donor.generate(shown, max_new_tokens=24, do_sample=True, seed=0)
    steer_rows = _generations_table(console, f"{donor.name}: plain vs steered (mean-diff at {site}, ×{coef:g})", shown,
                                    {"plain": plain, f"steered ×{coef:g}": steered})
    coefs = (-1.0, 0.0, 0.5, 1.0, 2.0) if quick else (-2.0, -1.0, 0.0, 0.25, 0.5, 1.0, 2.0)
    dose = dose_response(donor, {"mean-diff": vector}, coefs, target_genre=GENRE, prompts=setup.prompts,
                         neutral_texts=setup.neutral_texts, progress=True)
    console.print(dose.table())
    return Section(
        key="steering", title=f"Steering {donor.name} toward {GENRE}",
        explanation=("A mean-difference (CAA) vector fitted on contrast pairs (the same prompt continued in "
                     f"{GENRE} vs another genre) is added to {site} at every position. The left panel is the rate at "
                     "which the genre classifier labels sampled continuations of held-out prompts as the target "
                     "genre; the right panel is perplexity on neutral text under the same edit. The dashed curve is a "
                     "random vector of the same norm: the control."),
        headline_text=_dose_headline(dose), data=dose.to_dict(), figs=[dose.figure()],
        rows=(["prompt", "plain", f"steered ×{coef:g}"], steer_rows))


def _paste(donor, recipient, out: Path, quick: bool, console: Console) -> Section:
    """Command-V: paste the vector into the recipient and compare with its own and a random one."""
    from actlab.datasets import profile_texts
    from actlab.experiments.transfer_eval import evaluate_transfer

    # quick: a quarter of the profile documents (27k tokens), for a faster check of the same path
    transfer = evaluate_transfer(donor, recipient, kind="vector", target_genre=GENRE, progress=True,
                                 n_eval_prompts=16 if quick else 32, samples_per_prompt=2, cache_dir=out / "cache",
                                 profile_prompts=profile_texts()[::4] if quick else None)
    for line in transfer.summary_lines():
        console.print(line)
    c = transfer.conditions
    first = {n: [c[n].samples[0] if c[n].samples else ""] for n in ("none", "pasted", "direct")}
    _generations_table(console, f"{recipient.name}: a sampled continuation per condition", ["(first held-out prompt)"],
                       {"plain": first["none"], "pasted": first["pasted"], "direct": first["direct"]})
    return Section(
        key="transfer", title=f"Pasting the vector into {recipient.name} (Command-V)",
        explanation=("Both models are profiled on the same prompts; ridge converters between matched layers map the "
                     "donor's steering vector into the recipient's residual stream without any training. The vector "
                     f"is fitted on contrast texts as a user would bring them ({GENRE} passages against passages of the "
                     "other genres, the evaluation split); 'direct' is the recipient's own vector fitted on the same "
                     "texts; 'random' is a random donor vector of the same norm, pasted the same way."),
        headline_text=(f"pasted/direct effect {transfer.pasted_ratio:.2f}, random/direct {transfer.random_ratio:+.2f}; "
                       f"genre rate {c['none'].rate:.0%} → pasted {c['pasted'].rate:.0%} (direct {c['direct'].rate:.0%})"),
        data=transfer.to_dict(), figs=[transfer.figure()],
        rows=(["condition", "genre rate", "perplexity", "effect"],
              [[n, round(c[n].rate, 3), round(c[n].perplexity, 1), round(c[n].effect, 3)] for n in c]))


def _write(out: Path, donor, recipient, sections: list[Section], profiles: dict, start: float,
           console: Console) -> Path:
    from actlab.report.html import render_section, write_report
    from actlab.report.serialize import write_json

    results = list(sections)
    for name, run in profiles.items():  # each profile's headlines join the summary table
        results.append(Section(
            key=f"profile-{name}", title=f"Profile of {name}",
            explanation=f"Every analysis of {name} follows at the end of this page; the stand-alone report is "
                        f"profile-{name}/report.html.",
            headline_text=" · ".join(r.headline() for r in run.results[:3]), data=run.to_dict()["summary"],
            rows=(["analysis", "headline"], [[r.title, r.headline()] for r in run.results])))
    profile_sections = []
    for name, run in profiles.items():
        profile_sections.append(f"<h1 id='profile-{name}-details'>Profile of {name}: every analysis</h1>"
                                f"<p><a href='profile-{name}/report.html'>full report</a></p>")
        profile_sections.extend(render_section(r) for r in run.results)
    seconds = time.perf_counter() - start
    subtitle = (f"donor {donor.name} → recipient {recipient.name} · target genre {GENRE} · "
                f"made by `actlab demo` in {seconds / 60:.1f} min")
    path = write_report(out / "report.html", "actlab tour", subtitle, results, extra_sections=profile_sections)
    steer, transfer = sections
    write_json(out / "tour.json", {"steering": steer.data, "transfer": transfer.data,
                                   "profiles": {n: r.to_dict()["summary"] for n, r in profiles.items()},
                                   "seconds": seconds}, indent=1)
    console.print(f"[green]report:[/] {path.resolve()}  ({seconds / 60:.1f} min)")
    return path


BROWSE_UNITS = 32


def _browser(model, out: Path, console: Console) -> Path:
    """A small feature browser (docs/browse.md): the first neurons of one MLP layer over held-out text."""
    from actlab.browse import build_browser
    from actlab.datasets import training_text

    index = build_browser(model, out / "browser", "mlp.hidden.1", f"0-{BROWSE_UNITS - 1}", docs=training_text("eval"),
                          max_tokens=30_000, progress=True)
    console.print(f"[green]feature browser:[/] {index.resolve()}  (open it, or `actlab serve {out / 'browser'}`)")
    return index


def run_tour(
    out_dir: str | Path = "demo",
    *,
    donor_name: str = "demo-llama",
    recipient_name: str = "demo-gpt2",
    quick: bool = False,
    console: Console | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Run the whole tour and return the path of the combined report."""
    import actlab

    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    say = log or (lambda text: console.rule(f"[bold cyan]{text}"))

    say("1/6  load the bundled demo models")
    donor, recipient = actlab.load(donor_name), actlab.load(recipient_name)
    console.print(f"donor     {donor!r}\nrecipient {recipient!r}")
    say("2/6  profile both models")
    profiles = _profiles((donor, recipient), out, quick, console)
    say(f"3/5  steer {donor.name} toward {GENRE}")
    steer = _steer(donor, quick, console)
    say(f"4/5  paste it into {recipient.name} (Command-V)")
    transfer = _paste(donor, recipient, out, quick, console)
    say(f"5/6  a feature browser for {BROWSE_UNITS} neurons of {donor.name}")
    _browser(donor, out, console)
    say("6/6  write the report")
    return _write(out, donor, recipient, [steer, transfer], profiles, start, console)


def _dose_headline(dose) -> str:
    base = dose.baseline.rate
    best = dose.best("mean-diff")
    return f"genre rate {base:.0%} → {best.rate:.0%} at ×{best.coef:g} (perplexity {dose.baseline.perplexity:.0f} → {best.perplexity:.0f})"
