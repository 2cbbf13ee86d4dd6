"""The SAE slice of issue #13: known-answer recovery, BatchTopK sparsity, files, bit-identical resume, bad input."""

from __future__ import annotations

import pytest
import torch

from actlab.errors import ActlabError
from actlab.sae import SAETrainConfig, SparseAutoencoder, evaluate_sae, load_sae, save_sae, train_sae

torch.set_num_threads(1)
FAST = dict(n_latents=64, k=4, batch_size=256, lr=1e-3, dead_after=2560, aux_k=16)


def planted(n=8192, d=32, atoms=64, k=4, noise=0.01, seed=0):
    """Unit atoms (2x overcomplete) with k-sparse codes in [0.5, 1.5] plus small noise."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    index = torch.rand(n, atoms, generator=g).argsort(1)[:, :k]
    codes = torch.zeros(n, atoms).scatter(1, index, torch.rand(n, k, generator=g) + 0.5)
    return codes @ dictionary + noise * torch.randn(n, d, generator=g), dictionary


def pca_fvu(x, k):
    xc = x - x.mean(0)
    eig = torch.linalg.eigvalsh(xc.T @ xc).flip(0)
    return float(1 - eig[:k].sum() / eig.sum())


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def topk_run(data):
    return train_sae(data[0], 32, steps=300, **FAST)


def test_topk_recovers_planted_atoms(data, topk_run):
    # measured (seeds 0-2): 100% of atoms at cosine > 0.9 (min 0.987); FVU 0.105-0.109 vs PCA-4 0.71.
    # Bars: 90% of atoms (the target), FVU < 0.2 and under a third of the PCA baseline.
    x, dictionary = data
    best = (dictionary @ topk_run.sae.W_dec.detach().T).max(1).values
    assert float((best > 0.9).float().mean()) >= 0.9
    metrics = evaluate_sae(topk_run.sae, x)
    assert metrics["fvu"] < 0.2 and metrics["fvu"] < pca_fvu(x, 4) / 3
    assert metrics["l0"] == pytest.approx(4.0) and metrics["cosine"] > 0.9
    assert topk_run.history[-1]["step"] == 300


def test_decoder_rows_have_unit_norm(topk_run):
    norms = topk_run.sae.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_batchtopk_l0_exact_in_training_and_close_at_inference(data):
    x = data[0]
    run = train_sae(x, 32, kind="batchtopk", steps=300, **FAST)
    sae = run.sae.train()
    z = sae.encode(x[:256])
    assert int((z > 0).sum()) == 4 * 256  # exactly k per row on average over the batch
    sae.eval()
    # measured: threshold 0.21, inference L0 3.82 on the 8192 rows, FVU 0.13; bar: within 15% of k
    metrics = evaluate_sae(sae, x)
    assert float(sae.threshold) > 0 and metrics["l0"] == pytest.approx(4.0, rel=0.15)
    assert metrics["fvu"] < 0.2


def test_jumprelu_trains_with_finite_thresholds(data):
    # JumpReLU is implemented (STE, rectangle kernel, L0 penalty) but not tuned: in 40 steps we only
    # check that the thresholds get a gradient and everything stays finite.
    run = train_sae(data[0], 32, kind="jumprelu", steps=40, l0_coef=3e-3, bandwidth=0.05, **FAST)
    th = run.sae.thresholds.detach()
    assert torch.isfinite(th).all() and not torch.allclose(th, torch.full_like(th, 0.001))
    assert evaluate_sae(run.sae, data[0])["fvu"] < 1.0


def test_save_load_roundtrip_and_refusals(tmp_path, data, topk_run):
    path = save_sae(tmp_path / "sae.safetensors", topk_run.sae, model={"name": "demo"}, site="resid.2")
    sae, info = load_sae(path)
    x = data[0][:100]
    assert torch.equal(sae(x)[0], topk_run.sae(x)[0]) and info["site"] == "resid.2" and info["model"] == {"name": "demo"}
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    garbage = tmp_path / "junk.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    for bad in (truncated, garbage, tmp_path / "missing.safetensors"):
        with pytest.raises(ActlabError, match=bad.name):
            load_sae(bad)
    from actlab.files import save_tensors
    other = save_tensors(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, "actlab.other", {})
    with pytest.raises(ActlabError, match="not an actlab SAE file"):
        load_sae(other)


def _by_step(x):
    return lambda step: x[step * 128 % 4096:][:128]


@pytest.mark.parametrize("source", ["tensor", "function"])
def test_resume_is_bit_identical(tmp_path, data, monkeypatch, source):
    """Interrupt a 60-step run at step 45 (checkpoints every 20), resume: the weights equal an uninterrupted run's."""
    from actlab.sae.batches import StepBatches

    x = data[0][:4096]
    make = (lambda: x) if source == "tensor" else (lambda: _by_step(x))
    cfg = SAETrainConfig(steps=60, checkpoint_every=20, **{**FAST, "batch_size": 128})
    whole = train_sae(make(), 32, cfg).sae
    real_get = StepBatches.get

    def get(self, step):
        if step == 45:
            raise KeyboardInterrupt
        return real_get(self, step)

    monkeypatch.setattr(StepBatches, "get", get)
    with pytest.raises(KeyboardInterrupt):
        train_sae(make(), 32, cfg, checkpoint_dir=tmp_path)
    monkeypatch.setattr(StepBatches, "get", real_get)
    resumed = train_sae(make(), 32, cfg, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 40 and resumed.steps == 60
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
    with pytest.raises(ActlabError, match="other options"):
        train_sae(make(), 32, cfg.with_overrides(cfg, {"k": 5}), checkpoint_dir=tmp_path)


def test_auxk_gives_dead_latents_a_gradient():
    """AuxK's mechanism: latents that did not fire in step 1 (dead_after 1 token) get encoder updates in step 2
    only with AuxK on; the latents that stayed live are trained identically either way in step 1."""
    x, _ = planted(n=512)
    runs = {aux: train_sae(x, 32, **{**FAST, "n_latents": 512, "aux_k": aux, "batch_size": 512, "steps": 2,
                                     "dead_after": 1}) for aux in (0, 32)}
    assert not torch.equal(runs[0].sae.W_enc, runs[32].sae.W_enc)


@pytest.mark.xfail(strict=True, reason="measured: on low-rank data (rank 8 in 64 dims, 256 latents, 300 steps) "
                   "dead fraction 0.63 without AuxK and 0.77-0.78 with aux_k 4/8/32; on planted data with more latents "
                   "than atoms AuxK kills latents (0 -> 29% at 512), on real activations it helps a little "
                   "(docs/sae.md, Known limits)")
def test_auxk_revives_dead_latents():
    g = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(64, 8, generator=g))[0]
    x = planted(n=8192, d=8, atoms=32, k=4, seed=3)[0] @ basis.T
    dead = {aux: evaluate_sae(train_sae(x, 32 * 2, **{**FAST, "n_latents": 256, "aux_k": aux}, steps=300).sae,
                              x)["dead_fraction"] for aux in (0, 32)}
    assert dead[32] < dead[0]


@pytest.mark.parametrize("shared", [True, False])
def test_latent_shared_adam_scales_a_rare_latents_step_by_its_gradient(shared):
    # First Adam step: bias-corrected m = g, v = g^2. Shared over latents, the step of W_dec row i is
    # lr * g_i / sqrt(mean_j g_j^2) per coordinate, so a latent with a 100x smaller gradient moves 100x less;
    # plain Adam moves every weight by ~lr whatever its gradient (sign(g) up to eps).
    from actlab.sae.train import _Adam

    sae = SparseAutoencoder(4, 8, "topk", 2)
    with torch.no_grad():
        sae.W_dec.zero_()  # the step is then the weight itself, with no rounding from an offset
    g = torch.zeros(8, 4)
    g[0], g[1] = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([1.0, -2.0, 0.5, 3.0]) * 0.01
    sae.W_dec.grad = g.clone()
    _Adam(sae, shared=shared).step(1e-3)
    moved = sae.W_dec.detach()
    if shared:
        expected = -1e-3 * g / g.pow(2).mean(0, keepdim=True).sqrt()
    else:
        expected = -1e-3 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-9)


def test_bad_input_is_a_clear_error(data):
    x = data[0][:512]
    with pytest.raises(ActlabError, match=r"\[batch, 16\]"):
        train_sae(x, 16, steps=1, **FAST)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ActlabError, match="NaN"):
        train_sae(bad, 32, steps=1, **FAST)
    with pytest.raises(ActlabError, match="NaN"):
        train_sae(lambda step: bad[:256], 32, steps=1, **FAST)
    with pytest.raises(ActlabError, match="cannot exceed n_latents"):
        train_sae(x, 32, steps=1, **{**FAST, "k": 65})
    with pytest.raises(ActlabError, match="k must be"):
        SparseAutoencoder(32, 8, "topk", 9)
    with pytest.raises(ActlabError, match="unknown SAETrainConfig option"):
        train_sae(x, 32, steps=1, widht=3)
    sae = SparseAutoencoder(32, 64, "topk", 4)
    with pytest.raises(ActlabError, match="shape"):
        sae.encode(torch.zeros(4, 31))
