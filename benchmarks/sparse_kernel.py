"""The activation-sparse kernel (issue #16) against dense torch matrix-vector products on the same matrix, same run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sparse_kernel.py [--threads 1] [--repeats 15] [--hot] [--down]

For each shape (d_model × d_mlp: 1024×4096, 2048×8192, 4096×11008; by default ``in`` = d_model, an up projection) and
sparsity (0 / 50 / 75 / 90 %: the fraction of input channels below the threshold), one call is one
matrix-vector product of a random fp32 vector: dense ``torch.mv(W, x)`` and ``F.linear(x, W)`` on the
``[out, in]`` weight, and ``sparse_matvec`` (fused threshold + gather + multiply-accumulate) on the
input-major ``[in, out]`` copy. By default every call reads another copy of the matrix from a pool of at
least 512 MB per layout, so the weights come from memory, not from the (260 MB) L3 cache, as in a model
whose weights exceed the cache; ``--hot`` reuses one copy; ``--down`` times the transposed shapes (a down
projection: in = 4096 / 8192 / 11008). Variants are interleaved repeat by repeat
(benchmarks/timing.measure); a repeat is one pass over the pool; the tables give medians of wall and
process-CPU time per product and the ratio dense / sparse (> 1: the kernel is faster).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from timing import measure, medians  # noqa: E402

SHAPES = ((1024, 4096), (2048, 8192), (4096, 11008))  # (in, out) = (d_model, d_mlp) of an up projection
SPARSITIES = (0.0, 0.5, 0.75, 0.9)


def run_shape(n_in: int, n_out: int, args) -> list[str]:
    from actlab.sparse.kernel import input_major, sparse_matvec

    copies = 1 if args.hot else max(2, -(-512 * 2**20 // (n_in * n_out * 4)))
    gen = torch.Generator().manual_seed(0)
    dense = [torch.randn(n_out, n_in, generator=gen) / n_in**0.5 for _ in range(copies)]
    major = [input_major(w) for w in dense]
    x = torch.randn(1, n_in, generator=gen)
    rows = []
    for sparsity in SPARSITIES:
        level = float(torch.quantile(x.abs(), sparsity)) if sparsity > 0 else 0.0
        thr = torch.full((n_in,), level)
        kept: list[int] = []
        variants = {
            "mv": lambda: [torch.mv(w, x[0]) for w in dense],
            "linear": lambda: [F.linear(x, w) for w in dense],
            "sparse": lambda: [sparse_matvec(x, wt, thr, threads=args.threads) for wt in major],
        }
        wall, cpu = measure(variants, args.repeats, warmup=True)
        w, c = medians(wall), medians(cpu)
        sparse_matvec(x, major[0], thr, count=kept)
        per = {k: v / copies * 1e3 for k, v in w.items()}
        rows.append(f"| {n_out}×{n_in} | {sparsity:.0%} | {1 - kept[0] / n_in:.1%} | {per['mv']:.3f} | "
                    f"{per['linear']:.3f} | {per['sparse']:.3f} | **{w['mv'] / w['sparse']:.2f}×** | "
                    f"{w['linear'] / w['sparse']:.2f}× | {c['mv'] / c['sparse']:.2f}× |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--hot", action="store_true", help="one copy of each matrix (cache-resident)")
    parser.add_argument("--down", action="store_true", help="the transposed shapes (a down projection: in = d_mlp)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from actlab.sparse.kernel import kernel_available

    if not kernel_available():
        raise SystemExit("the compiled kernel is unavailable: this benchmark would time the dense fallback")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; threads {args.threads}; "
          f"{'hot (one copy)' if args.hot else 'cold (>= 512 MB pool per layout)'}; medians of {args.repeats}")
    print("| W [out×in] | target | measured | mv ms | linear ms | sparse ms | vs mv (wall) | vs linear | vs mv (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n_in, n_out in SHAPES:
        run_shape(*((n_out, n_in) if args.down else (n_in, n_out)), args)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
