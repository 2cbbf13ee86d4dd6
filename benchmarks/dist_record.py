"""Recording throughput with 1 and N ranks (gloo, CPU), tokens per second and the ratio against 1 rank.

    .venv/bin/python benchmarks/dist_record.py [--ranks 2] [--docs 64] [--seq 256] [--shard-tokens 2048] [--repeats 3]

The benchmark model of capture_overhead.py (12.7M-parameter Llama, random weights), ``resid.*`` recorded to
a local store, one torch thread per rank. Each rank times ``record(..., distributed=True)`` from after its
model is built to its return (claim, its share of the shards, the barriers, the finalise); the run's time is
the slowest rank's, so process start-up and imports are left out (they are printed apart). Runs alternate
1 rank / N ranks, median of the repeats. On this 2-core machine shared with other work, N=2 can at best
double the throughput; the stores of both are checked byte-identical.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _rank(rank: int, world: int, port: int, args, out: str, results) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from actlab.dist import init
    from actlab.store import record
    from capture_overhead import bench_model
    from timing import BENCH_LLAMA

    with init("gloo"):
        model = bench_model()
        gen = torch.Generator().manual_seed(1)
        docs = torch.randint(0, BENCH_LLAMA["vocab_size"], (args.docs, args.seq), generator=gen).tolist()
        sites = model.resolve("resid.*")
        start = time.perf_counter()
        store = record(model, docs, sites, out, batch_size=8, shard_tokens=args.shard_tokens, distributed=True)
        results.put((rank, time.perf_counter() - start, store.n_tokens))


def run(world: int, args, out: str) -> tuple[float, int, float]:
    """(seconds of the slowest rank, tokens, wall seconds including process start-up)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    wall = time.perf_counter()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, out, results)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall = time.perf_counter() - wall
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    got = [results.get() for _ in range(world)]
    return max(t for _, t, _ in got), got[0][2], wall


def same_store(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names if n != "manifest.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--shard-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times: dict[int, list[float]] = {1: [], args.ranks: []}
    walls: dict[int, list[float]] = {1: [], args.ranks: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for world in times:
                out = Path(tmp) / f"w{world}-{i}"
                seconds, n_tokens, wall = run(world, args, str(out))
                times[world].append(seconds)
                walls[world].append(wall)
        identical = same_store(Path(tmp) / "w1-0", Path(tmp) / f"w{args.ranks}-0")
    base = n_tokens / statistics.median(times[1])
    print(f"{n_tokens:,} tokens ({args.docs} docs x {args.seq}), resid.* of the 12.7M Llama, shards of "
          f"{args.shard_tokens} tokens, 1 thread per rank, median of {args.repeats}; os.cpu_count()={os.cpu_count()}")
    print(f"{'ranks':>5s} {'record s':>9s} {'tokens/s':>9s} {'vs 1 rank':>10s} {'with start-up s':>16s}")
    for world, t in times.items():
        rate = n_tokens / statistics.median(t)
        print(f"{world:5d} {statistics.median(t):9.2f} {rate:9.0f} {rate / base:9.2f}x {statistics.median(walls[world]):16.1f}")
    print(f"stores byte-identical (shards): {identical}")


if __name__ == "__main__":
    main()
