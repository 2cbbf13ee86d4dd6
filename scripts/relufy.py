"""ReLU-fication of demo-llama (issue #16, ProSparse-style): swap SiLU for ReLU, fine-tune with a progressive L1
penalty on the MLP activations, report sparsity and perplexity before and after, and the quality curve after.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/relufy.py -o runs/relufy [--steps 300] [--resume] [--curve]

One thread. Checkpoints (safetensors + JSON) go to OUT every --checkpoint-every steps; --resume continues an
interrupted run with the same settings. OUT/result.json gets: perplexity of the neutral passages and the share of
exactly-zero MLP hidden neurons for the original model, right after the swap, and after the fine-tune; with
--curve, `actlab sparse eval`'s rows (TEAL and CATS at 25 / 40 / 50 %, genre rate too) on the ReLU-fied model.
Load the result with actlab.sparse.relufy.load_relufied(actlab.load("demo-llama"), "OUT/checkpoint.safetensors").
"""

from __future__ import annotations

import argparse
import time

import torch


def _measure(model, texts) -> dict:
    from actlab.evals.perplexity import perplexity
    from actlab.sparse.relufy import hidden_sparsity

    return {"perplexity": perplexity(model, texts), "hidden_zeros": hidden_sparsity(model, texts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--model", default="demo-llama")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--l1-max", type=float, default=0.5)
    parser.add_argument("--shift", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--curve", action="store_true", help="the perplexity / genre-rate curve after ReLU-fication")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import actlab
    from actlab.files import write_json
    from actlab.sparse.evaluate import evaluate_sparsity, neutral_texts
    from actlab.sparse.relufy import RelufyConfig, relufy, relufy_finetune

    texts = neutral_texts()
    model = actlab.load(args.model)
    result = {"model": args.model, "original": _measure(model, texts)}
    relufy(model, args.shift)
    result["swapped"] = _measure(model, texts)
    print(f"original: {result['original']}\nReLU, not fine-tuned: {result['swapped']}")
    config = RelufyConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                          l1_max=args.l1_max, shift=args.shift, checkpoint_every=args.checkpoint_every)
    start = time.perf_counter()
    history = relufy_finetune(model, args.out, config, resume=args.resume, progress=lambda h: print(
        f"step {h['step']}: loss {h['loss']:.3f}, l1 weight {h['l1_weight']:.3f}, mean |act| {h['penalty']:.4f}")
        if h["step"] % 10 == 0 else None)
    result["finetune_seconds"] = time.perf_counter() - start
    result["config"] = config.__dict__
    result["finetuned"] = _measure(model, texts)
    result["history"] = history
    print(f"ReLU, fine-tuned: {result['finetuned']}")
    if args.curve:
        curve = evaluate_sparsity(model, ("teal", "cats"), (0.25, 0.4, 0.5), calibration_tokens=4096)
        result["curve"] = {"dense_ppl": curve.dense_ppl, "dense_genre_rate": curve.dense_genre, "rows": curve.rows}
        print("\n".join(curve.table()))
    write_json(f"{args.out}/result.json", result)


if __name__ == "__main__":
    main()
