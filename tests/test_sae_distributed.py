"""Data-parallel SAE training on 2 gloo ranks: the ranks stay identical, 2 ranks x B rows equal 1 process x 2B
rows to float32 summation order, and a killed run resumes from rank 0's checkpoint as in one process."""

from __future__ import annotations

import json

import pytest
import torch

from actlab.files import load_tensors, save_tensors
from actlab.sae.train import SAETrainConfig, SAETrainer
from dist_helpers import run_ranks, torchrun_cli

D = 12


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    dictionary = torch.randn(40, D, generator=g)
    codes = torch.rand(2048, 40, generator=g) * (torch.rand(2048, 40, generator=g) < 0.08)
    return codes @ dictionary + 0.3 + 0.05 * torch.randn(2048, D, generator=g)


def _config(kind: str, **extra) -> SAETrainConfig:
    # dead_after small enough that latents die and AuxK's dead set (reduced across ranks) matters
    return SAETrainConfig(n_latents=256, kind=kind, k=1, batch_size=128, steps=12, lr=3e-3, aux_k=8,
                          dead_after=128, log_every=1, checkpoint_every=4, **extra)


def _state(result_sae) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in result_sae.state_dict().items()}


def _feed(x: torch.Tensor, source: str, batch: int, rank: int, world: int):
    if source == "tensor":  # every rank reads the whole tensor and keeps its share of each step's batch
        return x
    part = batch // world  # each rank's own rows of each step (as a stream over the rank's documents)
    return lambda step: x[(step * batch + rank * part + torch.arange(part)) % x.shape[0]]


def _train(kind: str, source: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """Weights after the initialisation, Adam's first moment after step 1 (0.1 x the gradient), the final
    weights, and the logged losses."""
    config = _config(kind)
    trainer = SAETrainer(_feed(_data(), source, config.batch_size, rank, world), D, config, distributed=world > 1)
    out = {f"init.{k}": v for k, v in _state(trainer.sae).items()}
    trainer.step()
    out.update({f"grad.{k}": v.clone() for k, v in trainer.run.adam.m.items()})
    while not trainer.done:
        trainer.step()
    out.update({f"final.{k}": v for k, v in _state(trainer.sae).items()})
    out["loss"] = torch.tensor([h["loss"] for h in trainer.run.history], dtype=torch.float64)
    out["dead"] = torch.tensor([h["dead_fraction"] for h in trainer.run.history], dtype=torch.float64)
    return out


def _run_cases(rank: int, out, cases) -> None:
    for kind, source in cases:
        save_tensors(out / f"{kind}-{source}-{rank}.safetensors", _train(kind, source, rank, 2), "test.sae", {})


def _load(path) -> dict[str, torch.Tensor]:
    return load_tensors(path, "test.sae", "state")[0]


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> bool:
    return bool((got - want).abs().max() <= rel * want.abs().max())


@pytest.mark.slow
def test_two_ranks_of_b_equal_one_process_of_2b(tmp_path):
    cases = [("topk", "tensor"), ("jumprelu", "tensor"), ("topk", "function")]
    run_ranks(_run_cases, 2, tmp_path, cases)
    for kind, source in cases:
        one = _train(kind, source)
        ranks = [_load(tmp_path / f"{kind}-{source}-{r}.safetensors") for r in range(2)]
        assert ranks[0].keys() == one.keys()
        for name in one:
            assert torch.equal(ranks[0][name], ranks[1][name]), (kind, source, name)  # the ranks stay identical
        # Both runs compute the same sums, only split in two and added: float32 rounding in another order,
        # an error of about sqrt(B) * eps32 ~ 1e-6 of the terms' size (B = 128 rows, eps32 = 6e-8) in the batch
        # means of the initialisation and in every gradient (Adam's m = 0.1 g after one step). The terms' size
        # is the step's largest gradient: the tied encoder's own gradient is 0 analytically at step 1 (the
        # encoder gives each picked latent its least-squares coefficient) and what is left is rounding noise.
        scale = max(float(one[n].abs().max()) for n in one if n.startswith("grad."))
        for name in one:
            if name.startswith("init."):
                assert _close(ranks[0][name], one[name], 1e-5), (kind, source, name)
            if name.startswith("grad."):
                assert float((ranks[0][name] - one[name]).abs().max()) <= 1e-5 * scale, (kind, source, name)
        assert _close(ranks[0]["loss"][:1], one["loss"][:1], 1e-5), (kind, source)  # the loss of step 1
        if source != "tensor":
            continue
        assert _close(ranks[0]["loss"], one["loss"], 1e-4), kind
        if kind == "topk":  # AuxK was on: the dead set (reduced across ranks) mattered
            assert bool((one["dead"] > 0.3).any()) and torch.equal(ranks[0]["dead"], one["dead"])
        # The weights after 12 steps: Adam divides by sqrt(v), so a gradient component that is rounding noise
        # (as above) becomes a step of +-lr whatever its size, and rounding in another order can flip it. With
        # the same initial weights (every rank reads the same tensor) the sums here round alike (measured: the
        # weights agree to <= 1e-5 of the distance they moved, one ulp); a flipped component, a wrong batch
        # split, a missing gradient sum or a per-rank variance moves them by O(lr) ~ 0.1 x that distance.
        # (With per-rank initial data, the 1-ulp difference of the initial bias already flips some of them.)
        for name in one:
            if name.startswith("final."):
                moved = (one[name] - one["init." + name[6:]]).abs().max()
                assert (ranks[0][name] - one[name]).abs().max() <= 1e-4 * moved, (kind, name)


def _resume(rank: int, out, phases: tuple[str, ...]) -> None:
    config = _config("topk")
    for phase in phases:
        folder = out / ("ckpt-killed" if phase != "straight" else "ckpt-straight")
        trainer = SAETrainer(_data(), D, config, checkpoint_dir=folder, distributed=True)
        stop = 6 if phase == "killed" else config.steps  # stopped after step 6: the last checkpoint is step 4
        while trainer.run.step < stop:
            trainer.step()
        if phase != "killed":
            save_tensors(out / f"{phase}-{rank}.safetensors", _state(trainer.sae), "test.sae", {})
            (out / f"{phase}-{rank}.txt").write_text(f"{trainer.resumed_from}")


@pytest.mark.slow
def test_killed_run_resumes_from_rank_zero_checkpoint(tmp_path):
    run_ranks(_resume, 2, tmp_path, ("straight", "killed"))  # the processes end mid-run, as if killed
    run_ranks(_resume, 2, tmp_path, ("resumed",))
    assert (tmp_path / "resumed-0.txt").read_text() == "4" == (tmp_path / "resumed-1.txt").read_text()
    straight, resumed = _load(tmp_path / "straight-0.safetensors"), _load(tmp_path / "resumed-1.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        diff = float((straight[name] - resumed[name]).abs().max())
        assert torch.equal(straight[name], resumed[name]), (name, diff)  # bit for bit, as in one process


@pytest.mark.slow
def test_cli_sae_train_under_torchrun(tmp_path):
    """`actlab sae train` on 2 torchrun ranks: one SAE written (by rank 0); rerunning resumes from its checkpoint."""
    from actlab.sae import load_sae

    data = tmp_path / "docs.txt"
    data.write_text("\n".join(f"Line {i}: the river ran past {i % 7} stone bridges and a mill." for i in range(64)))
    args = ["sae", "train", "demo-gpt2", "--site", "resid.1", "--data", str(data), "--tokens", "1024",
            "--batch-size", "128", "--k", "4", "--expansion", "2", "-o", str(tmp_path / "sae")]
    for attempt in range(2):
        done = torchrun_cli(args, tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        assert done.stdout.count("trained resid.1") == 1  # rank 0 alone reports (and writes)
        assert f"(resumed from {8 * attempt})" in done.stdout  # 1024 tokens / 128 = 8 steps; the rerun resumes
    sae = load_sae(tmp_path / "sae" / "actlab-sae.safetensors")[0]
    assert sae.n_latents == 2 * sae.d_in and json.loads((tmp_path / "sae" / "train.json").read_text())["steps"] == 8
