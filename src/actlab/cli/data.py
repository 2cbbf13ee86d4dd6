"""``actlab record`` / ``stats`` / ``store``: activations to disk, streaming statistics, store checks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from actlab.cli import (
    SITES_HELP, BatchOpt, DataOpt, DeviceOpt, DtypeOpt, MaxTokensOpt, ModelArg, app, at_least, console, documents,
    err_console, friendly, load_model, store_app,
)
from actlab.errors import ActlabError


def _positions(value: str):
    if value in ("all", "last"):
        return value
    try:
        lo, hi = value.split(":")
        return (int(lo) if lo else None, int(hi) if hi else None)
    except ValueError:
        raise ActlabError(f"--positions must be 'all', 'last' or a span 'start:stop' (e.g. 0:32), not {value!r}") from None


@app.command()
@friendly
def record(
    model: str = ModelArg,
    out: str = typer.Option(..., "--out", "-o", help="Store directory or fsspec URL such as s3://bucket/acts "
                            "(created; resumed if it holds a partial run)."),
    data: Optional[Path] = DataOpt,
    sites: str = typer.Option("resid.*", help=SITES_HELP),
    positions: str = typer.Option("all", help="Tokens to record: all, last, or a span start:stop."),
    max_tokens: Optional[int] = MaxTokensOpt,
    batch_size: int = BatchOpt,
    shard_tokens: Optional[int] = typer.Option(None, help="Tokens per shard file, the unit of resume (default: ~256 MiB shards)."),
    store_dtype: Optional[str] = typer.Option(None, "--store-dtype", help="Dtype on disk (default: the model's)."),
    overwrite: bool = typer.Option(False, help="Replace an existing store made with other settings."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Record activations into a sharded, checksummed, resumable on-disk store.

    Under ``torchrun --nproc-per-node N -m actlab record ...`` every rank records its share of the shards
    (on cuda:LOCAL_RANK when --device is cuda) and rank 0 finalises the store."""
    from actlab.dist import init
    from actlab.dist.placement import rank_device
    from actlab.io import check_output_dir
    from actlab.store import record as record_store
    from actlab.store.remote import is_url

    where = _positions(positions)
    for value, option in ((batch_size, "--batch-size"), (shard_tokens, "--shard-tokens"), (max_tokens, "--max-tokens")):
        at_least(value, 1, option)
    if not is_url(out):
        check_output_dir(out, what="activation store")  # what the folder holds is checked by the store itself
    with init() as rank:
        m = load_model(model, rank_device(device, rank), dtype)
        docs = documents(data, m, max_tokens)
        store = record_store(m, docs, sites, out, positions=where, batch_size=batch_size, shard_tokens=shard_tokens,
                             dtype=store_dtype, overwrite=overwrite, progress=rank.is_main,
                             distributed=rank.world_size > 1)
    if rank.is_main:
        info = store.info()
        ranks = f" by {rank.world_size} ranks" if rank.world_size > 1 else ""
        console.print(f"[green]stored[/] {info['n_tokens']:,} tokens × {len(info['sites'])} sites in {escape(out)}{ranks}")


@app.command()
@friendly
def stats(
    model: str = ModelArg,
    data: Optional[Path] = DataOpt,
    sites: str = typer.Option("resid.*,mlp.hidden.*", help=SITES_HELP),
    out: Path = typer.Option(Path("stats.safetensors"), "--out", "-o", help="Output file (safetensors + JSON header)."),
    max_tokens: Optional[int] = MaxTokensOpt,
    batch_size: int = BatchOpt,
    eps: float = typer.Option(1e-3, help="|x| below eps counts as (near) zero."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Streaming per-channel statistics (mean, variance, extrema, sparsity, histogram, top-k) of sites.

    Under torchrun (`torchrun --nproc-per-node N -m actlab stats ...`) each rank reduces its share of the
    batches, the statistics are combined across ranks and rank 0 writes the file."""
    import time

    from actlab.dist import init
    from actlab.dist.placement import rank_device
    from actlab.io import check_output_file
    from actlab.stats.collect import collect_stats

    at_least(batch_size, 1, "--batch-size")
    at_least(max_tokens, 1, "--max-tokens")
    at_least(eps, 0, "--eps")
    check_output_file(out)
    with init() as rank:
        m = load_model(model, rank_device(device, rank), dtype)
        docs = documents(data, m, max_tokens)
        began = time.perf_counter()
        sink, tokens = collect_stats(m, docs, sites, batch_size=batch_size, distributed=True,
                                     progress=rank.is_main, eps=eps)
        if not rank.is_main:
            return
        sink.save(out, metadata=m.identity())
    ranks = f" on {rank.world_size} ranks" if rank.world_size > 1 else ""
    table = Table(title=f"{tokens:,} tokens{ranks}, {tokens / (time.perf_counter() - began):,.0f} tok/s")
    rows = sink.summary()
    columns = list(next(iter(rows.values())).keys())
    table.add_column("site")
    for c in columns:
        table.add_column(c, justify="right")
    for site, values in rows.items():
        table.add_row(site, *[f"{v:.4g}" if isinstance(v, float) else str(v) for v in values.values()])
    console.print(table)
    console.print(f"[green]wrote[/] {escape(str(out))}")


@store_app.command("info")
@friendly
def store_info(path: str = typer.Argument(..., help="Store directory or fsspec URL.")):
    """Summarise a store: model, sites, tokens, shards."""
    from actlab.store import Store

    info = Store(path).info()
    table = Table(show_header=False)
    for key, value in info.items():
        table.add_row(escape(str(key)), escape(str(value)))
    console.print(table)


@store_app.command("verify")
@friendly
def store_verify(
    path: str = typer.Argument(..., help="Store directory or fsspec URL."),
    repair: bool = typer.Option(False, "--repair", help="Remove the damaged shards (file and manifest entry), so "
                                "that rerunning the same `actlab record` command re-records just those."),
):
    """Check every shard against the manifest's checksums; exit 1 if anything is wrong."""
    from actlab.store import Store, repair_store
    from actlab.store.verify import INCOMPLETE

    if repair:
        removed = repair_store(path)
        for line in removed:
            console.print(f"[yellow]repaired:[/] {escape(line)}")
        if removed:
            console.print(f"damaged shards removed: rerun the same `actlab record ... --out {escape(str(path))}` "
                          "command to re-record just those")
        else:
            console.print(f"[green]✓[/] {escape(str(path))}: nothing to repair")
        return
    problems = Store(path).verify()
    if problems:
        for problem in problems:
            err_console.print(f"[red]✗[/] {escape(problem)}")
        if any(not p.startswith(INCOMPLETE) for p in problems):
            err_console.print(f"to fix it: `actlab store verify --repair {escape(str(path))}` removes the damaged shards, "
                              "then rerun the same `actlab record` command to re-record just those")
        raise typer.Exit(1)
    console.print(f"[green]✓[/] {escape(str(path))}: every shard matches its checksum")
