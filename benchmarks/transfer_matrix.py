"""The Command-V matrix of issue #12: genres × directions × kinds × seeds, over worker processes.

Each cell is one ``evaluate_transfer`` run (one thread per worker), written to ``OUT/{cell}.json``; a
cell already there is skipped, so the matrix resumes after an interruption. At the end the pooled
table (``actlab.experiments.transfer_matrix``) is printed and written to ``OUT/table.md``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/transfer_matrix.py --split eval --workers 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/transfer_matrix.py --split tune --seeds 0 --kinds vector
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="eval", choices=("tune", "eval"))
    p.add_argument("--genres", default="scripture,fortunes,jargon,techdoc,dictionary")
    p.add_argument("--kinds", default="vector,adapter")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--directions", default="l2g,g2l",
                   help="l2g (demo-llama → demo-gpt2), g2l (back), l2rot (→ demo-llama in a rotated basis), "
                        "l2ft (→ demo-llama fine-tuned briefly on fortunes): the last two have known answers")
    p.add_argument("--out", type=Path, default=None, help="default: runs/transfer_matrix/SPLIT")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--override", default="{}", help="JSON of TransferEvalConfig overrides (for variants)")
    return p.parse_args(argv)


def _cells(a):
    from actlab.experiments.transfer_matrix import DIRECTIONS, matrix_cells

    dirs = {"l2g": DIRECTIONS[0], "g2l": DIRECTIONS[1], "l2rot": ("demo-llama", "demo-llama-rotated"),
            "l2ft": ("demo-llama", "demo-llama-ft")}
    return matrix_cells(a.genres.split(","), a.kinds.split(","), [int(s) for s in a.seeds.split(",")],
                        [dirs[d] for d in a.directions.split(",")], a.split)


def _model(name: str, models: dict):
    """A demo model by name, or a known-answer recipient built from demo-llama (``experiments.known_pairs``)."""
    import actlab
    from actlab.experiments.known_pairs import known_pair

    known = {"demo-llama-rotated": "rotated", "demo-llama-ft": "finetuned"}
    if name not in known:
        return actlab.load(name)
    donor = models.get("demo-llama") or actlab.load("demo-llama")
    model = known_pair(known[name], donor)
    model.name = name
    return model


def _work(a) -> None:
    import torch

    import actlab
    from actlab.experiments.transfer_matrix import run_cell

    torch.set_num_threads(1)
    models = {}
    for i, cell in enumerate(_cells(a)):
        if i % a.workers != a.worker or (a.out / f"{cell.name}.json").is_file():
            continue
        for name in (cell.donor, cell.recipient):
            if name not in models:
                models[name] = _model(name, models)
        start = time.perf_counter()
        run_cell(cell, models, a.out, cache_dir=".actlab-cache", **json.loads(a.override))
        print(f"[worker {a.worker}] {cell.name}: {time.perf_counter() - start:.0f} s", flush=True)


def main(argv=None) -> None:
    a = _args(argv)
    a.out = a.out or Path("runs/transfer_matrix") / a.split
    if a.worker is not None:
        return _work(a)
    a.out.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, __file__] + (argv if argv is not None else sys.argv[1:])
    procs = [subprocess.Popen(base + ["--out", str(a.out), "--worker", str(w)], env=os.environ | {"OMP_NUM_THREADS": "1"})
             for w in range(a.workers)]
    if any(p.wait() for p in procs):
        sys.exit("a worker failed; rerun the same command to resume")
    from actlab.experiments.transfer_matrix import load_results, markdown_table, summarise

    names = {c.name for c in _cells(a)}
    table = markdown_table(summarise([r for r in load_results(a.out) if r["cell"]["name"] in names]))
    (a.out / "table.md").write_text(table + "\n", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
