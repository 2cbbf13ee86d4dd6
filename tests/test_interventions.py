"""Interventions on tiny random models: files, algebra, positions, clamps, refusals, fitting maths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

import actlab
from actlab.errors import ActlabError
from actlab.interventions import (
    AffineMap, Composition, LowRankAdapter, NeuronClamp, SteeringVector, load_interventions, load_with_coef,
)
from actlab.interventions.contrast import ContrastSet
from actlab.interventions.fit import dimension_vector, fit_steering, pca_direction, random_like
from tiny_models import ByteTokenizer, tiny_config, tiny_model

D = 32  # tiny models' width


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=gen(seed)) * scale


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def all_types(model, site="resid.1"):
    ident = model.identity()
    U = torch.linalg.qr(randn(D, 3, seed=4))[0].contiguous()  # (QR returns a column-major tensor)
    R = torch.linalg.qr(randn(D, 2, seed=7))[0].T.contiguous()
    return {
        "steering_vector": SteeringVector(site=site, vector=randn(D, seed=1), coef=1.5, positions="generated",
                                          model=ident, params={"method": "mean-diff", "note": [1, 2]}),
        "steering_vector_np": SteeringVector(site=site, vector=randn(D, seed=2), norm_preserving=True, model=ident),
        "affine": AffineMap(site=site, bias=randn(D, seed=3, scale=0.1), diag=randn(D, seed=5, scale=0.1),
                            U=U, V=randn(D, 3, seed=6, scale=0.1), coef=0.7, model=ident),
        "affine_bias_only": AffineMap(site=site, bias=randn(D, seed=8), model=ident),
        "neuron_clamp": NeuronClamp(site="mlp.hidden.1", neurons=[0, 5, 7], values=[1.5, -2.0, 0.25], coef=2.0,
                                    positions="prompt", model=ident, params={"site_width": 48}),
        "low_rank_adapter": LowRankAdapter(site=site, R=R, W=randn(2, D, seed=9, scale=0.3),
                                           b=randn(2, seed=10), coef=-0.5, model=ident),
    }


def assert_same_intervention(a, b):
    assert type(a) is type(b)
    assert (a.site, a.coef, a.positions, a.model, a.params) == (b.site, b.coef, b.positions, b.model, b.params)
    for name in a.tensor_names:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name


# ------------------------------------------------------------------------------- files
@pytest.mark.parametrize("kind", ["steering_vector", "steering_vector_np", "affine", "affine_bias_only",
                                  "neuron_clamp", "low_rank_adapter"])
def test_save_load_round_trip_is_exact(llama, tmp_path, kind):
    item = all_types(llama)[kind]
    path = item.save(tmp_path / f"{kind}.safetensors")
    back = load_interventions(path, llama)
    assert_same_intervention(item, back)
    h = randn(2, 5, llama.sites[item.site], seed=11)
    assert torch.equal(item.apply(h), back.apply(h))


def test_composition_round_trip_keeps_order(llama, tmp_path):
    items = list(all_types(llama).values())
    path = Composition(items).save(tmp_path / "all.safetensors")
    back = load_interventions(path, llama)
    assert isinstance(back, Composition) and len(back) == len(items)
    for a, b in zip(items, back):
        assert_same_intervention(a, b)
    scaled = load_with_coef(f"{path}:2.5", llama)
    assert [i.coef for i in scaled] == [2.5 * i.coef for i in items]


# ------------------------------------------------------------------------------- algebra
def captured(model, site, text, *edits):
    with model.edit(*edits), model.capture(site) as cap:
        out = model(text)
    return cap[site][0], out.logits[0]


def test_composition_applies_in_order_and_equals_manual_application(llama):
    text = "composition order"
    clamp = NeuronClamp(site="resid.1", neurons=[3, 4], values=[2.0, -1.0], model=llama.identity(),
                        params={"site_width": D})
    vec = SteeringVector(site="resid.1", vector=randn(D, seed=1), model=llama.identity())
    h, _ = captured(llama, "resid.1", text)
    both, logits = captured(llama, "resid.1", text, clamp + vec)
    torch.testing.assert_close(both, vec.apply(clamp.apply(h)), rtol=0, atol=1e-6)
    reversed_, _ = captured(llama, "resid.1", text, vec + clamp)
    torch.testing.assert_close(reversed_, clamp.apply(vec.apply(h)), rtol=0, atol=1e-6)
    assert not torch.allclose(both, reversed_)  # order matters for a clamp and a shift of the same channels

    class Manual:  # the same edit written by hand, as a plain engine edit
        site = "resid.1"

        def __call__(self, h, state):
            h = h.clone()
            h[..., [3, 4]] = torch.tensor([2.0, -1.0])
            return h + vec.vector

    _, manual_logits = captured(llama, "resid.1", text, Manual())
    torch.testing.assert_close(logits, manual_logits, rtol=0, atol=1e-5)
    # compositions across sites: same as applying the edits together
    other = SteeringVector(site="resid.0", vector=randn(D, seed=2), model=llama.identity())
    _, a = captured(llama, "resid.2", text, Composition([other, vec]))
    _, b = captured(llama, "resid.2", text, other, vec)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_scaling_multiplies_the_coefficient(llama):
    vec = SteeringVector(site="resid.1", vector=randn(D, seed=1), coef=0.5, model=llama.identity())
    scaled = vec * 4.0
    assert scaled.coef == 2.0 and vec.coef == 0.5 and (4.0 * vec).coef == 2.0 and (-vec).coef == -0.5
    assert torch.equal(scaled.vector, vec.vector)
    h, _ = captured(llama, "resid.1", "scale me")
    s, _ = captured(llama, "resid.1", "scale me", scaled)
    torch.testing.assert_close(s - h, (2.0 * vec.vector).expand_as(h), rtol=0, atol=1e-5)
    comp = (vec + vec) * 3
    assert [i.coef for i in comp] == [1.5, 1.5]
    adapter = all_types(llama)["low_rank_adapter"]
    torch.testing.assert_close((adapter * 4.0).apply(h) - h, 4.0 * (adapter.apply(h) - h), rtol=1e-5, atol=1e-5)


def test_norm_preserving_keeps_per_token_norms(llama):
    vec = SteeringVector(site="resid.1", vector=randn(D, seed=3, scale=5.0), norm_preserving=True,
                         model=llama.identity())
    h, _ = captured(llama, "resid.1", "keep the norms please")
    s, _ = captured(llama, "resid.1", "keep the norms please", vec * 2.0)
    torch.testing.assert_close(s.norm(dim=-1), h.norm(dim=-1), rtol=1e-5, atol=1e-6)
    cos_before = torch.nn.functional.cosine_similarity(h, vec.vector.expand_as(h), dim=-1)
    cos_after = torch.nn.functional.cosine_similarity(s, vec.vector.expand_as(s), dim=-1)
    assert (cos_after > cos_before + 0.1).all()  # the direction moved toward the vector


# ------------------------------------------------------------------------- positions + cache
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_intervention_with_kv_cache_equals_no_cache(arch, positions):
    model = tiny_model(arch)
    prompts = ["hello there friend", "hi"]  # left padding too
    ident = model.identity()
    edits = Composition([
        SteeringVector(site="resid.1", vector=randn(D, seed=1, scale=3.0), positions=positions, model=ident),
        AffineMap(site="resid.0", bias=randn(D, seed=2), diag=randn(D, seed=3, scale=0.5), positions=positions,
                  model=ident),
    ])
    plain = model.generate(prompts, max_new_tokens=6, return_ids=True)
    with model.edit(edits):
        cached = model.generate(prompts, max_new_tokens=6, return_ids=True)
        uncached = model.generate(prompts, max_new_tokens=6, return_ids=True, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)


def test_generated_positions_leave_the_prompt_alone(llama):
    vec = SteeringVector(site="resid.1", vector=randn(D, seed=1, scale=3.0), positions="generated",
                         model=llama.identity())
    with llama.edit(vec), llama.capture("resid.1") as cap:
        llama.generate(["a prompt"], max_new_tokens=3)
    with llama.capture("resid.1") as plain:
        llama.generate(["a prompt"], max_new_tokens=3)
    n = len("a prompt".encode())
    torch.testing.assert_close(cap["resid.1"][0, :n], plain["resid.1"][0, :n], rtol=0, atol=0)
    assert not torch.allclose(cap["resid.1"][0, n:], plain["resid.1"][0, n:])


# ------------------------------------------------------------------------------- clamps
def test_clamp_sets_exact_values(llama):
    clamp = NeuronClamp(site="mlp.hidden.1", neurons=[0, 5, 47], values=[1.5, -2.0, 0.25], model=llama.identity(),
                        params={"site_width": 48})
    h, _ = captured(llama, "mlp.hidden.1", "clamp these neurons")
    c, _ = captured(llama, "mlp.hidden.1", "clamp these neurons", clamp * 2.0)
    assert torch.equal(c[:, [0, 5, 47]], torch.tensor([3.0, -4.0, 0.5]).expand(c.shape[0], 3))
    keep = [i for i in range(c.shape[1]) if i not in (0, 5, 47)]
    assert torch.equal(c[:, keep], h[:, keep])
    z, _ = captured(llama, "mlp.hidden.1", "clamp these neurons", clamp * 0.0)  # zero-ablation
    assert torch.equal(z[:, [0, 5, 47]], torch.zeros(z.shape[0], 3))
    # with a site width, positions apply: a prompt-only clamp leaves generated tokens alone
    prompt_only = NeuronClamp(site="mlp.hidden.1", neurons=[2], values=[9.0], positions="prompt",
                              model=llama.identity(), params={"site_width": 48})
    with llama.edit(prompt_only), llama.capture("mlp.hidden.1") as cap:
        llama.generate(["abc"], max_new_tokens=3)
    acts = cap["mlp.hidden.1"][0, :, 2]
    assert torch.equal(acts[:3], torch.full((3,), 9.0)) and not (acts[3:] == 9.0).any()
    with pytest.raises(ActlabError, match="out of range"):
        captured(llama, "mlp.hidden.1", "x", NeuronClamp(site="mlp.hidden.1", neurons=[48], values=[1.0],
                                                         params={"site_width": 48}))


def test_clamp_without_site_width_applies(llama):
    clamp = NeuronClamp(site="mlp.hidden.1", neurons=[1], values=[4.0])
    c, _ = captured(llama, "mlp.hidden.1", "clamp", clamp)
    assert (c[:, 1] == 4.0).all()


# ---------------------------------------------------------------------- refusing other models
def wide_llama():
    cfg = tiny_config("llama")
    cfg.hidden_size = 48
    torch.manual_seed(0)
    return actlab.load(T.LlamaForCausalLM(cfg).eval(), tokenizer=ByteTokenizer())


def test_file_for_another_model_is_refused(llama, tmp_path):
    path = SteeringVector(site="resid.1", vector=randn(D), model=llama.identity()).save(tmp_path / "v.safetensors")
    with pytest.raises(ActlabError, match="paste") as wide:
        load_interventions(path, wide_llama())
    assert "width" in str(wide.value) and "\n" not in str(wide.value)
    gpt2 = tiny_model("gpt2")  # same width (32) and site, another architecture
    assert gpt2.sites["resid.1"] == D
    with pytest.raises(ActlabError, match="another configuration") as other:
        load_interventions(path, gpt2)
    assert "paste" in str(other.value) and "\n" not in str(other.value)
    with pytest.raises(ActlabError, match="paste"):
        load_with_coef(f"{path}:2", gpt2)
    with pytest.raises(ActlabError, match="paste"):  # applying it directly is refused too
        gpt2.edit(load_interventions(path))
    assert load_interventions(path, llama).width == D  # the model it was made for accepts it


# ---------------------------------------------------------------------------- bad input
def one_line_error(fn, match):
    with pytest.raises(ActlabError, match=match) as exc:
        fn()
    assert "\n" not in str(exc.value), str(exc.value)


def test_bad_inputs_are_one_line_actlab_errors(llama, tmp_path):
    vec = SteeringVector(site="resid.1", vector=randn(D), model=llama.identity())
    path = vec.save(tmp_path / "v.safetensors")
    for bad in (float("nan"), float("inf"), -float("inf")):
        one_line_error(lambda: vec * bad, "NaN or inf")
        one_line_error(lambda: SteeringVector(site="resid.1", vector=randn(D), coef=bad), "NaN or inf")
    one_line_error(lambda: load_with_coef(f"{path}:nan", llama), "NaN or inf")
    one_line_error(lambda: load_with_coef(f"{path}:four", llama), "FILE:COEF")
    one_line_error(lambda: SteeringVector(site="resid.1", vector=torch.full((D,), float("nan"))), "NaN or inf")
    narrow = SteeringVector(site="resid.1", vector=randn(D - 1))
    one_line_error(lambda: llama.edit(narrow), "width")
    one_line_error(lambda: narrow(torch.zeros(1, 2, D), llama.hooks.state), "width")
    one_line_error(lambda: llama.edit(SteeringVector(site="resid.99", vector=randn(D))), "resid.99")
    one_line_error(lambda: llama.edit(SteeringVector(site="nowhere.1", vector=randn(D))), "unknown site")
    one_line_error(lambda: fit_steering(llama, ContrastSet(["a b"], ["c d"]), "resid.99"), "resid.99")
    one_line_error(lambda: fit_steering(llama, ContrastSet([], ["c d"]), "resid.1"), "empty contrast set")
    one_line_error(lambda: fit_steering(llama, ContrastSet(["a"], []), "resid.1"), "empty contrast set")
    one_line_error(lambda: fit_steering(llama, ContrastSet(["a", "b"], ["c"], ["p", "q"]), "resid.1"),
                   "unbalanced pairs")
    one_line_error(lambda: fit_steering(llama, ContrastSet(["a b"], ["c d"]), "resid.1", method="magic"),
                   "unknown method")
    one_line_error(lambda: SteeringVector(site="resid.1", vector=randn(D), positions="middle"), "positions")
    one_line_error(lambda: load_interventions(tmp_path / "missing.safetensors"), "does not exist")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    one_line_error(lambda: load_interventions(tmp_path / "junk.safetensors"), "safetensors")


def test_read_contrast_refuses_bad_files(tmp_path):
    from actlab.interventions.contrast import read_contrast

    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "pos": "b"}\n')
    one_line_error(lambda: read_contrast(bad), "pos")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    one_line_error(lambda: read_contrast(empty), "empty contrast set")


# ------------------------------------------------------------------------------- fitting
POS = ["the holy word of the lord", "and he spake unto them", "blessed are the meek"]
NEG = ["run make install then reboot", "the compiler emits a warning", "set the flag to zero", "chmod it"]


def mean_acts(model, texts, site, prompts=None):
    """numpy reference: per example, mean over its (completion) tokens of the captured site."""
    rows = []
    for i, text in enumerate(texts):
        prompt = prompts[i] if prompts else ""
        with model.capture(site) as cap:
            model(prompt + text)
        acts = cap[site][0].double().numpy()
        rows.append(acts[len(prompt.encode()):].mean(0))  # ByteTokenizer: one token per byte
    return np.stack(rows)


def test_mean_diff_equals_numpy_reference(llama):
    vec = fit_steering(llama, ContrastSet(POS, NEG), "resid.1")["resid.1"]
    ref = mean_acts(llama, POS, "resid.1").mean(0) - mean_acts(llama, NEG, "resid.1").mean(0)
    np.testing.assert_allclose(vec.vector.numpy(), ref, rtol=1e-4, atol=1e-5)
    assert vec.params["method"] == "mean-diff" and vec.model == llama.identity()
    # pairs: the shared prompt is excluded from each example's mean
    prompts = ["so it goes: ", "then ", "lo, "]
    paired = fit_steering(llama, ContrastSet(POS, NEG[:3], prompts), "resid.0-2")
    assert list(paired) == ["resid.0", "resid.1", "resid.2"]
    for site, v in paired.items():
        ref = mean_acts(llama, POS, site, prompts).mean(0) - mean_acts(llama, NEG[:3], site, prompts).mean(0)
        np.testing.assert_allclose(v.vector.numpy(), ref, rtol=1e-4, atol=1e-5)
    # last-token aggregation
    last = fit_steering(llama, ContrastSet(POS, NEG), "resid.1", aggregate="last")["resid.1"]
    ref_last = []
    for texts in (POS, NEG):
        acts = []
        for t in texts:
            with llama.capture("resid.1") as cap:
                llama(t)
            acts.append(cap["resid.1"][0, -1].double().numpy())
        ref_last.append(np.mean(acts, 0))
    np.testing.assert_allclose(last.vector.numpy(), ref_last[0] - ref_last[1], rtol=1e-4, atol=1e-5)


def test_dims_keeps_the_top_cohens_d_dimensions(llama):
    m = 5
    vec = fit_steering(llama, ContrastSet(POS, NEG), "resid.2", method="dims", dims=m)["resid.2"]
    p, n = mean_acts(llama, POS, "resid.2"), mean_acts(llama, NEG, "resid.2")
    pooled = np.sqrt((p.var(0) + n.var(0)) / 2)
    d = (p.mean(0) - n.mean(0)) / np.maximum(pooled, 1e-6)
    top = set(np.argsort(-np.abs(d))[:m].tolist())
    nonzero = set(torch.nonzero(vec.vector).flatten().tolist())
    assert len(nonzero) == m and nonzero == top == set(vec.params["dims"])
    diff = p.mean(0) - n.mean(0)
    np.testing.assert_allclose(vec.vector.numpy()[sorted(top)], diff[sorted(top)], rtol=1e-4, atol=1e-5)
    # synthetic: the planted dimensions win even when another dimension has a larger raw difference
    pos, neg = randn(200, 16, seed=1), randn(200, 16, seed=2)
    pos[:, [3, 9]] += 1.5  # separated by 1.5 sd
    pos[:, 0] = pos[:, 0] * 20 + 5  # a larger mean shift, but 20x noisier (d ~ 0.35)
    neg[:, 0] = neg[:, 0] * 20
    v, dims = dimension_vector(pos, neg, 2)
    assert dims.tolist() == [3, 9] and torch.count_nonzero(v) == 2


def test_pca_direction_aligns_with_planted_direction():
    torch.manual_seed(0)
    d, n = 64, 80
    planted = randn(d, seed=3)
    planted = planted / planted.norm()
    base = randn(n, d, seed=4, scale=2.0)  # shared content of each pair: cancels in the differences
    size = 3.0 + torch.rand(n, generator=gen(5))  # per-pair strength of the concept
    pos = base + size[:, None] * planted + randn(n, d, seed=6, scale=0.3)
    neg = base + randn(n, d, seed=7, scale=0.3)
    vec, explained = pca_direction(pos, neg, paired=True)
    cos = float(torch.nn.functional.cosine_similarity(vec, planted, dim=0))
    assert cos > 0.99 and explained > 0.5
    # oriented and scaled like the mean difference: its projection on the direction
    mean_diff = pos.mean(0) - neg.mean(0)
    torch.testing.assert_close(vec.norm(), mean_diff @ (vec / vec.norm()), rtol=1e-4, atol=1e-4)
    flipped, _ = pca_direction(neg, pos, paired=True)
    assert float(torch.nn.functional.cosine_similarity(flipped, planted, dim=0)) < -0.99
    # unpaired sets (no shared content to cancel): still aligned
    pos_u = randn(n, d, seed=8, scale=0.3) + size[:, None] * planted
    neg_u = randn(n, d, seed=9, scale=0.3)
    vec_u, _ = pca_direction(pos_u, neg_u, paired=False)
    assert float(torch.nn.functional.cosine_similarity(vec_u, planted, dim=0)) > 0.99


def test_pca_on_a_model_points_like_the_mean_difference(llama):
    fits = {m: fit_steering(llama, ContrastSet(POS, NEG[:3], ["", "", ""]), "resid.1", method=m)["resid.1"]
            for m in ("mean-diff", "pca")}
    cos = torch.nn.functional.cosine_similarity(fits["pca"].vector, fits["mean-diff"].vector, dim=0)
    assert cos > 0 and 0 < fits["pca"].params["explained_variance"] <= 1


def test_random_like_matches_norm_and_site(llama):
    vec = SteeringVector(site="resid.1", vector=randn(D, seed=1, scale=3.0), coef=2.0, model=llama.identity())
    r = random_like(vec, seed=5)
    assert r.site == vec.site and r.coef == vec.coef and r.model == vec.model
    torch.testing.assert_close(r.vector.norm(), vec.vector.norm())
    assert abs(float(torch.nn.functional.cosine_similarity(r.vector, vec.vector, dim=0))) < 0.6
    assert torch.equal(random_like(vec, seed=5).vector, r.vector)
