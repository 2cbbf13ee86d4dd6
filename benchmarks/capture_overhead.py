"""Capture / record / stats overhead against a plain forward pass, same model, same batch.

    .venv/bin/python benchmarks/capture_overhead.py [--threads 1] [--repeats 7]

A ~10M-parameter Llama-shaped model with random weights (weights do not change the cost),
batch 8 x 256 tokens, CPU, threads pinned. Each variant's time is the median of the repeats;
ratios are against the plain forward measured in the same run. If a separate benchmark venv
(.bench-venv, see docs/benchmarks.md) has nnsight or TransformerLens, their capture of the same
sites is timed there by benchmarks/peer_capture.py and printed beside ours.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers as T

import actlab
from actlab.stats import StatsSink
from actlab.store import record
from timing import BENCH_LLAMA, capture_batch, measure, medians

ROOT = Path(__file__).resolve().parents[1]
RUN_SHARDS = 4  # a recording of several shards, as real ones are: the write of one overlaps the next forward
RUN_BASE, RUN_STORE = f"no-head forward x{RUN_SHARDS}", f"record resid.* to store, {RUN_SHARDS} one-batch shards"


def bench_model(seed: int = 0) -> actlab.Model:
    torch.manual_seed(seed)
    hf = T.LlamaForCausalLM(T.LlamaConfig(**BENCH_LLAMA)).eval()
    return actlab.load(hf, tokenizer=None)


def store_breakdown(store, repeats: int, no_head_cpu: float) -> None:
    """Where the store variant's CPU goes: the shard's fill (the model run plus the copies into the shard
    buffer) and the rest (plan, claim, serialise, sha256, fsync, manifest), timed inside one call each."""
    import statistics
    import time

    from actlab.store import shard_writer

    fill, fills, totals = shard_writer.fill_shard, [], []

    def timed_fill(*a, **k):
        start = time.process_time()
        try:
            return fill(*a, **k)
        finally:
            fills.append(time.process_time() - start)

    shard_writer.fill_shard = timed_fill
    try:
        for _ in range(repeats):
            start = time.process_time()
            store()
            totals.append(time.process_time() - start)
    finally:
        shard_writer.fill_shard = fill
    rest = statistics.median(t - f for t, f in zip(totals, fills))
    print(f"record, timed inside (median of {repeats}): fill {statistics.median(fills) * 1e3:.1f} ms CPU, the store's own "
          f"work {rest * 1e3:.1f} ms = {rest / no_head_cpu:.3f} of the no-head forward")


def stats_breakdown(stats, repeats: int, no_head_cpu: float, n_values: int) -> None:
    """Where the stats variant's CPU goes: the sink's ``consume`` (the statistics of every site) and, inside
    it, the compiled statistics pass (``stats.kernel.block_pass``), timed inside one call each; the rest of
    the variant is the model run and the captures."""
    import statistics
    import time

    import actlab.stats.update as update
    from actlab.stats.kernel import kernel_available

    consume, block_pass = StatsSink.consume, update.block_pass
    spent = {"consume": [], "kernel": []}

    def timed(key, fn):
        def run(*a, **k):
            start = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[key][-1] += time.process_time() - start
        return run

    StatsSink.consume, update.block_pass = timed("consume", consume), timed("kernel", block_pass)
    totals = []
    try:
        for _ in range(repeats):
            spent["consume"].append(0.0)
            spent["kernel"].append(0.0)
            start = time.process_time()
            stats()
            totals.append(time.process_time() - start)
    finally:
        StatsSink.consume, update.block_pass = consume, block_pass
    total, inside = statistics.median(totals), statistics.median(spent["consume"])
    kernel = statistics.median(spent["kernel"])
    where = (f"compiled pass {kernel * 1e3:.1f} ms = {kernel * 1e9 / n_values:.2f} ns/value" if kernel_available()
             else "torch path (no compiled pass)")
    print(f"stats, timed inside (median of {repeats}): consume {inside * 1e3:.1f} ms CPU ({where}; "
          f"{n_values / 1e6:.1f}M values), model run + captures {(total - inside) * 1e3:.1f} ms; "
          f"consume = {inside / no_head_cpu:.3f} of the no-head forward")


def main() -> None:
    args, ids = capture_batch(__doc__)

    model = bench_model()
    n_params = sum(p.numel() for p in model.hf.parameters())
    mask = torch.ones_like(ids)
    docs = [row.tolist() for row in ids]  # token-id documents: no tokenizer cost in any variant
    sites = model.resolve("resid.*")
    stats_sites = model.resolve("resid.*,mlp.hidden.*")
    inputs = model.forward_inputs(ids, mask)

    def plain():
        with torch.no_grad():
            model.hf(**inputs)

    def plain_no_head():
        with torch.no_grad():
            model.hf.model(**inputs)

    def capture():
        with model.capture(sites):
            plain()

    def runner_capture():
        model.collect(docs, sites, positions="all", batch_size=args.batch)

    def stats():
        sink = StatsSink({s: model.sites[s] for s in stats_sites})
        model.run(docs, stats_sites, sink, batch_size=args.batch)

    scratch = tempfile.TemporaryDirectory()  # removed at the end, not inside the timed calls
    stores = itertools.count()

    def fresh_dir() -> Path:
        return Path(scratch.name) / f"store{next(stores)}"

    def store():
        record(model, docs, sites, fresh_dir(), batch_size=args.batch)

    def no_head_run():  # the baseline of a recording of several shards
        for _ in range(RUN_SHARDS):
            plain_no_head()

    def store_run():  # one batch a shard: each shard's write overlaps the next shard's forward
        record(model, docs * RUN_SHARDS, sites, fresh_dir(), batch_size=args.batch, shard_tokens=int(ids.numel()))

    print(f"model: Llama-shaped, {n_params / 1e6:.1f}M parameters, {len(sites)} resid sites; "
          f"batch {args.batch} x {args.seq} tokens; threads={args.threads}; median of {args.repeats}")
    wall, cpu = measure({
        "plain forward": plain, "plain forward, no LM head": plain_no_head,
        "capture resid.* (model.capture)": capture, "capture resid.* (runner, flat)": runner_capture,
        "record resid.* to store": store, "stats resid.* + mlp.hidden.*": stats,
        RUN_BASE: no_head_run, RUN_STORE: store_run,
    }, args.repeats, warmup=True)
    wall, cpu = medians(wall), medians(cpu)
    run_rows = {name: (wall.pop(name), cpu.pop(name)) for name in (RUN_BASE, RUN_STORE)}
    rows = [(name, (wall[name], cpu[name])) for name in wall]
    (base_w, base_c), (_, head_c) = rows[0][1], rows[1][1]
    print(f"{'variant':36s} {'wall ms':>8s} {'CPU ms':>8s} {'CPU vs plain':>13s} {'CPU vs no-head':>15s} {'wall vs plain':>14s}")
    for name, (wall, cpu) in rows:
        print(f"{name:36s} {wall * 1e3:8.1f} {cpu * 1e3:8.1f} {cpu / base_c:12.3f}x {cpu / head_c:14.3f}x "
              f"{wall / base_w:13.3f}x")
    print("(runner variants stop after the last requested site, so they skip the LM head: compare them with the "
          "no-head baseline too)")

    (bw, bc), (sw, sc) = run_rows[RUN_BASE], run_rows[RUN_STORE]
    print(f"{RUN_STORE}: wall {sw * 1e3:.1f} ms = {sw / bw:.3f}x, CPU {sc * 1e3:.1f} ms = {sc / bc:.3f}x "
          f"{RUN_SHARDS} no-head forwards ({bw * 1e3:.1f} ms wall, {bc * 1e3:.1f} ms CPU; the writes run in a "
          "second thread, so CPU counts both threads)")
    store_breakdown(store, args.repeats, head_c)
    scratch.cleanup()
    stats_breakdown(stats, args.repeats, head_c, len(ids.reshape(-1)) * sum(model.sites[s] for s in stats_sites))

    peer_python = ROOT / ".bench-venv" / "bin" / "python"
    if peer_python.exists():
        subprocess.run([str(peer_python), str(ROOT / "benchmarks" / "peer_capture.py"), "--threads",
                        str(args.threads), "--repeats", str(args.repeats), "--batch", str(args.batch),
                        "--seq", str(args.seq)], check=False)
    else:
        print("(no .bench-venv: peer libraries not measured; see docs/benchmarks.md)")


if __name__ == "__main__":
    sys.exit(main())
