"""``actlab browse`` (build a feature browser: a static site of what makes units fire) and ``actlab serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from actlab.cli import (
    DeviceOpt, DtypeOpt, ModelArg, app, at_least, console, friendly, load_model, load_sae_arg, takes, text_documents,
)
from actlab.errors import ActlabError


class BrowseOptions:
    model: str = ModelArg
    site: Optional[str] = typer.Option(None, help="The site whose units to browse, e.g. mlp.hidden.2 (MLP neurons); "
                                       "with --sae, the site the SAE reads (default: the one its file records).")
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (a new one, or a browser built before: replaced).")
    units: Optional[str] = typer.Option(None, help="Units to include, e.g. 0-63 or 3,7,10-12 (default: all).")
    sae: Optional[Path] = typer.Option(None, help="Browse this SAE's latents (our .safetensors or its folder, SAELens, sparsify).")
    data: Optional[Path] = typer.Option(None, help="Text to read: .txt / .jsonl (default: the bundled training text).")
    max_tokens: Optional[int] = typer.Option(200_000, help="Tokens to read (the bundled text has ~2.1M).")
    top_k: int = typer.Option(20, help="Top-activating contexts kept per unit.")
    samples: int = typer.Option(5, help="Samples kept per activation interval.")
    batch_size: int = typer.Option(16, help="Documents per forward pass.")
    device: str = DeviceOpt
    dtype: str = DtypeOpt


def _sae(path: Path):
    return load_sae_arg(path)


def _texts(data: Optional[Path]):
    return text_documents(data, "the browser")


@app.command("browse")
@friendly
@takes(BrowseOptions)
def browse(o: BrowseOptions):
    """Build a feature browser: per unit, top contexts, interval samples, histogram, density, logit effects."""
    from actlab.browse import build_browser
    from actlab.browse.site import MARKER
    from actlab.io import check_output_dir

    for value, option in ((o.max_tokens, "--max-tokens"), (o.top_k, "--top-k"), (o.samples, "--samples"),
                          (o.batch_size, "--batch-size")):
        at_least(value, 1, option)
    check_output_dir(o.out, (MARKER,), what="feature browser")
    sae, info = _sae(o.sae) if o.sae is not None else (None, {})
    site = o.site or info.get("site") or info.get("hook_name")
    if not site:
        raise ActlabError("give --site, e.g. --site mlp.hidden.2" + (f" ({o.sae} does not record its site)" if sae else ""))
    docs = _texts(o.data)
    m = load_model(o.model, o.device, o.dtype)
    index = build_browser(m, o.out, site, o.units, sae=sae, sae_info=info, docs=docs, max_tokens=o.max_tokens,
                          progress=True, top_k=o.top_k, samples=o.samples, batch_size=o.batch_size)
    console.print(f"[green]browser:[/] {escape(str(index.resolve()))}  (open it, or `actlab serve {escape(str(o.out))}`)")


@app.command("serve")
@friendly
def serve(
    folder: Path = typer.Argument(..., help="A folder `actlab browse` wrote."),
    port: int = typer.Option(8000, help="Port on localhost (0: any free port)."),
):
    """Serve a feature browser on localhost (the pages also open straight from disk)."""
    from actlab.browse.serve import serve as run_server

    run_server(folder, port, announce=lambda text: console.print(escape(text)))
