"""``actlab probe``: per-site linear probes with honest held-out scores, a causal check and an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from actlab.cli import DeviceOpt, DtypeOpt, ModelArg, app, at_least, console, floats, friendly, load_model, one_of, takes
from actlab.errors import ActlabError

TASK_HELP = ("genre (the five genres, sequence level), number / code / capitalised (token properties of the bundled "
             "eval text), or a labelled .jsonl file (docs/probes.md).")


class ProbeOptions:
    model: str = ModelArg
    task: str = typer.Option("genre", help=TASK_HELP)
    sites: str = typer.Option("resid.*", help="Sites to probe, e.g. 'resid.*', 'mlp.hidden.1-3', comma separated.")
    method: str = typer.Option("logistic", help="logistic, massmean (difference of means) or sparse (k units).")
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: probes/<site>.safetensors, probes.json, "
                             "report.html.")
    pooling: str = typer.Option("mean", help="Sequence labels: mean over the text's tokens, or last.")
    docs: Optional[int] = typer.Option(None, help="Use only this many documents (genre: per genre; default all "
                                       "300 per genre, 200 documents for token properties).")
    ks: str = typer.Option("1,2,4,8,16,32,64", help="Sparse probes: the k values.")
    store: Optional[Path] = typer.Option(None, help="Read activations from a store recorded (positions 'all') on "
                                         "exactly these labelled texts, instead of running the model.")
    causal: bool = typer.Option(True, help="Run the causal check (steer along the probe vs a random direction).")
    causal_scales: str = typer.Option("0.5,1", help="Causal check strengths, × the site's mean activation norm.")
    causal_prompts: int = typer.Option(48, help="Causal check: prompts (or held-out texts for the read-out).")
    causal_class: Optional[str] = typer.Option(None, help="Causal check: the class to steer toward "
                                               "(default: every genre, or the first class not named 'other').")
    n_boot: int = typer.Option(200, help="Bootstrap resamples for the intervals.")
    seed: int = typer.Option(0, help="Seed of the document split, the control labels and the causal check.")
    device: str = DeviceOpt
    dtype: str = DtypeOpt


@app.command("probe")
@friendly
@takes(ProbeOptions)
def probe(o: ProbeOptions):
    """Fit a probe per site on labelled data; report held-out accuracy / AUC with intervals, the majority
    baseline, control-task selectivity and a causal check; write probe files, a JSON table and an HTML report."""
    from actlab.io.outputs import check_output_dir
    from actlab.probes.causal import CausalConfig
    from actlab.probes.pipeline import REPORT_FILE, RESULTS_FILE, labelled_data, probe_model
    from actlab.probes.sweep import ProbeConfig

    one_of(o.method, ("logistic", "massmean", "sparse"), "--method")
    one_of(o.pooling, ("mean", "last"), "--pooling")
    for value, option in ((o.docs, "--docs"), (o.causal_prompts, "--causal-prompts"), (o.n_boot, "--n-boot")):
        at_least(value, 1, option)
    try:
        ks = tuple(int(k) for k in o.ks.split(",") if k.strip())
    except ValueError:
        raise ActlabError(f"--ks expects whole numbers separated by commas, e.g. 1,2,4; not {o.ks!r}") from None
    config = ProbeConfig(method=o.method, pooling=o.pooling, ks=ks, n_boot=o.n_boot, seed=o.seed)
    causal = CausalConfig(scales=tuple(floats(o.causal_scales, "--causal-scales", "0.5,1")),
                          n_prompts=o.causal_prompts, seed=o.seed) if o.causal else False
    data = labelled_data(o.task, o.docs)  # bad labels fail here, before the model loads
    check_output_dir(o.out, RESULTS_FILE, what="probe results")
    m = load_model(o.model, o.device, o.dtype)
    store = None
    if o.store is not None:
        from actlab.store import Store

        store = Store(o.store)
    record = probe_model(m, data, m.resolve(o.sites.split(",")), o.out, config, store=store,
                         causal=causal, causal_class=o.causal_class, progress=True)
    _print(record)
    console.print(f"[green]wrote[/] {escape(str(o.out / RESULTS_FILE))}, {escape(str(o.out / REPORT_FILE))} and "
                  f"{len({r['site'] for r in record['rows']})} probe file(s) in {escape(str(o.out / 'probes'))}")


def _print(record: dict) -> None:
    table = Table(title=f"{escape(record['task'])}: {record['config']['method']} probes, held-out test documents")
    for col in ("site", "k", "test acc", "95% CI", "AUC", "majority", "selectivity"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for r in record["rows"]:
        sel = r.get("selectivity")
        table.add_row(r["site"], "" if r["k"] is None else str(r["k"]), f"{r['accuracy']:.3f}",
                      f"{r['accuracy_ci'][0]:.3f}–{r['accuracy_ci'][1]:.3f}", f"{r['auc']:.3f}", f"{r['majority']:.3f}",
                      "" if sel is None else f"{sel:.3f}")
    console.print(table)
    causal = record.get("causal") or {}
    if "skipped" in causal:
        console.print(f"causal check skipped: {causal['skipped']}")
    for row in causal.get("steered", []):
        value = (lambda v: v["rate"] if isinstance(v, dict) else v)  # noqa: E731
        console.print(f"causal {causal['site']} → {row.get('class', causal.get('class'))} at scale {row['scale']}: "
                      f"probe direction {value(row['probe']):.3f}, random direction {value(row['random']):.3f}")
