#!/usr/bin/env python3
"""Train actlab's demo language models (demo-gpt2, demo-llama) on the five-genre corpus.

Needs work-data/tokens/ and work-data/tokenizer/ (scripts/build_corpus.py, then
scripts/train_tokenizer.py). For each model:

  runs/<name>/ckpt.safetensors latest checkpoint (model, optimizer, step, elapsed time); written
                              every --ckpt-minutes and at the end, atomically
  runs/<name>/log.jsonl       training loss every --log-every steps, validation loss every --eval-every
  runs/<name>/summary.json    tokens seen, wall-clock training time, final validation loss

and, when the fixed number of steps is done, float16 safetensors weights + tokenizer under
src/actlab/models/zoo/<name>/ (AutoModelForCausalLM / AutoTokenizer load them).

Genre-balanced sampling: each training window is drawn from one genre's own stream (its documents
joined by <|endoftext|>), with the genre chosen uniformly. The corpus is 43% dictionary and 5% jargon,
so proportional sampling left the small genres barely learned; single-genre windows also make the
genre a property of the whole context, which is what steering and transfer act on.

Reproducible: seeds are fixed, dropout is 0, and the batch of step s is drawn from a generator seeded
with (seed, s), so an interrupted run resumed by rerunning the same command follows the same
trajectory. Training uses one thread per model (--threads) so the two models train in parallel.

Examples:
  python scripts/train_demo_models.py demo-gpt2            # train (or resume) and export
  python scripts/train_demo_models.py demo-llama --benchmark 20   # measure tokens/s, write nothing
  python scripts/train_demo_models.py demo-gpt2 --export-only     # export the last checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "src" / "actlab" / "models" / "zoo"

# steps are fixed per model so that reruns are reproducible; sized (measured) so each run takes about
# 35-40 minutes on one thread of the 2-core development machine while the other model trains too.
MODELS = {
    "demo-gpt2": dict(arch="gpt2", steps=1300, batch_size=16, seq_len=256, lr=3e-3, warmup=50,
                      sampling="genre-balanced"),
    "demo-llama": dict(arch="llama", steps=1300, batch_size=16, seq_len=256, lr=3e-3, warmup=50,
                       sampling="genre-balanced"),
}


def make_config(arch: str, vocab_size: int, seq_len: int):
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=seq_len,
            n_embd=192,
            n_layer=6,
            n_head=6,
            n_inner=768,
            activation_function="relu",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=1e-5,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            tie_word_embeddings=True,
        )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_act="silu",
            max_position_embeddings=seq_len,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            attention_dropout=0.0,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            tie_word_embeddings=True,
        )
    raise ValueError(arch)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


def genre_streams(tokdir: Path, split: str, n_genres: int) -> list[np.ndarray]:
    """One token stream per genre: that genre's documents in corpus order, each ending in <|endoftext|>
    (the corpus files give every token, end-of-document included, the genre of its document)."""
    ids = np.fromfile(tokdir / f"{split}.bin", dtype=np.uint16)
    genres = np.fromfile(tokdir / f"{split}.genres.bin", dtype=np.uint8)
    return [ids[genres == g] for g in range(n_genres)]


def get_batch(streams: list[np.ndarray], seed: int, step: int, batch_size: int, seq_len: int):
    """Genre-balanced batch: each row picks a genre uniformly, then a uniform window of that genre."""
    import torch

    rng = np.random.default_rng([seed, step])
    rows = []
    for g in rng.integers(0, len(streams), size=batch_size):
        s = int(rng.integers(0, streams[g].size - seq_len))
        rows.append(streams[g][s : s + seq_len])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def val_batches(streams: list[np.ndarray], n: int, batch_size: int, seq_len: int):
    """Fixed validation windows: the same number from every genre, evenly spaced through its stream."""
    import torch

    per = -(-n * batch_size // len(streams))
    rows = [st[s : s + seq_len] for st in streams
            for s in np.linspace(0, st.size - seq_len - 1, per).astype(np.int64)]
    x = np.stack(rows[: n * batch_size]).astype(np.int64)
    return [torch.from_numpy(x[i * batch_size : (i + 1) * batch_size]) for i in range(n)]


def save_checkpoint(path: Path, model, opt, meta: dict) -> None:
    """Model + optimizer state as safetensors (no pickle), the rest as JSON metadata; atomic."""
    from safetensors.torch import save_file

    tensors = {f"model/{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"opt/{idx}/{key}"] = value.detach().clone().contiguous().reshape(value.shape)
    header = dict(meta, param_groups=opt_state["param_groups"])
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"checkpoint": json.dumps(header)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, opt) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["checkpoint"])
    tensors = load_file(str(path))
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": header.pop("param_groups")})
    return header


def export(model, tokenizer_dir: Path, out: Path, summary: dict) -> None:
    """Write float16 safetensors weights, config and tokenizer files to the zoo directory."""
    import copy

    import torch
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    m16 = copy.deepcopy(model).to(torch.float16)
    m16.config.dtype = "float16"
    m16.save_pretrained(out, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(out)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; the zoo files ship in the package
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"[export] {out} ({size / 1e6:.1f} MB)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("Examples:")[1] and "Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", choices=sorted(MODELS), help="which demo model to train")
    p.add_argument("--steps", type=int, help="override the fixed number of optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--ckpt-minutes", type=float, default=3.0, help="checkpoint interval (default 3)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=5)
    p.add_argument("--data", type=Path, default=REPO / "work-data")
    p.add_argument("--runs", type=Path, default=REPO / "runs")
    p.add_argument("--zoo", type=Path, default=ZOO)
    p.add_argument("--benchmark", type=int, metavar="N", help="time N steps, print tokens/s, save nothing")
    p.add_argument("--export-only", action="store_true", help="export the latest checkpoint and exit")
    p.add_argument("--no-export", action="store_true", help="do not export to the zoo at the end")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="checkpoint and exit after step N (simulates an interruption; for testing resume)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    spec = dict(MODELS[args.model])
    if args.steps:
        spec["steps"] = args.steps
    tokdir, tokenizer_dir = args.data / "tokens", args.data / "tokenizer"
    if not (tokdir / "train.bin").exists() or not tokenizer_dir.exists():
        sys.exit("train_demo_models: work-data/tokens or work-data/tokenizer missing; run "
                 "scripts/build_corpus.py and scripts/train_tokenizer.py first")
    meta = json.loads((tokdir / "meta.json").read_text())
    train = genre_streams(tokdir, "train", len(meta["genres"]))
    val = genre_streams(tokdir, "validation", len(meta["genres"]))
    n_train = sum(st.size for st in train)

    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    config = make_config(spec["arch"], meta["vocab_size"], spec["seq_len"])
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8,
    )
    run = args.runs / args.model
    ckpt_path = run / "ckpt.safetensors"
    step, elapsed = 0, 0.0
    if ckpt_path.exists() and not args.benchmark:
        ck = load_checkpoint(ckpt_path, model, opt)
        step, elapsed = ck["step"], ck["elapsed"]
        if ck["spec"] != spec or ck["seed"] != args.seed:
            sys.exit(f"train_demo_models: checkpoint {ckpt_path} was made with other settings "
                     f"({ck['spec']}, seed {ck['seed']}); delete it to start over")
        print(f"[train] resumed {args.model} from step {step} ({elapsed / 60:.1f} min trained)", flush=True)

    tokens_per_step = spec["batch_size"] * spec["seq_len"]
    vbatches = val_batches(val, args.eval_batches, spec["batch_size"], spec["seq_len"])

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            losses = [model(input_ids=b, labels=b).loss.item() for b in vbatches]
        model.train()
        return float(np.mean(losses))

    def summary(val_loss: float | None) -> dict:
        return {
            "model": args.model,
            "architecture": type(model).__name__,
            "parameters": n_params,
            "steps": step,
            "batch_size": spec["batch_size"],
            "seq_len": spec["seq_len"],
            "tokens_seen": step * tokens_per_step,
            "train_tokens_available": int(n_train),
            "epochs": round(step * tokens_per_step / n_train, 3),
            "sampling": spec["sampling"],
            "peak_lr": spec["lr"],
            "schedule": f"linear warmup {spec['warmup']} steps, cosine to 10% of peak",
            "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.1 on matrices), grad clip 1.0",
            "seed": args.seed,
            "threads": args.threads,
            "training_seconds": round(elapsed, 1),
            "final_val_loss": val_loss,
            "torch": torch.__version__,
        }

    if args.export_only:
        if not ckpt_path.exists():
            sys.exit(f"train_demo_models: no checkpoint at {ckpt_path}")
        export(model, tokenizer_dir, args.zoo / args.model, summary(evaluate()))
        return 0

    run.mkdir(parents=True, exist_ok=True)
    logf = None if args.benchmark else open(run / "log.jsonl", "a")
    print(f"[train] {args.model}: {type(model).__name__}, {n_params / 1e6:.2f}M parameters, "
          f"{spec['steps']} steps x {tokens_per_step} tokens, threads={args.threads}", flush=True)
    total = args.benchmark or spec["steps"]
    last_ckpt = time.time()
    seg_start = time.time()
    seg_elapsed0 = elapsed
    bench_t0 = None
    while step < total:
        if args.benchmark and step == 2:
            bench_t0 = time.time()
        t = time.time()
        lr = lr_at(step, spec["steps"], spec["lr"], spec["warmup"])
        for g in opt.param_groups:
            g["lr"] = lr
        x = get_batch(train, args.seed, step, spec["batch_size"], spec["seq_len"])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = seg_elapsed0 + (time.time() - seg_start)
        if logf and (step % args.log_every == 0 or step == 1):
            rec = {"step": step, "loss": round(loss.item(), 4), "lr": lr, "grad_norm": round(float(gnorm), 3),
                   "tokens_per_s": round(tokens_per_step / (time.time() - t)), "elapsed_s": round(elapsed, 1)}
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            print(f"[train] step {step}/{total} loss {rec['loss']:.4f} lr {lr:.2e} "
                  f"{rec['tokens_per_s']} tok/s elapsed {elapsed / 60:.1f} min", flush=True)
        if logf and (step % args.eval_every == 0 or step == total):
            vl = evaluate()
            logf.write(json.dumps({"step": step, "val_loss": round(vl, 4), "elapsed_s": round(elapsed, 1)}) + "\n")
            logf.flush()
            print(f"[train] step {step} validation loss {vl:.4f} (ppl {math.exp(vl):.1f})", flush=True)
        stop = args.stop_after is not None and step >= args.stop_after
        if not args.benchmark and (time.time() - last_ckpt > args.ckpt_minutes * 60 or step == total or stop):
            save_checkpoint(ckpt_path, model, opt, {"step": step, "elapsed": elapsed, "spec": spec, "seed": args.seed})
            last_ckpt = time.time()
            print(f"[train] checkpoint at step {step}", flush=True)
        if stop and step < total:
            print(f"[train] stopping after step {step} as asked (--stop-after); rerun to resume", flush=True)
            return 0

    if args.benchmark:
        dt = time.time() - bench_t0
        tps = (total - 2) * tokens_per_step / dt
        print(f"[benchmark] {args.model}: {tps:.0f} tokens/s, {dt / (total - 2):.2f} s/step; "
              f"{spec['steps']} steps would take {spec['steps'] * dt / (total - 2) / 60:.1f} min", flush=True)
        return 0
    vl = evaluate()
    s = summary(vl)
    (run / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    print(f"[train] done: {step} steps, {s['tokens_seen']:,} tokens, {elapsed / 60:.1f} min, "
          f"val loss {vl:.4f}", flush=True)
    if not args.no_export:
        export(model, tokenizer_dir, args.zoo / args.model, s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
