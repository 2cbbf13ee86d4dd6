"""The same capture (every block's residual output) done with nnsight and TransformerLens.

Run by benchmarks/capture_overhead.py inside the separate benchmark venv (.bench-venv), never
in the project venv: peers pin their own transformers versions. Same model shape and batch as
capture_overhead.py; each peer's ratio is against a plain forward timed in the same process.
"""

from __future__ import annotations

import torch

from timing import BENCH_LLAMA, capture_batch, measure, medians


def hf_llama():
    import transformers as T

    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**BENCH_LLAMA)).eval()


def bench_nnsight(ids, repeats):
    from nnsight import NNsight

    hf = hf_llama()
    wrapped = NNsight(hf)

    def plain():
        with torch.no_grad():
            hf(input_ids=ids, use_cache=False)

    def capture():
        saved = []
        with torch.no_grad(), wrapped.trace(input_ids=ids, use_cache=False):
            for layer in wrapped.model.layers:
                saved.append(layer.output.save())
        return saved

    cpu = medians(measure({"plain": plain, "capture": capture}, repeats, warmup=True)[1])
    return cpu["plain"], cpu["capture"]


def bench_transformer_lens(ids, repeats):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(d_model=320, d_head=64, n_heads=5, n_layers=6, d_mlp=864, d_vocab=8192, n_ctx=512,
                                  act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                                  gated_mlp=True, seed=0)
    model = HookedTransformer(cfg).eval()

    def plain():
        with torch.no_grad():
            model(ids)

    def capture():
        with torch.no_grad():
            model.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_resid_post"))

    cpu = medians(measure({"plain": plain, "capture": capture}, repeats, warmup=True)[1])
    return cpu["plain"], cpu["capture"]


def main() -> None:
    args, ids = capture_batch()
    for name, bench in [("nnsight", bench_nnsight), ("TransformerLens", bench_transformer_lens)]:
        try:
            base, cap = bench(ids, args.repeats)
        except Exception as exc:  # a peer that does not install or run here is reported, not fatal
            print(f"{name:40s} not measured: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            continue
        print(f"{name + ' capture resid.*':36s} CPU {cap * 1e3:8.1f} ms, {cap / base:6.3f}x its own plain forward "
              f"({base * 1e3:.1f} ms CPU)")


if __name__ == "__main__":
    main()
