"""Shared by the benchmarks (and importable in the peer venv: no actlab import here).

One model shape for every benchmark, and one way to time variants: round-robin, so load drift on
a shared machine hits them alike, recording wall and process-CPU seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

# a ~12.7M-parameter Llama: the "~10M-parameter model" of the benchmark briefs (weights do not change the cost)
BENCH_LLAMA = dict(vocab_size=8192, hidden_size=320, intermediate_size=864, num_hidden_layers=6,
                   num_attention_heads=5, num_key_value_heads=5, max_position_embeddings=512)


def measure(variants: dict[str, Callable[[], object]], repeats: int, *, warmup: bool = False
            ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU (process) seconds of each variant, interleaved repeat by repeat."""
    if warmup:
        for fn in variants.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return wall, cpu


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def capture_batch(description: str | None = None):
    """The command line capture_overhead.py and peer_capture.py share (the first passes it on to the
    second), parsed with torch threads pinned, and the one token batch both time: ``(args, ids)``."""
    import torch

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, BENCH_LLAMA["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    return args, ids
