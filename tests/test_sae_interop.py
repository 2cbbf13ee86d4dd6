"""SAELens and sparsify files (issue #13): our loaded SAE computes what the other library computes.

Each file is written here by hand in the library's layout, and the library's inference forward
is written out below from its source (SAELens 6.x ``encode``/``decode``, sparsify's
``SparseCoder.forward``), so these tests need neither library installed; the check against the
real libraries is ``benchmarks/sae_interop_check.py``. Tolerances: each output is a float32 sum
of at most 40 products of O(1) terms, so a different summation order or a folded bias moves it by
at most about 40·2^-24·O(1) ≈ 3e-6; 1e-5 absolute and relative leaves room and still catches any
wrong weight, bias or latent (those move outputs by O(0.1) or more).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from actlab.errors import ActlabError
from actlab.sae import SparseAutoencoder, save_sae
from actlab.sae.foreign import TINY_THRESHOLD
from actlab.sae.interop import export_saelens, load_external, load_saelens, load_sparsify

torch.set_num_threads(1)
D, N, K, B = 12, 40, 5, 64
TOL = dict(atol=1e-5, rtol=1e-5)


def rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def inputs(d=D, seed=99):
    return rand(B, d, seed=seed)


# ---------------------------------------------------------------- the other libraries' forwards, written out
def saelens_forward(t, x, *, act, k=None, apply_b_dec=True, transcoder=False, rescale=False, scale=1.0, ft=None):
    """SAELens inference: (x·s - b_dec·apply) W_enc + b_enc, [×|W_dec rows|], act, [×ft], W_dec, + b_dec, / s, + skip."""
    sae_in = x * scale if transcoder or not apply_b_dec else x * scale - t["b_dec"]
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    norm = t["W_dec"].norm(dim=-1)
    if rescale:
        pre = pre * norm
    if act == "topk":
        values, index = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, index, values.relu())
    elif act == "jumprelu":
        z = pre.relu() * (pre > t["threshold"])
    else:
        z = pre.relu()
    acts = z / norm if rescale else z
    acts = acts * ft if ft is not None else acts
    out = (acts @ t["W_dec"] + t["b_dec"]) / scale
    if "W_skip" in t:
        out = out + x @ t["W_skip"].T
    return z, out


def sparsify_forward(t, x, k, transcode=False):
    """sparsify: top-k of relu(encoder(x [- b_dec])), an embedding-bag decode, + b_dec, + x W_skip^T."""
    pre = F.relu(F.linear(x if transcode else x - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
    values, index = pre.topk(k, dim=-1, sorted=False)
    out = F.embedding_bag(index, t["W_dec"], per_sample_weights=values, mode="sum") + t["b_dec"]
    if "W_skip" in t:
        out = out + x @ t["W_skip"].T
    return torch.zeros_like(pre).scatter(-1, index, values), out


def ours(sae, x):
    with torch.no_grad():
        z = sae.encode(x)
        return z, sae.decode(z, x)


# ---------------------------------------------------------------- files in their layouts
def saelens_tensors(d_out=D, *, threshold=False, skip=False, seed=0):
    t = {"W_enc": rand(D, N, seed=seed, scale=D ** -0.5), "b_enc": rand(N, seed=seed + 1, scale=0.3),
         "W_dec": rand(N, d_out, seed=seed + 2, scale=0.4), "b_dec": rand(d_out, seed=seed + 3, scale=0.5)}
    if threshold:
        t["threshold"] = rand(N, seed=seed + 4).abs() * 0.4
    if skip:
        t["W_skip"] = rand(d_out, D, seed=seed + 5, scale=0.2)
    return t


def write_saelens(folder, tensors, arch, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"sae_lens_version": "6.5.0", "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post"}
    cfg = {"architecture": arch, "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": meta, **fields}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


def sparsify_tensors(*, skip=False, seed=10, dtype=torch.float32):
    t = {"encoder.weight": rand(N, D, seed=seed, scale=D ** -0.5), "encoder.bias": rand(N, seed=seed + 1, scale=0.3),
         "W_dec": rand(N, D, seed=seed + 2, scale=0.4), "b_dec": rand(D, seed=seed + 3, scale=0.5)}
    if skip:
        t["W_skip"] = rand(D, D, seed=seed + 4, scale=0.2)
    return {k: v.to(dtype) for k, v in t.items()}


def write_sparsify(folder, tensors, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": N, "k": K,
           "multi_topk": False, "skip_connection": "W_skip" in tensors, "transcode": False, "d_in": D, **fields}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae.safetensors"))
    return folder


# ---------------------------------------------------------------- SAELens
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_sae_matches_its_forward(tmp_path, arch):
    t = saelens_tensors(threshold=arch == "jumprelu")
    folder = write_saelens(tmp_path / arch, t, arch, **({"k": K, "rescale_acts_by_decoder_norm": False}
                                                         if arch == "topk" else {}))
    sae, info = load_saelens(folder)
    x = inputs()
    z_ref, out_ref = saelens_forward(t, x, act={"standard": "relu"}.get(arch, arch), k=K)
    z, out = ours(sae, x)
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(out, out_ref, **TOL)
    assert sae.kind == {"standard": "relu"}.get(arch, arch) and not sae.training
    assert (info["format"], info["hook_name"], info["model_name"], info["d_in"]) == \
        ("saelens", "blocks.3.hook_resid_post", "gpt2", D)
    if arch == "jumprelu":  # the thresholds really gate: some positive pre-activations are cut
        pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
        assert bool(((pre > 0) & (z_ref == 0)).any())


def test_saelens_jumprelu_thresholds_at_or_below_zero_are_clamped(tmp_path):
    t = saelens_tensors(threshold=True)
    t["threshold"][:4] = torch.tensor([0.0, -0.5, -3.0, 0.0])
    sae, info = load_saelens(write_saelens(tmp_path / "j", t, "jumprelu"))
    assert info["thresholds_clamped"] == 4 and bool(torch.isfinite(sae.log_threshold).all())
    # the clamped thresholds sit at the smallest normal float32, above zero; exp(log(t)) returns t to within
    # exp's relative error at |log t| = 87.3, about half an ulp of 87.3 (2^-18 ≈ 4e-6)
    torch.testing.assert_close(sae.thresholds[:4].detach(), torch.full((4,), TINY_THRESHOLD), rtol=1e-5, atol=0)
    assert bool((sae.thresholds[:4] > 0).all())
    z_ref, out_ref = saelens_forward(t, inputs(), act="jumprelu")
    z, out = ours(sae, inputs())
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(out, out_ref, **TOL)


def test_saelens_without_b_dec_on_input_is_folded_into_b_enc(tmp_path):
    t = saelens_tensors()
    sae, info = load_saelens(write_saelens(tmp_path / "s", t, "topk", k=K, apply_b_dec_to_input=False))
    z_ref, out_ref = saelens_forward(t, inputs(), act="topk", k=K, apply_b_dec=False)
    z, out = ours(sae, inputs())
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(out, out_ref, **TOL)
    assert info["folded"] == ["apply_b_dec_to_input"]
    torch.testing.assert_close(sae.b_enc, t["b_enc"] + t["b_dec"] @ t["W_enc"], **TOL)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_saelens_decoder_norm_rescaling_is_folded(tmp_path, arch):
    """TopK with rescale_acts_by_decoder_norm, and a BatchTopK training checkpoint (JumpReLU at topk_threshold)."""
    t = saelens_tensors()
    t["W_dec"] = t["W_dec"] * rand(N, 1, seed=7).abs().add(0.2)  # rows of unequal norms: the rescale matters
    extra = {"k": K} if arch == "topk" else {"k": 4.0, "topk_threshold_lr": 0.01}
    if arch == "batchtopk":
        t["topk_threshold"] = torch.tensor(0.3, dtype=torch.float64)
    sae, info = load_saelens(write_saelens(tmp_path / arch, t, arch, rescale_acts_by_decoder_norm=True, **extra))
    ref_t = {**t, "threshold": torch.full((N,), 0.3)}
    z_ref, out_ref = saelens_forward(ref_t, inputs(), act="topk" if arch == "topk" else "jumprelu", k=K, rescale=True)
    z, out = ours(sae, inputs())
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(out, out_ref, **TOL)
    assert "rescale_acts_by_decoder_norm" in info["folded"]
    assert sae.kind == ("topk" if arch == "topk" else "jumprelu")


def test_saelens_5_layout(tmp_path):
    """A SAELens 5 cfg: flat fields, hook_point, TopK as activation_fn_str + kwargs, a fine-tuning scale."""
    t = saelens_tensors()
    t["scaling_factor"] = rand(N, seed=8).abs() + 0.5
    folder = tmp_path / "old"
    folder.mkdir()
    cfg = {"architecture": "standard", "d_in": D, "d_sae": N, "dtype": "float32", "model_name": "pythia-70m",
           "hook_point": "blocks.1.hook_resid_pre", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "apply_b_dec_to_input": True, "normalize_activations": False, "finetuning_scaling_factor": True,
           "sae_lens_training_version": "3.5.0"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(t, str(folder / "sae_weights.safetensors"))
    sae, info = load_saelens(folder)
    z_ref, out_ref = saelens_forward(t, inputs(), act="topk", k=K, ft=t["scaling_factor"])
    z, out = ours(sae, inputs())
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(out, out_ref, **TOL)
    assert (info["hook_name"], info["model_name"], sae.kind, sae.k) == ("blocks.1.hook_resid_pre", "pythia-70m", "topk", K)


def test_saelens_expected_average_norm_scaling(tmp_path):
    t = saelens_tensors()
    folder = write_saelens(tmp_path / "n", t, "standard", normalize_activations="expected_average_only_in")
    with pytest.raises(ActlabError, match="norm_scaling_factor"):
        load_saelens(folder)
    z_ref, out_ref = saelens_forward(t, inputs(), act="relu", scale=2.7)
    sae, info = load_saelens(folder, norm_scaling_factor=2.7)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.7}))
    from_file, _ = load_saelens(folder)  # a training checkpoint's scaler file gives the same
    for model in (sae, from_file):
        z, out = ours(model, inputs())
        torch.testing.assert_close(z, z_ref, **TOL)
        torch.testing.assert_close(out, out_ref, **TOL)
    assert info["input_scale"] == 2.7
    with pytest.raises(ActlabError, match="positive finite"):
        load_saelens(folder, norm_scaling_factor=-1.0)


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_transcoders(tmp_path, arch):
    d_out = 9
    t = saelens_tensors(d_out, threshold="jumprelu" in arch, skip="skip" in arch)
    meta = {"sae_lens_version": "6.5.0", "hook_name": "blocks.2.ln2.hook_normalized", "hook_name_out": "blocks.2.hook_mlp_out"}
    sae, info = load_saelens(write_saelens(tmp_path / arch, t, arch, d_out=d_out, apply_b_dec_to_input=False,
                                           metadata=meta))
    z_ref, out_ref = saelens_forward(t, inputs(), act="jumprelu" if "jumprelu" in arch else "relu", transcoder=True)
    z, out = ours(sae, inputs())
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(out, out_ref, **TOL)
    assert sae.transcoder and sae.d_out == d_out and sae.skip == ("skip" in arch)
    assert (info["d_out"], info["hook_name_out"]) == (d_out, "blocks.2.hook_mlp_out")


# ---------------------------------------------------------------- export, and back
def our_sae(kind, *, transcoder=False, skip=False, s_in=4.0, s_out=0.5, seed=3):
    sae = SparseAutoencoder(D, N, kind, K if kind in ("topk", "batchtopk") else None,
                            d_out=9 if transcoder else None, skip=skip, seed=seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(rand(*p.shape, seed=seed + len(name), scale=0.4))
        if kind == "jumprelu":
            sae.log_threshold.copy_(rand(N, seed=5, scale=0.5) - 1.5)
        if kind == "batchtopk":
            sae.threshold.fill_(0.35)
            sae.threshold_count.fill_(10)
        sae.input_scale.fill_(s_in)
        if transcoder:
            sae.output_scale.fill_(s_out)
    return sae.eval()


CASES = [("topk", False, False), ("relu", False, False), ("jumprelu", False, False), ("batchtopk", False, False),
         ("relu", True, False), ("relu", True, True), ("jumprelu", True, False), ("jumprelu", True, True),
         ("batchtopk", True, True)]


@pytest.mark.parametrize("kind,transcoder,skip", CASES)
def test_export_is_saelens_forward_of_ours_and_round_trips_exactly(tmp_path, kind, transcoder, skip):
    """The written files, run through SAELens's forward, give our outputs; read back, they give them bit for bit
    (scales that are powers of two fold exactly; the thresholds' exp/log moves them by an ulp at most, which a
    pre-activation of these random inputs does not fall within)."""
    sae = our_sae(kind, transcoder=transcoder, skip=skip)
    folder = export_saelens(sae, tmp_path / "out", hook_name="blocks.0.hook_resid_post", model_name="demo")
    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(str(folder / "sae_weights.safetensors"))
    act = {"relu": "relu", "topk": "topk"}.get(kind, "jumprelu")
    x = inputs()
    z_ref, out_ref = saelens_forward(t, x, act=act, k=K, apply_b_dec=cfg["apply_b_dec_to_input"], transcoder=transcoder)
    z, out = ours(sae, x)
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(out, out_ref, **TOL)
    back, info = load_saelens(folder)
    z2, out2 = ours(back, x)
    assert torch.equal(z2, z) and torch.equal(out2, out)
    assert (info["hook_name"], info["model_name"], back.input_scale.item()) == ("blocks.0.hook_resid_post", "demo", 1.0)
    assert bool((z > 0).any()) and bool((z == 0).any())  # sparse, not empty


def test_export_folds_any_scale(tmp_path):
    sae = our_sae("topk", s_in=0.37)
    back, _ = load_saelens(export_saelens(sae, tmp_path / "o"))
    for a, b in zip(ours(back, inputs()), ours(sae, inputs())):
        torch.testing.assert_close(a, b, **TOL)


def test_export_refuses_what_saelens_cannot_hold(tmp_path):
    cases = [(our_sae("topk", transcoder=True), "no TopK transcoder"),
             (our_sae("topk", skip=True), "no SAE with a skip"),
             (SparseAutoencoder(D, N, "batchtopk", K), "never trained"),
             ("not an sae", "takes an actlab SparseAutoencoder")]
    for sae, message in cases:
        with pytest.raises(ActlabError, match=message):
            export_saelens(sae, tmp_path / "x")
    broken = our_sae("relu")
    with torch.no_grad():
        broken.W_dec[0, 0] = float("nan")
    with pytest.raises(ActlabError, match="W_dec .*NaN"):
        export_saelens(broken, tmp_path / "x")
    with pytest.raises(ActlabError, match="hook_name should be a string"):
        export_saelens(our_sae("relu"), tmp_path / "x", hook_name=3)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- sparsify
@pytest.mark.parametrize("skip,transcode", [(False, False), (True, False), (True, True), (False, True)])
def test_sparsify_matches_its_forward(tmp_path, skip, transcode):
    t = sparsify_tensors(skip=skip)
    run = tmp_path / "run"
    folder = write_sparsify(run / "layers.4.mlp" if transcode else run / "layers.4", t, transcode=transcode)
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-160m", "batch_size": 8}))
    sae, info = load_sparsify(folder)
    z_ref, out_ref = sparsify_forward(t, inputs(), K, transcode)
    z, out = ours(sae, inputs())
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(out, out_ref, **TOL)
    assert (sae.kind, sae.k, sae.skip, sae.transcoder) == ("topk", K, skip, transcode)
    assert (info["format"], info["model_name"], info["hook"]) == ("sparsify", "EleutherAI/pythia-160m", folder.name)


def test_sparsify_bfloat16_and_expansion_factor(tmp_path):
    """sparsify usually saves bf16 and may give the width as d_in · expansion_factor (num_latents 0)."""
    t = sparsify_tensors(dtype=torch.bfloat16)
    folder = write_sparsify(tmp_path / "layers.0", t, num_latents=0, expansion_factor=4)
    with pytest.raises(ActlabError, match=r"encoder.weight' should be floating point \[48, 12\]"):
        load_sparsify(folder)  # 12·4 = 48 latents, but the file has 40
    write_sparsify(folder, t)
    sae, _ = load_sparsify(folder)
    z_ref, out_ref = sparsify_forward({k: v.float() for k, v in t.items()}, inputs(), K)
    z, out = ours(sae, inputs())
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(out, out_ref, **TOL)


def test_sparsify_run_with_several_hooks(tmp_path):
    for i, hook in enumerate(["layers.10", "layers.2", "embed_tokens"]):
        write_sparsify(tmp_path / hook, sparsify_tensors(seed=20 + i))
    with pytest.raises(ActlabError, match=r"3 hooks \(embed_tokens, layers.2, layers.10\).*hook='embed_tokens'"):
        load_sparsify(tmp_path)
    sae, info = load_sparsify(tmp_path, hook="layers.2")
    direct, _ = load_sparsify(tmp_path / "layers.2")
    assert info["hook"] == "layers.2" and torch.equal(sae.W_enc, direct.W_enc)
    with pytest.raises(ActlabError, match="no hook 'layers.7'.*embed_tokens, layers.2, layers.10"):
        load_sparsify(tmp_path, hook="layers.7")
    with pytest.raises(ActlabError, match="one hook subfolder"):
        load_sparsify(tmp_path, hook="../x")
    only = tmp_path / "single"
    write_sparsify(only / "layers.5", sparsify_tensors(seed=30))
    assert load_sparsify(only)[1]["hook"] == "layers.5"


# ---------------------------------------------------------------- damaged and foreign files
def _saelens_ok(tmp_path):
    return write_saelens(tmp_path / "ok", saelens_tensors(), "topk", k=K)


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _edit_tensors(folder, name="sae_weights.safetensors", **changes):
    t = load_file(str(folder / name))
    t.update(changes)
    save_file({k: v for k, v in t.items() if v is not None}, str(folder / name))


SAELENS_DAMAGE = [
    (lambda f: (f / "cfg.json").unlink(), "no cfg.json"),
    (lambda f: (f / "sae_weights.safetensors").unlink(), "no sae_weights.safetensors"),
    (lambda f: (f / "cfg.json").write_text("{not json"), "cfg.json.*not readable JSON"),
    (lambda f: (f / "cfg.json").write_text("[1, 2]"), "JSON object, not list"),
    (lambda f: (f / "sae_weights.safetensors").write_bytes(b"garbage" * 10), "not a readable safetensors"),
    (lambda f: _edit_cfg(f, d_sae="40"), "'d_sae' should be an integer, not '40'"),
    (lambda f: _edit_cfg(f, d_in=True), "'d_in' should be an integer, not True"),
    (lambda f: _edit_cfg(f, d_sae=41), r"tensor 'W_enc' should be floating point \[12, 41\] \(cfg.json has d_in 12, d_sae 41"),
    (lambda f: _edit_cfg(f, k=N + 1), "'k' .* is larger than d_sae"),
    (lambda f: _edit_cfg(f, architecture="gated"), "'gated'.*no equivalent"),
    (lambda f: _edit_cfg(f, architecture="matching_pursuit"), "architecture 'matching_pursuit' is not one actlab reads"),
    (lambda f: _edit_cfg(f, normalize_activations="layer_norm"), "'layer_norm'.*cannot represent"),
    (lambda f: _edit_cfg(f, normalize_activations="constant_norm_rescale"), "cannot represent"),
    (lambda f: _edit_cfg(f, normalize_activations="covariance_whitening"), "fold_activation_whitening"),
    (lambda f: _edit_cfg(f, normalize_activations="sometimes"), "'sometimes', which actlab does not know"),
    (lambda f: _edit_cfg(f, dtype="int8"), "'dtype' is 'int8'"),
    (lambda f: _edit_cfg(f, metadata={"sae_lens_version": "six"}), "not a version number"),
    (lambda f: _edit_cfg(f, metadata={"sae_lens_version": "6.1", "hook_name": 3}), "'metadata.hook_name' should be a string"),
    (lambda f: _edit_cfg(f, architecture="transcoder", d_out=D), "apply_b_dec_to_input': false"),
    (lambda f: _edit_tensors(f, W_dec=torch.full((N, D), float("nan"))), "'W_dec' has 480 values that are NaN"),
    (lambda f: _edit_tensors(f, b_enc=torch.zeros(N, dtype=torch.int64)), "'b_enc' should be floating point"),
    (lambda f: _edit_tensors(f, W_enc=torch.zeros(N, D)), r"'W_enc' should be floating point \[12, 40\].*not torch.float32 \[40, 12\]"),
    (lambda f: _edit_tensors(f, b_dec=None), "has no tensor 'b_dec'"),
    (lambda f: _edit_tensors(f, log_threshold=torch.zeros(N)), r"does not have: \['log_threshold'\]"),
    (lambda f: _edit_tensors(f, scaling_factor=torch.full((N,), 2.0)), "finetuning_scaling_factor is false"),
]


@pytest.mark.parametrize("damage,message", SAELENS_DAMAGE)
def test_damaged_saelens_folder_is_a_clear_error(tmp_path, damage, message):
    folder = _saelens_ok(tmp_path)
    load_saelens(folder)  # intact, it loads
    damage(folder)
    with pytest.raises(ActlabError, match=message) as err:
        load_saelens(folder)
    assert str(folder) in str(err.value)


SPARSIFY_DAMAGE = [
    (lambda f: _edit_cfg(f, activation="groupmax"), "groupmax"),
    (lambda f: _edit_cfg(f, signed=True), "'signed' is true"),
    (lambda f: _edit_cfg(f, d_in=None), "'d_in' should be an integer, not None"),
    (lambda f: _edit_cfg(f, k=N + 1), "k = 41 is not a valid shape"),
    (lambda f: _edit_cfg(f, skip_connection=True), "has no tensor 'W_skip'"),
    (lambda f: _edit_cfg(f, transcode="yes"), "'transcode' should be true or false"),
    (lambda f: _edit_tensors(f, "sae.safetensors", W_dec=None), "has no tensor 'W_dec'"),
    (lambda f: _edit_tensors(f, "sae.safetensors", **{"encoder.bias": torch.tensor([float("inf")] * N)}), "NaN or infinite"),
    (lambda f: _edit_tensors(f, "sae.safetensors", W_skip=torch.zeros(D, D)), r"does not have: \['W_skip'\]"),
]


@pytest.mark.parametrize("damage,message", SPARSIFY_DAMAGE)
def test_damaged_sparsify_folder_is_a_clear_error(tmp_path, damage, message):
    folder = write_sparsify(tmp_path / "layers.1", sparsify_tensors())
    load_sparsify(folder)
    damage(folder)
    with pytest.raises(ActlabError, match=message):
        load_sparsify(folder)


# ---------------------------------------------------------------- load_external
def test_load_external_tells_the_layouts_apart(tmp_path):
    x = inputs()
    mine = our_sae("jumprelu")
    path = save_sae(tmp_path / "mine.safetensors", mine, site="resid.1")
    saelens_dir = export_saelens(mine, tmp_path / "saelens")
    sparsify_dir = write_sparsify(tmp_path / "run" / "layers.3", sparsify_tensors())
    write_sparsify(tmp_path / "run" / "layers.4", sparsify_tensors(seed=50))
    for where, fmt, kw in [(path, "actlab.sae", {}), (saelens_dir, "saelens", {}),
                           (saelens_dir / "cfg.json", "saelens", {}), (sparsify_dir, "sparsify", {}),
                           (tmp_path / "run", "sparsify", {"hook": "layers.3"})]:
        sae, info = load_external(where, **kw)
        assert info["format"] == fmt
        if fmt != "sparsify":
            assert torch.equal(ours(sae, x)[1], ours(mine, x)[1])
    assert load_external(path)[1]["site"] == "resid.1"
    with pytest.raises(ActlabError, match="several|2 hooks"):
        load_external(tmp_path / "run")


def test_load_external_refuses_the_unknown(tmp_path):
    (tmp_path / "empty").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "notes.txt").write_text("hello")
    for where, message in [(tmp_path / "empty", "holds no SAE that actlab reads: expected .*cfg.json \\+ sae_weights"),
                           (tmp_path / "other.safetensors", "not an actlab SAE file"),
                           (tmp_path / "notes.txt", "not a safetensors file"),
                           (tmp_path / "missing", "does not exist")]:
        with pytest.raises(ActlabError, match=message):
            load_external(where)
    saelens_dir = export_saelens(our_sae("relu"), tmp_path / "s")
    with pytest.raises(ActlabError, match="hook= is for sparsify"):
        load_external(saelens_dir, hook="layers.1")
    with pytest.raises(ActlabError, match="norm_scaling_factor is only for"):
        load_external(saelens_dir, norm_scaling_factor=2.0)
