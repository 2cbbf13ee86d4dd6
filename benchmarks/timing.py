"""Shared by the benchmarks (and importable in the peer venv: no actlab import here).

One model shape for every benchmark, and one way to time variants: round-robin, so load drift on
a shared machine hits them alike, recording wall and process-CPU seconds.
"""

from __future__ import annotations

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
