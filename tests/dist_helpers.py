"""Run a function on N gloo ranks in fresh processes (tests only): ``run_ranks(fn, 2, *args)``.

Each rank gets the torchrun environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
one torch thread, joins the group through ``actlab.dist.init`` and calls ``fn(rank, *args)``. Return values
come back through files the function writes (tests pass a tmp_path); a rank that raises fails the test
with its traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, errors) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    from actlab.dist import init
    try:
        with init("gloo"):
            fn(rank, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        errors.put((rank, traceback.format_exc()))
        raise


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> None:
    """Run ``fn(rank, *args)`` on ``world`` ranks; raise AssertionError with any rank's traceback."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        raise AssertionError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(failures)))
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited abnormally (rank, exit code): {bad}")


def torchrun_cli(args: list[str], cwd, ranks: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node ranks actlab ARGS`` on this venv's console scripts, one thread per rank."""
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(bin_dir / "torchrun"), "--nproc-per-node", str(ranks), "--master-port", str(free_port()),
                           "--no-python", str(bin_dir / "actlab"), *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
