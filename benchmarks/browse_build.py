"""Feature-browser build time (issue #14): 2,048 SAE latents of demo-llama resid.2 over 1M tokens of the bundled
training text, against a plain forward pass (the whole model, no hooks) over the same tokens, in the same run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/browse_build.py [--tokens 1000000] [--sae FILE] [--threads 1]

One run of each (the build takes minutes; a median of several would take most of an hour): the ratio is the
number to compare across machines, the build's wall time the one the issue bounds (< 10 minutes). Without
--sae (or where the file is missing) a random TopK SAE (2,048 latents, k = 32) of the same shape stands in:
the cost depends on the shape and the firing rate, which TopK fixes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_SAE = Path("/tmp/runs/sae_full/sae.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--sae", type=Path, default=DEFAULT_SAE)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import actlab
    from actlab.browse import build_browser
    from actlab.datasets import training_text
    from actlab.io import budget
    from actlab.sae import SparseAutoencoder

    model = actlab.load("demo-llama")
    if args.sae.exists():
        from actlab.sae.interop import load_external

        sae, info = load_external(args.sae)
        site, which = info["site"], str(args.sae)
    else:
        sae, site, which = SparseAutoencoder(model.sites["resid.2"], 2048, "topk", 32), "resid.2", "random TopK k=32"
    docs = budget(training_text("train"), model.tokenizer, args.tokens)

    class Null:
        def consume(self, batch) -> None:
            pass

    start = time.perf_counter()
    plain = model.run(docs, [site], [Null()], batch_size=16, stop_early=False, progress=True, description="plain forward")
    plain_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build_browser(model, Path(tmp) / "browser", site, None, sae=sae, docs=docs, progress=True)
        build_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (Path(tmp) / "browser").rglob("*") if p.is_file())
        meta = json.loads((Path(tmp) / "browser" / "data" / "meta.json").read_text())
    print(json.dumps({"tokens": plain.n_tokens, "units": sae.n_latents, "sae": which, "threads": args.threads,
                      "plain_forward_s": round(plain_s, 1), "build_s": round(build_s, 1),
                      "pass_s": meta["seconds_pass"], "ratio": round(build_s / plain_s, 2),
                      "site_mb": round(size / 2**20, 1)}, indent=1))


if __name__ == "__main__":
    main()
