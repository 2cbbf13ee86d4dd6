"""Command-V on model pairs whose answer is known (issue #12 point 4): ``actlab.experiments.known_pairs``.

- rotated copy: the donor itself in another orthonormal basis (h' = h Q). A donor vector v must paste as
  v Q, up to the ridge shrinkage the converters apply on purpose (λ ≥ 0.1), which has a closed form
  (``_ridge_paste``), so the paste is checked against the exact answer either way.
- fine-tuned copy: the donor after a brief fine-tune on one genre; its residual stream is nearly the
  donor's, so the pasted vector must match the recipient's own mean-difference vector.

The fast tests use the tiny random Llama of ``tiny_models`` (and a tiny Llama pre-trained for a few
seconds, for the fine-tune pair); the slow one runs the genre evaluation on demo-llama → its rotation.
Numbers in comments were measured with torch 2.13 CPU, one thread.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import actlab
from actlab.datasets import genres
from actlab.engine.likelihood import encode_lm_data, mean_nll
from actlab.errors import ActlabError
from actlab.experiments.genre_data import default_profile_prompts, passage_contrast, split_passages
from actlab.experiments.known_pairs import finetuned_copy, known_pair, rotated_copy
from actlab.interventions.fit import fit_steering
from actlab.transfer import paste_between
from tiny_models import ByteTokenizer, tiny_config, tiny_hf_model

cosine = torch.nn.functional.cosine_similarity
TEXT = "check the basis of this sentence"
SITE = "resid.1"


def _tiny(arch: str = "llama", tied: bool | None = None):
    if tied is None:
        return actlab.load(tiny_hf_model(arch), tokenizer=ByteTokenizer())
    torch.manual_seed(0)
    config = tiny_config(arch)
    config.tie_word_embeddings = tied
    return actlab.load(T.AutoModelForCausalLM.from_config(config).eval(), tokenizer=ByteTokenizer())


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def profile_prompts() -> list[str]:
    """120 evenly spaced texts of the bundled profile set (~12k token rows on the byte tokenizer)."""
    texts = default_profile_prompts()
    return texts[:: len(texts) // 120][:120]


@pytest.fixture(scope="module")
def contrast():
    return passage_contrast("fortunes", "eval", n=32)


@pytest.fixture(scope="module")
def pretrained():
    """The tiny Llama trained for 150 steps on every genre's tuning passages (~3 s). A random-weight model
    is no donor for a fine-tune pair: its residual stream is so small (init std 0.02) that any fine-tune
    rewrites it (60 steps at lr 3e-4 change it by 120–640 %), so 'nearly the donor' would not hold."""
    texts = [t for g in genres.GENRES for t in split_passages(g, "tune")]
    model = finetuned_copy(_tiny(), texts, steps=150, lr=3e-3, batch_size=16)
    model.name = "tiny-llama-pretrained"
    return model


# ------------------------------------------------------------------------------------ rotated copy
@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("mistral", None), ("qwen2", None),
                                        ("qwen3", None)])
def test_rotated_copy_computes_the_same_function(arch, tied):
    model = _tiny(arch, tied)
    before, hash_before = _state(model), model.weights_hash
    rotated, q = rotated_copy(model, seed=3)
    assert rotated.name == f"{model.name}-rotated" and rotated.weights_hash != hash_before
    torch.testing.assert_close(q @ q.T, torch.eye(model.d_model), atol=1e-6, rtol=0)
    sites = [f"resid.{i}" for i in range(model.n_layers)]
    with model.capture(sites) as a, rotated.capture(sites) as b:
        want, got = model(TEXT).logits, rotated(TEXT).logits
    # measured: logits differ by 1e-7 (scale 0.4), activations by 2e-8 (scale 0.08): float32 rounding
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    for site in sites:
        torch.testing.assert_close(b[site], a[site] @ q, atol=1e-5, rtol=0)
    assert _same_state(_state(model), before) and model.weights_hash == hash_before  # the input is untouched
    if tied:  # the folded unembedding is its own matrix now, and stays so
        assert rotated.hf.config.tie_word_embeddings is False
        hf = rotated.hf
        assert hf.get_output_embeddings().weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_rotated_copy_refuses_other_architectures(arch):
    with pytest.raises(ActlabError, match="Llama-family causal LM .*llama, mistral, qwen2, qwen3"):
        rotated_copy(_tiny(arch))


def test_copies_are_refused_inside_an_open_edit():
    from actlab.interventions import SteeringVector

    model = _tiny()
    vector = SteeringVector(SITE, vector=torch.ones(model.d_model), model=model.identity())
    with model.edit(vector), pytest.raises(ActlabError, match="outside model.edit"):
        rotated_copy(model)
    with model.capture(SITE), pytest.raises(ActlabError, match="outside model.edit"):
        finetuned_copy(model, ["some text to train on"], steps=1)
    rotated_copy(model)  # closed again: fine


def _ridge_paste(h: torch.Tensor, v: torch.Tensor, q: torch.Tensor, lam: float, max_gain: float) -> torch.Tensor:
    """The paste of v into the rotated copy, in closed form.

    With centred donor rows X, Gram G = XᵀX and recipient rows Y = X Q, ridge gives C_DR = (G + λ̄ I)⁻¹ G Q
    = S Q and C_RD = Qᵀ S, where λ̄ = λ · mean diag(G) and S = (G + λ̄ I)⁻¹ G has eigenvalues σ/(σ + λ̄)
    (shrinkage: 1 on strong directions, → 0 on weak ones). The round trip C_DR C_RD = S², so
    ``deattenuated_map`` multiplies by g = min(max_gain, (uᵀS²u)^-½) along u = v/|v|, and the paste is
    g · v S Q. Hence cos(paste, v Q) = uᵀSu / √(uᵀS²u) and, uncapped, |paste| = |v| exactly."""
    x = (h - h.mean(0)).double()
    gram = x.T @ x
    s = torch.linalg.solve(gram + lam * torch.diagonal(gram).mean() * torch.eye(gram.shape[0], dtype=gram.dtype), gram)
    u = v.double() / v.double().norm()
    gain = min(max_gain, float((u @ s @ s @ u).rsqrt()))
    return (gain * (v.double() @ s) @ q.double()).float()


def test_paste_into_a_rotated_copy_is_the_known_answer(pretrained, contrast, profile_prompts):
    donor = pretrained
    recipient, q = rotated_copy(donor)
    v = fit_steering(donor, contrast, SITE)[SITE]
    want = v.vector @ q
    # (1) the paste as shipped: converters with λ ≥ 0.1 (held-out error picks 0.1 on an exact relation).
    # The pasted vector is then not v Q but the ridge answer g · v S Q (``_ridge_paste``). Measured: the
    # paste and the closed form agree to 1 − cos ≤ 1.2e-7 (float32 profiles, float64 solves), so allow 1e-5.
    # How far that answer is from v Q depends on the spectrum of G: on this donor (eigenvalues 7.7× to
    # 0.012× their mean) cos(paste, v Q) is 0.9949 at resid.1 (gain 1.048); on the random tiny Llama (8×
    # to 1e-4×) only 0.90; on demo-llama 0.9994 (the slow test), whose genre vectors lie in its strong
    # directions. So "cos > 0.999 with v Q" is not what λ ≥ 0.1 promises; the closed form is.
    res = paste_between(donor, recipient, v, profile_prompts, positions="all")
    layer = int(SITE.split(".")[1])
    lam = res.converters.to_recipient[layer].lam
    assert lam == 0.1 and res.pasted.site == SITE
    exact = _ridge_paste(res.donor_profile.acts[layer], v.vector, q, lam, max_gain=1.5)
    pasted = res.pasted.vector
    assert float(cosine(pasted, exact, dim=0)) > 1 - 1e-5
    assert float(pasted.norm() / exact.norm()) == pytest.approx(1.0, abs=1e-4)
    gain = res.pasted.params["deattenuation"]["gains"][0]
    if gain < 1.5:  # uncapped de-attenuation restores the length exactly (``_ridge_paste``)
        assert float(pasted.norm() / want.norm()) == pytest.approx(1.0, abs=1e-4)
    # (2) without the floor the held-out error picks λ = 1e-8: every shrinkage σ/(σ + λ̄) is then within
    # ε = 1e-8/0.012 ≈ 1e-6 of 1 even on the weakest direction, and cos = E[s]/√E[s²] (weights (u·eᵢ)²)
    # gives 1 − cos ≈ Var(s)/2 ≤ ε²/8 ≈ 1e-13; the de-attenuated length is |v| exactly. What is left is
    # float32 rounding of the profile rows (~1e-7). Measured: 1 − cos ≤ 6e-8, ratio 1 ± 1e-7; the bounds
    # (1e-4 and 1e-3) are float32 headroom, not a fudge for the maths.
    res0 = paste_between(donor, recipient, v, profile_prompts, positions="all", min_lambda=0.0)
    assert res0.converters.to_recipient[layer].lam <= 1e-6
    assert float(cosine(res0.pasted.vector, want, dim=0)) > 0.9999
    assert float(res0.pasted.vector.norm() / want.norm()) == pytest.approx(1.0, abs=1e-3)


# ------------------------------------------------------------------------------------ fine-tuned copy
def test_finetuned_copy_trains_a_separate_deterministic_copy():
    model = _tiny()
    before, hash_before = _state(model), model.weights_hash
    texts = split_passages("fortunes", "tune")[:32]
    tuned = finetuned_copy(model, texts, steps=12, lr=1e-3, seed=5)
    again = finetuned_copy(model, texts, steps=12, lr=1e-3, seed=5)
    other = finetuned_copy(model, texts, steps=12, lr=1e-3, seed=6)
    assert tuned.name == f"{model.name}-ft" and not tuned.hf.training
    assert tuned.weights_hash != hash_before  # the profile cache tells it from the original
    assert _same_state(_state(model), before) and model.weights_hash == hash_before  # the original is untouched
    assert _same_state(_state(tuned), _state(again))  # seeded: identical weights on the CPU
    assert not _same_state(_state(tuned), _state(other))  # and the seed matters (batch order)
    _, examples = encode_lm_data(model, texts, max_tokens=64)
    loss_before = mean_nll(model, examples, batch_size=8, prompt_length_known=False)
    loss_after = mean_nll(tuned, examples, batch_size=8, prompt_length_known=False)
    assert loss_after < loss_before - 0.2, (loss_before, loss_after)  # measured 4.56 → 3.8 nats
    assert all(p.grad is None for p in tuned.hf.parameters())


def test_finetuned_copy_checks_its_arguments():
    with pytest.raises(ActlabError, match="steps"):
        finetuned_copy(_tiny(), ["some text here"], steps=0)
    with pytest.raises(ActlabError, match="unknown known-answer pair"):
        known_pair("mirrored", _tiny())


def test_paste_into_a_finetuned_copy_matches_its_own_vector(pretrained, contrast, profile_prompts):
    donor = pretrained
    recipient = finetuned_copy(donor, split_passages("fortunes", "tune"))  # finetuned_copy's defaults
    v = fit_steering(donor, contrast, SITE)[SITE]
    own = fit_steering(recipient, contrast, SITE)[SITE].vector
    pasted = paste_between(donor, recipient, v, profile_prompts, positions="all").pasted.vector
    # Measured at resid.1 (the fine-tune moves the stream by ~20 %; converter R² 0.965): cos(pasted, own)
    # 0.991, |pasted|/|own| 1.089 (de-attenuation gain 1.07); the donor vector itself, unconverted, has
    # cos 0.973 and ratio 1.04 (resid.0/2: pasted 0.994/0.982, unconverted 0.982/0.945). The answer is only
    # approximately known here (the recipient's stream is not an exact linear image of the donor's), so
    # the bounds leave room for platform-level float differences after 210 training steps: cos > 0.97, the
    # paste at least as close as no conversion, and the length within 15 %.
    cos, baseline = float(cosine(pasted, own, dim=0)), float(cosine(v.vector, own, dim=0))
    assert cos > 0.97 and cos >= baseline, (cos, baseline)
    assert 0.85 < float(pasted.norm() / own.norm()) < 1.15
    # the same pair in another basis: the identity is now useless (cos ≈ 0), but ridge, its λ scale
    # (a trace) and the de-attenuation are all rotation-equivariant, so the paste is exactly as good
    rotated, q = rotated_copy(recipient)
    own_r = fit_steering(rotated, contrast, SITE)[SITE].vector
    pasted_r = paste_between(donor, rotated, v, profile_prompts, positions="all").pasted.vector
    assert abs(float(cosine(v.vector, own_r, dim=0))) < 0.5
    assert float(cosine(pasted_r, own_r, dim=0)) == pytest.approx(cos, abs=1e-4)
    torch.testing.assert_close(pasted_r, pasted @ q, atol=1e-4 * float(pasted.norm()), rtol=0)


# ------------------------------------------------------------------------------------ slow
def _demo(name: str):
    from actlab.models.loading import zoo_models

    if name not in zoo_models():
        pytest.skip(f"{name} is not in the zoo (scripts/train_demo_models.py {name})")
    return actlab.load(name)


@pytest.mark.slow
def test_genre_evaluation_into_a_rotated_demo_llama_gives_the_known_answer(tmp_path):
    from actlab.experiments.transfer_eval import evaluate_transfer

    donor = _demo("demo-llama")
    recipient = known_pair("rotated", donor)
    r = evaluate_transfer(donor, recipient, kind="vector", target_genre="scripture", split="tune",
                          n_eval_prompts=40, samples_per_prompt=2, donor_check=False, cache_dir=tmp_path)
    lines = "\n".join(r.summary_lines())
    d = r.diagnostics
    # The direct vector is exactly v Q; the paste is g · v S Q (test above), which on demo-llama's resid.1
    # (λ = 0.1, converter R² 0.987 — the floor's shrinkage, not a misfit) has cos 0.99943 with it and, the
    # de-attenuation gain 1.023 being uncapped, exactly its length. Measured (~22 s): rates none 0.31,
    # pasted 0.71, direct 0.73 (80 continuations) → pasted/direct 0.97 (95% 0.90–1.00); random −0.06.
    assert d["cosine_pasted_direct"] > 0.99, lines
    assert d["norm_ratio_pasted_direct"] == pytest.approx(1.0, abs=1e-3), lines
    assert 0.85 <= r.pasted_ratio <= 1.15, lines
    assert abs(r.random_ratio) < 0.2, lines
