"""End-to-end greedy decode at batch 1 (issue #16): a random-weight ~210M-parameter Llama (12 layers, d_model 1024,
MLP 4096), its MLPs, and its attention projections too, through the sparse kernel (TEAL thresholds at 50 %,
calibrated on the bundled text) against the plain dense model, in the same run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sparse_decode.py [--sparsity 0.5] [--tokens 32] [--repeats 3]

One measurement is ``model.generate`` of ``--tokens`` new tokens from an 8-token prompt (the prefill is included; it
takes dense torch with the same zeros); variants are interleaved (benchmarks/timing.measure), one thread for torch
and the kernel, no download (the config is built here, demo-llama's tokenizer gives the text its ids). Variants:
dense; "mlp" (the MLP's two inputs sparse, attention dense: 3/4 of a block's weights half read); "mlp+attn" (the
q/k/v and o-projection inputs too: every block weight half read). The LM head and the embeddings stay dense.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import measure, medians  # noqa: E402


def build(tokenizer):
    import transformers as T

    import actlab

    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                           num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(config).eval()
    return actlab.load(hf, tokenizer=tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--method", default="teal")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calibration-tokens", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import actlab
    from actlab.sparse.kernel import kernel_available
    from actlab.sparse.mlp import measured_sparsity, splice
    from actlab.sparse.thresholds import calibrate

    if not kernel_available():
        raise SystemExit("the compiled kernel is unavailable: this benchmark would time the dense fallback")
    model = build(actlab.load("demo-llama").tokenizer)
    n_params = sum(p.numel() for p in model.hf.parameters())
    start = time.perf_counter()
    full = calibrate(model, args.method, args.sparsity, tokens=args.calibration_tokens)
    calib_s = time.perf_counter() - start
    mlp_only = type(full)(full.method, full.sparsity, {k: v for k, v in full.tensors.items() if k.startswith("mlp.")},
                          full.model, full.rule, full.info)
    splices = {}
    for name, thresholds in (("mlp", mlp_only), ("mlp+attn", full)):
        splices[name] = splice(model, thresholds).input_major()  # the weight copies made once, here
        splices[name].remove()  # put in place for each sparse run
    prompt = "The history of the city begins with"

    def dense():
        return model.generate(prompt, max_new_tokens=args.tokens, return_ids=True)

    def sparse(name):
        def run():
            with splices[name].install():
                return model.generate(prompt, max_new_tokens=args.tokens, return_ids=True)
        return run

    load0 = os.getloadavg()[0]
    variants = {"dense": dense, **{name: sparse(name) for name in splices}}
    wall, cpu = measure(variants, args.repeats, warmup=True)
    w, c = medians(wall), medians(cpu)
    ran = measured_sparsity(splices["mlp+attn"])
    print(f"model: {n_params / 1e6:.0f}M parameters; {args.method} at {args.sparsity:.0%} (calibrated on "
          f"{args.calibration_tokens} tokens in {calib_s:.0f} s); load average {load0:.2f} -> "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; medians of {args.repeats}")
    mean = {kind: sum(v for k, v in ran.items() if k.rsplit(".", 1)[0] == kind) / model.n_layers
            for kind in ("mlp.in", "mlp.hidden", "attn.in", "attn.o")}
    print("measured sparsity (mlp+attn, mean over layers and decode runs): "
          + ", ".join(f"{k} {v:.1%}" for k, v in mean.items()))
    print("| variant | tokens/s (wall) | tokens/CPU-s | speed-up (wall) | speed-up (CPU) |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        print(f"| {name} | {args.tokens / w[name]:.2f} | {args.tokens / c[name]:.2f} | "
              f"{w['dense'] / w[name]:.2f}× | {c['dense'] / c[name]:.2f}× |")


if __name__ == "__main__":
    main()
