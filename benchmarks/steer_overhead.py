"""Steering overhead: ``generate`` with a steering vector against plain generation, same tokens.

    .venv/bin/python benchmarks/steer_overhead.py [--model random|demo-llama] [--repeats 11] [--threads 1]

Greedy decoding of a batch of 4 prompts (32 random token ids each) for 64 new tokens, the end-of-
text token disabled so every variant generates exactly the same number of tokens; the vector is
small enough that the tokens are identical too (checked and printed). Variants, interleaved in
every repeat so load drift on a shared machine hits them alike. Each is timed in CPU seconds of the
process (the figure to trust on a shared machine: with one thread it leaves out the time other
processes hold the core) and in wall seconds; medians and their ratios are printed:

* ``hf``: the HF model's own ``generate`` (no actlab hooks);
* ``actlab``: ``Model.generate`` with no edit;
* ``steered``: ``Model.generate`` inside ``with model.edit(SteeringVector(...) * coef)``.

The default model is a ~10M-parameter Llama with random weights (weights do not change the cost);
``--model demo-llama`` uses the bundled demo model. If ``.bench-venv`` (see docs/benchmarks.md)
has repeng or steering-vectors, the same addition at the same layer is timed with them in that
interpreter against its own plain HF ``generate`` on a model of the same configuration, and their
ratios are printed beside ours ("not measured: reason" when they cannot run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers as T

import actlab
from actlab.interventions import SteeringVector
from timing import BENCH_LLAMA, measure

ROOT = Path(__file__).resolve().parents[1]
BENCH_PYTHON = ROOT / ".bench-venv" / "bin" / "python"
RANDOM_CONFIG = BENCH_LLAMA


def build(name: str) -> tuple[actlab.Model, dict]:
    if name == "random":
        torch.manual_seed(0)
        hf = T.LlamaForCausalLM(T.LlamaConfig(**RANDOM_CONFIG)).eval()
        model = actlab.load(hf, tokenizer=None)
        model.name = "random Llama (~10M)"
        return model, dict(RANDOM_CONFIG)
    model = actlab.load(name)
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"]
    return model, {k: getattr(model.hf.config, k) for k in keys if hasattr(model.hf.config, k)}


def hook_time(model, fn, repeats: int) -> tuple[float, float]:
    """Seconds spent inside actlab's hook functions (state update + edits) during ``fn``, and
    ``fn``'s total seconds (medians). Intervals this short are rarely preempted, so the fraction
    is a load-independent measure of the overhead."""
    hooks = model.hooks
    spent = [0.0]
    apply, update = hooks._apply, hooks._update_state

    def timed(inner):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    hooks._apply, hooks._update_state = timed(apply), timed(update)  # hooks installed from now on call these
    inside, total = [], []
    try:
        for _ in range(repeats):
            spent[0] = 0.0
            start = time.perf_counter()
            fn()
            total.append(time.perf_counter() - start)
            inside.append(spent[0])
    finally:
        del hooks._apply, hooks._update_state
    return statistics.median(inside), statistics.median(total)


def ratio(times: dict, a: str, b: str) -> float:
    return statistics.median(times[a]) / statistics.median(times[b])


def report(rows: dict[str, str], wall: dict, cpu: dict, indent: str = "") -> None:
    """Medians and ratios to the first row; CPU time is the figure to trust on a loaded machine
    (one thread: it does not count the time other processes hold the core)."""
    ref = next(iter(rows.values()))
    print(f"{indent}{'variant':<48}{'CPU s':>8}{'ratio':>8}{'wall s':>9}{'ratio':>8}   wall min..max")
    for label, key in rows.items():
        print(f"{indent}{label:<48}{statistics.median(cpu[key]):>8.3f}{ratio(cpu, key, ref):>8.3f}"
              f"{statistics.median(wall[key]):>9.3f}{ratio(wall, key, ref):>8.3f}   "
              f"{min(wall[key]):.3f}..{max(wall[key]):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random", help="'random' (a ~10M Llama) or a model name, e.g. demo-llama")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layer", type=int, default=None, help="steered layer (default: the middle one)")
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (the times are medians)")
    torch.set_num_threads(args.threads)

    model, config = build(args.model)
    if not model.hf.config.model_type == "llama":
        sys.exit("steer_overhead: the peer comparison builds a Llama; pass a Llama model")
    model.hf.generation_config.eos_token_id = None  # every variant generates exactly --new-tokens tokens
    layer = args.layer if args.layer is not None else model.n_layers // 2
    site = f"resid.{layer}"
    vocab = model.hf.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with model.capture(site) as cap:
        model(ids)
    resid_norm = float(cap[site].norm(dim=-1).mean())
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(2))
    direction = direction / direction.norm()
    coef = 1e-5 * resid_norm  # a real addition, too small to change greedy tokens: identical work
    vec = SteeringVector(site=site, vector=direction, model=model.identity())

    def hf_plain():
        with torch.no_grad():
            return model.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                     do_sample=False, pad_token_id=0, temperature=None, top_p=None,
                                     top_k=None)[:, ids.shape[1]:]

    def actlab_plain():
        return model.generate(ids, max_new_tokens=args.new_tokens, return_ids=True)

    def steered():
        with model.edit(vec * coef):
            return model.generate(ids, max_new_tokens=args.new_tokens, return_ids=True)

    variants = {"hf": hf_plain, "actlab": actlab_plain, "steered": steered}
    outputs = {name: fn() for name, fn in variants.items()}  # warm-up + token check
    same_len = len({tuple(o.shape) for o in outputs.values()}) == 1 and outputs["hf"].shape[1] == args.new_tokens
    same_tokens = same_len and all(torch.equal(outputs["hf"], o) for o in outputs.values())
    wall, cpu = measure(variants, args.repeats)

    n_params = sum(p.numel() for p in model.hf.parameters())
    print(f"model: {model.name}, {n_params / 1e6:.1f}M parameters; steering {site} (norm {coef:.3g}, "
          f"residual norm {resid_norm:.3g}); batch {args.batch} x {args.prompt_len} prompt tokens, "
          f"{args.new_tokens} new tokens, greedy; threads {args.threads}; {args.repeats} repeats")
    print(f"same number of tokens: {same_len}; identical tokens: {same_tokens}")
    report({"HF generate (plain)": "hf", "actlab generate, no edit": "actlab",
            "actlab generate + steering vector": "steered"}, wall, cpu)
    print(f"steered / actlab without edit: CPU {ratio(cpu, 'steered', 'actlab'):.3f}, "
          f"wall {ratio(wall, 'steered', 'actlab'):.3f}   (target <= 1.03x)")
    inside, total = hook_time(model, steered, args.repeats)
    print(f"time inside actlab's hooks during a steered generate (instrumented, median of {args.repeats}): "
          f"{inside * 1e3:.1f} ms of {total * 1e3:.0f} ms = {100 * inside / total:.2f}% "
          f"(the overhead itself, free of the load noise above)")
    if not args.no_peers:
        peers(config, ids, direction * coef, layer, args)


PEER_SCRIPT = r'''
import json, statistics, sys, time
import torch, transformers as T
spec = json.loads(sys.stdin.read())
torch.set_num_threads(spec["threads"])
torch.manual_seed(0)
cfg = T.LlamaConfig(**spec["config"])
model = T.LlamaForCausalLM(cfg).eval()
model.generation_config.eos_token_id = None
ids = torch.tensor(spec["ids"]); mask = torch.ones_like(ids)
vec = torch.tensor(spec["vector"]); layer = spec["layer"]; n_new = spec["new_tokens"]

def plain():
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                              pad_token_id=0)[:, ids.shape[1]:]

variants = {"hf": plain}
result = {"transformers": T.__version__, "not_measured": {}}
try:
    import numpy as np
    from repeng import ControlModel, ControlVector
    control = ControlVector(model_type="llama", directions={layer: vec.numpy().astype(np.float32)})

    def repeng_run():
        cm = ControlModel(model, [layer])
        try:
            cm.set_control(control, 1.0)
            with torch.no_grad():
                return cm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                                   pad_token_id=0)[:, ids.shape[1]:]
        finally:
            cm.unwrap()
    variants["repeng"] = repeng_run
except Exception as exc:
    result["not_measured"]["repeng"] = f"{type(exc).__name__}: {exc}"
try:
    from steering_vectors import SteeringVector
    sv = SteeringVector(layer_activations={layer: vec}, layer_type="decoder_block")

    def sv_run():
        with sv.apply(model, multiplier=1.0):
            return plain()
    variants["steering-vectors"] = sv_run
except Exception as exc:
    result["not_measured"]["steering-vectors"] = f"{type(exc).__name__}: {exc}"
outs = {}
for name, fn in list(variants.items()):
    try:
        outs[name] = fn()
    except Exception as exc:
        result["not_measured"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        del variants[name]
result["same_tokens"] = {n: bool(torch.equal(o, outs["hf"])) for n, o in outs.items()}
wall = {n: [] for n in variants}; cpu = {n: [] for n in variants}
for _ in range(spec["repeats"]):
    for n, fn in variants.items():
        w, c = time.perf_counter(), time.process_time(); fn()
        cpu[n].append(time.process_time() - c); wall[n].append(time.perf_counter() - w)
result["wall"], result["cpu"] = wall, cpu
print("RESULT " + json.dumps(result))
'''


def peers(config: dict, ids: torch.Tensor, vector: torch.Tensor, layer: int, args) -> None:
    print("\npeers (in .bench-venv, against that interpreter's plain HF generate, same config/tokens/layer):")
    if not BENCH_PYTHON.exists():
        print(f"  repeng: not measured: {BENCH_PYTHON} does not exist")
        print(f"  steering-vectors: not measured: {BENCH_PYTHON} does not exist")
        return
    spec = {"config": config, "ids": ids.tolist(), "vector": vector.tolist(), "layer": layer,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads}
    try:
        proc = subprocess.run([str(BENCH_PYTHON), "-c", PEER_SCRIPT], input=json.dumps(spec), capture_output=True,
                              text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        print("  repeng, steering-vectors: not measured: the peer run took longer than 30 minutes")
        return
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        print(f"  repeng, steering-vectors: not measured: the peer process failed ({reason})")
        return
    result = json.loads(line[len("RESULT "):])
    print(f"  (transformers {result['transformers']} there)")
    rows = {"HF generate (plain)": "hf"}
    for name in ("repeng", "steering-vectors"):
        if name in result["cpu"]:
            same = "identical tokens" if result["same_tokens"].get(name) else "DIFFERENT tokens"
            rows[f"{name} + vector ({same})"] = name
    report(rows, result["wall"], result["cpu"], indent="  ")
    for name in ("repeng", "steering-vectors"):
        if name not in result["cpu"]:
            print(f"  {name}: not measured: {result['not_measured'].get(name, 'unknown reason')}")

if __name__ == "__main__":
    main()
