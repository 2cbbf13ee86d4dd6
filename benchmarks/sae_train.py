"""SAE training speed and quality: actlab against SAELens and sparsify on one planted-dictionary set (issue 13).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sae_train.py [--repeats 3] [--timing-steps 32]

The set: 2,048 random unit atoms in 256 dimensions; each token is a sum of 32 of them with magnitudes
in [0.5, 1.5] plus N(0, 0.01²) noise per dimension; 262,144 training and 16,384 test tokens, made once
and saved to one file (work-data/sae_bench/). Every library trains the same SAE on it — 2,048 latents,
TopK k = 32, batch 4,096, 4 epochs = 256 steps, one thread, batches drawn by the same per-epoch
permutation — with its own defaults for everything else:

- actlab: ``train_sae`` (its defaults: Adam with the second moment shared over latents at 2.4e-3/sqrt(n/2^14), encoder x0.5, b_enc x1/12, silent latents revived,
  linear decay over the last 20%, AuxK).
- sparsify (eai-sparsify): its ``Trainer.fit`` step mirrored on a raw tensor (``run_sparsify``: the Trainer
  wants a model and a token dataset); its default optimizer is signum (schedule-free SignSGD).
- SAELens: its own ``SAETrainer`` (the runner's trainer, which takes any iterator of activation batches)
  with the runner config's defaults (``LanguageModelSAERunnerConfig(...).to_sae_trainer_config()``).

Each training runs in its own subprocess, the peers under .bench-venv/bin/python. Quality: one full run
each; test FVU, the fraction of latents that never fire on the test set, and the fraction of planted
atoms recovered (some decoder row at cosine > 0.9). Speed: tokens per CPU-second (process time) and
per wall second of ``--timing-steps``-step runs, median of ``--repeats``, run round-robin so that load
drift on a shared machine hits all alike. Last, recording speed: demo-llama capturing ``resid.2`` at
every position of the bundled profile texts, against actlab's training speed.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "work-data" / "sae_bench"
PEER_PYTHON = ROOT / ".bench-venv" / "bin" / "python"
D_IN, ATOMS, N_LATENTS, K, BATCH, N_TRAIN, N_TEST, EPOCHS, NOISE = 256, 2048, 2048, 32, 4096, 262_144, 16_384, 4, 0.01
STEPS = EPOCHS * N_TRAIN // BATCH  # 256
SEED = 13  # the data's
LIBRARIES = ("actlab", "sparsify", "saelens")


# ------------------------------------------------------------------ the data
def data_path(active: int = K, seed: int = SEED) -> Path:
    tail = "" if seed == SEED else f"-s{seed}"
    return DATA_DIR / f"planted-d{D_IN}-a{ATOMS}-k{active}{tail}.safetensors"


def make_data(active: int = K, seed: int = SEED) -> None:
    """The set with ``active`` atoms per token (the spec's is K = 32, the SAE's k; fewer make it easier);
    ``seed`` draws the atoms and the tokens (13 is the benchmark's; another gives a tuning set)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(ATOMS, D_IN, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    parts = []
    for start in range(0, N_TRAIN + N_TEST, 16384):
        index = torch.rand(16384, ATOMS, generator=g).topk(active, dim=1).indices  # distinct atoms per token
        codes = torch.rand(16384, active, generator=g) + 0.5
        parts.append(F.embedding_bag(index, atoms, per_sample_weights=codes, mode="sum")
                     + NOISE * torch.randn(16384, D_IN, generator=g))
    x = torch.cat(parts)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    save_file({"train": x[:N_TRAIN].contiguous(), "test": x[N_TRAIN:].contiguous(), "atoms": atoms},
              str(data_path(active, seed)))


def load_data(active: int = K, seed: int = SEED) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(data_path(active, seed)))


def batches(train: torch.Tensor, steps: int):
    """The batches of ``steps`` steps: a fresh permutation each epoch (what actlab does with a tensor)."""
    per_epoch = train.shape[0] // BATCH
    for step in range(steps):
        epoch, j = divmod(step, per_epoch)
        if j == 0:
            perm = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(epoch))
        yield train[perm[j * BATCH:(j + 1) * BATCH]]


# ------------------------------------------------------------------ quality, the same for every library
@torch.no_grad()
def quality(encode_decode, w_dec: torch.Tensor, test: torch.Tensor, atoms: torch.Tensor) -> dict:
    """``encode_decode(chunk) -> (recon, latents that fired in the chunk [n] bool, active count)``."""
    rss, fired, active = 0.0, torch.zeros(w_dec.shape[0], dtype=torch.bool), 0
    for chunk in test.split(4096):
        recon, on, count = encode_decode(chunk)
        rss += float((recon - chunk).double().pow(2).sum())
        fired |= on
        active += int(count)
    tss = float((test.double() - test.double().mean(0)).pow(2).sum())
    rows = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = (atoms @ rows.T).max(1).values
    return {"fvu": rss / tss, "dead": float((~fired).float().mean()), "atoms": float((best > 0.9).float().mean()),
            "l0": active / test.shape[0]}


# ------------------------------------------------------------------ the three trainers
# Each trains on data["train"] for ``steps`` steps and returns (encode_decode for ``quality``, decoder rows).
def run_actlab(data: dict, steps: int, options: dict | None = None):
    """``options``: SAETrainConfig overrides (``--actlab-options``, for tuning; none: the defaults)."""
    from actlab.sae import train_sae

    sae = train_sae(data["train"], D_IN, n_latents=N_LATENTS, k=K, batch_size=BATCH, steps=steps,
                    **(options or {})).sae

    def encode_decode(chunk):
        recon, z = sae(chunk)
        return recon, (z > 0).any(0), (z > 0).sum()

    return encode_decode, sae.W_dec.detach()


def run_sparsify(data: dict, steps: int, optimizer: str = "signum"):
    """sparsify's ``Trainer.fit`` step for ``loss_fn="fvu"`` on one hookpoint, faithfully mirrored with its
    defaults (TrainConfig / SparseCoderConfig: signum = ScheduleFreeWrapper(SignSGD, momentum 0.95) at
    5e-3/sqrt(n/2^14), or Adam at 2e-4/sqrt(n/2^14) with its 1,000-step linear warm-up; auxk_alpha 0, so
    no dead mask; b_dec at the first batch's mean; unit-norm decoder before each forward; the decoder
    gradient's parallel part removed before the step). Left out: the model forward and the hook plumbing
    (token mask, clone of the outputs), which are not SAE training."""
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.config import TrainConfig
    from sparsify.sign_sgd import SignSGD

    cfg = TrainConfig(SparseCoderConfig(num_latents=N_LATENTS, k=K), optimizer=optimizer)
    torch.set_float32_matmul_precision("high")  # as Trainer.fit does (no effect on this CPU)
    torch.manual_seed(cfg.init_seeds[0])
    sae = SparseCoder(D_IN, cfg.sae, "cpu", dtype=torch.float32)
    schedulers = []
    if cfg.optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper

        lr = cfg.lr or 5e-3 / (sae.num_latents / 2 ** 14) ** 0.5
        opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
        opt.train()
    else:
        from transformers import get_linear_schedule_with_warmup

        opt = torch.optim.Adam([dict(params=sae.parameters(), lr=cfg.lr or 2e-4 / (sae.num_latents / 2 ** 14) ** 0.5)])
        schedulers = [get_linear_schedule_with_warmup(opt, cfg.lr_warmup_steps, steps)]
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    for step, x in enumerate(batches(data["train"], steps)):
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # the trainer's running average (a sync on GPU)
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.div(cfg.grad_acc_steps * cfg.micro_acc_steps).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        for scheduler in schedulers:
            scheduler.step()
        with torch.no_grad():
            since_fired += x.shape[0]
            since_fired[did_fire] = 0
            did_fire.zero_()
    if cfg.optimizer == "signum":
        opt.eval()  # schedule-free: the averaged weights, what sparsify saves

    def encode_decode(chunk):
        acts, index, _ = sae.encode(chunk)
        fired = torch.zeros(N_LATENTS, dtype=torch.bool)
        fired[index[acts > 0]] = True
        return sae.decode(acts, index), fired, (acts > 0).sum()

    return encode_decode, sae.W_dec.detach()


def run_saelens(data: dict, steps: int):
    """SAELens' own ``SAETrainer`` with the runner config's defaults (lr 3e-4 constant, Adam, AuxK coefficient
    1 with a 1,000-step dead window, decoder init norm 0.1, acts rescaled by decoder norm, grad-norm clip 1)."""
    import dataclasses

    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae_cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=N_LATENTS, k=K)
    runner = LanguageModelSAERunnerConfig(sae=sae_cfg, training_tokens=steps * BATCH, train_batch_size_tokens=BATCH,
                                          logger=LoggingConfig(log_to_wandb=False))
    cfg = dataclasses.replace(runner.to_sae_trainer_config(), checkpoint_path=None)
    sae = TopKTrainingSAE(sae_cfg)
    SAETrainer(cfg=cfg, sae=sae, data_provider=batches(data["train"], steps)).fit()
    sae.eval()

    def encode_decode(chunk):
        z = sae.encode(chunk)
        return sae.decode(z), (z > 0).any(0), (z > 0).sum()

    return encode_decode, sae.W_dec.detach()


PREIMPORT = {"actlab": ["actlab.sae"], "saelens": ["sae_lens", "sae_lens.training.sae_trainer"],
             "sparsify": ["sparsify", "sparsify.config", "sparsify.sign_sgd", "schedulefree", "transformers"]}
RUNNERS = {"actlab": run_actlab, "sparsify": run_sparsify, "sparsify-adam": run_sparsify, "saelens": run_saelens}


def worker(library: str, steps: int, evaluate: bool, active: int, seed: int = SEED, options: str = "") -> None:
    """One training in this process: prints its CPU and wall seconds (training only) and, with ``evaluate``,
    its quality on the test set."""
    import importlib

    torch.set_num_threads(1)
    for module in PREIMPORT[library.split("-")[0]]:  # imports are not training: keep them off the clock
        importlib.import_module(module)
    data = load_data(active, seed)
    extra = {"optimizer": "adam"} if library == "sparsify-adam" else {}
    if library == "actlab" and options:
        extra = {"options": json.loads(options)}
    cpu, wall = time.process_time(), time.perf_counter()
    encode_decode, w_dec = RUNNERS[library](data, steps, **extra)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    result = quality(encode_decode, w_dec, data["test"], data["atoms"]) if evaluate else {}
    print("RESULT " + json.dumps({"cpu": cpu, "wall": wall, "tokens": steps * BATCH, **result}), flush=True)


# ------------------------------------------------------------------ the driver
def spawn(library: str, steps: int, evaluate: bool, active: int, seed: int = SEED, options: str = "") -> dict:
    """Run ``worker`` in a fresh process (peers under .bench-venv); its RESULT, or {"error": why}."""
    import os

    python = sys.executable if library == "actlab" else str(PEER_PYTHON)
    if library != "actlab" and not PEER_PYTHON.exists():
        return {"error": "no .bench-venv (see docs/benchmarks.md)"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    command = [python, str(Path(__file__).resolve()), "--worker", library, "--steps", str(steps), "--active",
               str(active), "--data-seed", str(seed), "--actlab-options", options]
    done = subprocess.run(command + (["--evaluate"] if evaluate else []), capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}


def versions() -> dict[str, str]:
    probe = ("import importlib.metadata as m, json, torch; v = {'torch': torch.__version__}\n"
             "for name in ('sae-lens', 'eai-sparsify'):\n"
             "    try: v[name] = m.version(name)\n"
             "    except m.PackageNotFoundError: pass\n"
             "print(json.dumps(v))")
    found = {"actlab torch": torch.__version__}
    if PEER_PYTHON.exists():
        out = subprocess.run([str(PEER_PYTHON), "-c", probe], capture_output=True, text=True).stdout
        found.update(json.loads(out or "{}"))
    return found


def recording_speed(repeats: int) -> tuple[float, int]:
    """Tokens per CPU-second of demo-llama recording resid.2 at every position of the profile texts."""
    import actlab

    torch.set_num_threads(1)
    model = actlab.load("demo-llama")
    texts = actlab.datasets.profile_texts()
    model.collect(texts[:16], ["resid.2"], positions="all")  # warm-up
    rows, times = 0, []
    for _ in range(repeats):
        cpu = time.process_time()
        rows = model.collect(texts, ["resid.2"], positions="all").acts["resid.2"].shape[0]
        times.append(time.process_time() - cpu)
    return rows / statistics.median(times), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timing-steps", type=int, default=32)
    parser.add_argument("--libraries", default=",".join(LIBRARIES + ("sparsify-adam",)))
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--active", type=int, default=K, help="planted atoms per token (default %(default)s, the spec)")
    parser.add_argument("--data-seed", type=int, default=SEED, help="the set's seed (default %(default)s; "
                        "another one makes a tuning set)")
    parser.add_argument("--actlab-options", default="", help="JSON SAETrainConfig overrides for actlab (tuning)")
    parser.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.evaluate, args.active, args.data_seed, args.actlab_options)
    torch.set_num_threads(1)
    if not data_path(args.active, args.data_seed).exists():
        make_data(args.active, args.data_seed)
    libraries = args.libraries.split(",")
    print(f"versions: {versions()}")
    print(f"set (seed {args.data_seed}): {N_TRAIN:,} train / {N_TEST:,} test tokens, d_in {D_IN}, {ATOMS} atoms, {args.active} a token; SAE {N_LATENTS} "
          f"latents, k {K}, batch {BATCH}, {STEPS} steps; one thread", flush=True)
    full = {}
    if not args.skip_quality:
        for library in libraries:
            full[library] = spawn(library, STEPS, True, args.active, args.data_seed, args.actlab_options)
            print(f"  full run {library}: {full[library]}", flush=True)
    timed: dict[str, list[dict]] = {library: [] for library in libraries}
    for _ in range(args.repeats):  # round-robin
        for library in libraries:
            timed[library].append(spawn(library, args.timing_steps, False, args.active, args.data_seed,
                                        args.actlab_options))
    speed = {}
    print(f"\n{'library':<15}{'tok/CPU-s':>11}{'tok/wall-s':>12}{'full run tok/CPU-s':>20}{'test FVU':>10}"
          f"{'dead':>8}{'atoms':>8}{'L0':>7}")
    for library in libraries:
        runs = [r for r in timed[library] if "error" not in r]
        q = full.get(library, {})
        if timed[library] and not runs:
            print(f"{library:<15} not measured: {timed[library][0].get('error')}")
            continue
        cpu = wall = "-"
        if runs:
            speed[library] = statistics.median(r["tokens"] / r["cpu"] for r in runs)
            cpu, wall = f"{speed[library]:,.0f}", f"{statistics.median(r['tokens'] / r['wall'] for r in runs):,.0f}"
        whole = f"{q['tokens'] / q['cpu']:,.0f}" if "cpu" in q else "-"
        scores = (f"{q['fvu']:>10.3f}{q['dead']:>8.1%}{q['atoms']:>8.1%}{q['l0']:>7.1f}" if "fvu" in q
                  else f"  {q.get('error', '')}")
        print(f"{library:<15}{cpu:>11}{wall:>12}{whole:>20}{scores}")
    for peer in ("sparsify", "saelens", "sparsify-adam"):
        if "actlab" in speed and peer in speed:
            print(f"actlab / {peer}: {speed['actlab'] / speed[peer]:.2f}x tokens per CPU-second")
    if "actlab" in speed:
        rate, rows = recording_speed(args.repeats)
        print(f"\nrecording (demo-llama, resid.2, every position, {rows:,} tokens of profile_texts): {rate:,.0f} "
              f"tokens/CPU-s; actlab SAE training / recording = {speed['actlab'] / rate:.2f}x")


if __name__ == "__main__":
    main()
