"""Low-rank residual adapters (LoReFT form) trained by backprop (actlab.interventions.adapter_train)."""

from __future__ import annotations

import random

import pytest
import torch
import transformers as T

import actlab
from actlab.errors import ActlabError
from actlab.interventions import LowRankAdapter, load_interventions, save_interventions
from actlab.engine.likelihood import encode_lm_data, token_nll
from actlab.experiments.genre_data import adapter_training_data_for_genre
from actlab.interventions.adapter_train import init_adapter, train_adapter
from tiny_models import ByteTokenizer, tiny_config, tiny_model


@pytest.fixture(scope="module")
def wide_llama():
    """A tiny llama with larger random weights: the standard tiny model's LM head (std 0.02) keeps every
    next-token distribution close to uniform, so no small edit could make it predict a pattern."""
    config = tiny_config("llama")
    config.initializer_range = 0.3
    torch.manual_seed(0)
    return actlab.load(T.AutoModelForCausalLM.from_config(config).eval(), tokenizer=ByteTokenizer())


def pattern_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Random prompts, every one continued by the same repeated sequence."""
    rng = random.Random(seed)
    return [("".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8))), "xyz" * 5) for _ in range(n)]


def test_initial_adapter_changes_nothing(wide_llama):
    adapter = init_adapter(wide_llama, "resid.1", rank=4, seed=3)
    assert adapter.R.shape == (4, 32) and torch.equal(adapter.W, adapter.R) and torch.equal(adapter.b, torch.zeros(4))
    assert torch.allclose(adapter.R @ adapter.R.T, torch.eye(4), atol=1e-6)
    h = torch.randn(2, 5, 32)
    assert torch.equal(adapter.delta(h), torch.zeros_like(h))  # exactly zero, not merely small
    ids = torch.tensor([[5, 9, 20, 31, 7, 8]])
    plain = wide_llama(ids).logits
    with wide_llama.edit(adapter):
        assert torch.equal(wide_llama(ids).logits, plain)
    assert torch.equal(init_adapter(wide_llama, "resid.1", rank=4, seed=3).R, adapter.R)  # seeded


def test_training_learns_a_pattern_and_keeps_the_best(wide_llama):
    data = pattern_pairs(40)
    adapter = train_adapter(wide_llama, data, "resid.1", rank=4, steps=100, lr=0.05, seed=0)
    p = adapter.params
    assert isinstance(adapter, LowRankAdapter) and adapter.rank == 4 and adapter.site == "resid.1"
    assert p["val_loss"] < 0.3 * p["val_loss_before"], p
    assert p["n_examples"] == 40 and p["n_val"] == 8 and p["n_train"] == 32 and p["data"] == "pairs"
    assert 1 <= p["best_step"] <= p["steps_run"] <= 100 and p["train_seconds"] > 0
    assert torch.allclose(adapter.R @ adapter.R.T, torch.eye(4), atol=1e-5)  # kept orthonormal
    assert not any(t.requires_grad for t in (adapter.R, adapter.W, adapter.b))

    # the recorded losses are what the model gives, with and without the adapter, on the held-out pairs
    kind, examples = encode_lm_data(wide_llama, data)
    rng = random.Random(0)
    order = list(range(len(examples)))
    rng.shuffle(order)
    val = [examples[i] for i in order[:8]]
    loss, n = token_nll(wide_llama, val, batch_size=len(val), prompt_length_known=True)
    assert float(loss) / n == pytest.approx(p["val_loss_before"], rel=1e-5)
    with wide_llama.edit(adapter):
        loss, n = token_nll(wide_llama, val, batch_size=len(val), prompt_length_known=True)
    assert float(loss) / n == pytest.approx(p["val_loss"], rel=1e-4)

    # and generation now continues the pattern
    with wide_llama.edit(adapter):
        out = wide_llama.generate(["fgah", "bjjcide"], max_new_tokens=6, return_ids=True)
    x, y, z = (3 + (ord(c) % 93) for c in "xyz")
    assert sum(int(t) in (x, y, z) for t in out.flatten()) >= 9


def test_completion_loss_counts_only_completion_tokens(wide_llama):
    kind, ex = encode_lm_data(wide_llama, [("abc", "defg"), ("hi", "jk")])
    assert kind == "pairs" and ex[0] == ([3 + ord(c) % 93 for c in "abc"], [3 + ord(c) % 93 for c in "defg"])
    _, n = token_nll(wide_llama, ex, batch_size=len(ex), prompt_length_known=True)
    assert n == 4 + 2
    kind, ex = encode_lm_data(wide_llama, ["abcdefg", "hij"])
    _, n = token_nll(wide_llama, ex, batch_size=len(ex), prompt_length_known=False)
    assert kind == "texts" and n == 6 + 2  # every token but the first of each text


def test_plain_texts_and_generated_positions(wide_llama):
    rng = random.Random(1)
    texts = ["".join(rng.choice("abcdefghij") for _ in range(4)) + "xyz" * 4 for _ in range(30)]
    adapter = train_adapter(wide_llama, texts, "resid.0", rank=2, steps=40, lr=0.05, batch_size=6)
    assert adapter.params["data"] == "texts" and adapter.params["val_loss"] < adapter.params["val_loss_before"]
    gen = train_adapter(wide_llama, pattern_pairs(20, 2), "resid.1", rank=2, steps=40, lr=0.05, positions="generated")
    assert gen.positions == "generated" and gen.params["val_loss"] < 0.6 * gen.params["val_loss_before"]
    # acting on generated tokens only: a plain forward (all prompt) is left exactly as it was
    ids = torch.tensor([[5, 9, 20, 31, 7, 8]])
    plain = wide_llama(ids).logits
    with wide_llama.edit(gen):
        assert torch.equal(wide_llama(ids).logits, plain)
        steered = wide_llama.generate(["abcd", "fghij"], max_new_tokens=6, return_ids=True)
    assert not torch.equal(steered, wide_llama.generate(["abcd", "fghij"], max_new_tokens=6, return_ids=True))


def test_save_load_gives_identical_outputs(tmp_path, wide_llama):
    adapter = train_adapter(wide_llama, pattern_pairs(16, 3), "mlp.1", rank=3, steps=15, lr=0.05, val_fraction=0.25)
    path = save_interventions([adapter], tmp_path / "adapter.safetensors")
    loaded = load_interventions(path, wide_llama)
    assert isinstance(loaded, LowRankAdapter) and loaded.params == adapter.params
    for name in ("R", "W", "b"):
        assert torch.equal(getattr(loaded, name), getattr(adapter, name))
    ids = torch.tensor([[5, 9, 20, 31, 7, 8], [11, 12, 13, 14, 15, 16]])
    with wide_llama.edit(adapter):
        want = wide_llama(ids).logits
    with wide_llama.edit(loaded):
        got = wide_llama(ids).logits
    # equal up to float rounding: safetensors returns tensors at unaligned addresses, where CPU kernels may
    # sum in another order (clones of the loaded tensors give bitwise-equal logits)
    assert torch.allclose(want, got, rtol=0, atol=1e-6)
    clone = LowRankAdapter(site=loaded.site, R=loaded.R.clone(), W=loaded.W.clone(), b=loaded.b.clone())
    with wide_llama.edit(clone):
        assert torch.equal(wide_llama(ids).logits, want)
    assert not torch.allclose(want, wide_llama(ids).logits)


def test_model_weights_untouched():
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.hf.named_parameters()}
    train_adapter(model, pattern_pairs(10, 4), "resid.1", rank=2, steps=5, lr=0.05, progress=True)
    after = model.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.hf.parameters())
    assert {n: p.requires_grad for n, p in model.hf.named_parameters()} == flags
    assert not model.hooks.active and model.hooks.state.prompt_length is None


class _NaNEdit:
    site = "resid.0"

    def __call__(self, h, state):
        return h * float("nan")


def test_bad_input_raises_clear_errors():
    model = tiny_model("llama")
    data = pattern_pairs(6)
    cases = [
        (dict(data=[], site="resid.0"), "no training data"),
        (dict(data=data, site="resid.7"), "resid.7"),
        (dict(data=data, site="resid.*"), "one site"),
        (dict(data=data, site="resid.0", rank=0), "rank"),
        (dict(data=data, site="resid.0", rank=33), "rank"),
        (dict(data=data, site="resid.0", steps=0), "steps"),
        (dict(data=data, site="resid.0", lr=float("nan")), "lr"),
        (dict(data=["abc", ("a", "b")], site="resid.0"), "pairs"),
        (dict(data=[("a", "b"), float("nan")], site="resid.0"), "pairs"),
        (dict(data=["abcdef"] * 4, site="resid.0", positions="generated"), "pairs"),
        (dict(data=["a"] * 4, site="resid.0"), "at least 2"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ActlabError, match=words):
            train_adapter(model, steps=kwargs.pop("steps", 2), **kwargs)
    with model.edit(_NaNEdit()):
        with pytest.raises(ActlabError, match="nan"):
            train_adapter(model, data, "resid.1", steps=2)
    with pytest.raises(ActlabError, match="language-model head"):
        train_adapter(tiny_model("bert"), data, "resid.0", steps=2)


def test_training_data_for_genres():
    pairs = adapter_training_data_for_genre("scripture")
    assert len(pairs) == 200 and all(isinstance(p, str) and isinstance(c, str) and c for p, c in pairs)
    assert pairs[0][0] == "Do not" and "thy name" in pairs[0][1]
    assert len(adapter_training_data_for_genre("techdoc")) == 100
    assert len(adapter_training_data_for_genre("dictionary")) >= 32  # topped up from held-out passages
    assert len(adapter_training_data_for_genre("scripture", max_pairs=10)) == 10
    with pytest.raises(ActlabError, match="unknown genre"):
        adapter_training_data_for_genre("poetry")


def _demo(name: str):
    from actlab.models.loading import zoo_models

    if name not in zoo_models():
        pytest.skip(f"{name} is not in the zoo yet (scripts/train_demo_models.py)")
    return actlab.load(name)


@pytest.mark.slow
def test_demo_llama_adapter_steers_toward_scripture():
    from actlab.datasets import genres
    from actlab.evals.genre import genre_rate

    model = _demo("demo-llama")
    site = f"resid.{model.n_layers // 2}"
    adapter = train_adapter(model, adapter_training_data_for_genre("scripture"), site, rank=4, steps=100, lr=1e-2)
    p = adapter.params
    assert p["val_loss"] < p["val_loss_before"] and p["n_examples"] == 200
    prompts = [" ".join(line.split(" ")[:4]) for line in genres.neutral()[:32]]
    plain = model.generate(prompts, max_new_tokens=24, do_sample=True, seed=0)
    with model.edit(adapter):
        steered = model.generate(prompts, max_new_tokens=24, do_sample=True, seed=0)
    before, after = genre_rate(plain, "scripture"), genre_rate(steered, "scripture")
    assert after >= before + 0.25, (before, after)  # measured: 0.25 -> 0.75 (first training of the demo models: 0.34 -> 0.88)


def test_config_object_equals_keywords_and_is_saved(tmp_path, wide_llama):
    from actlab.interventions.adapter_train import AdapterConfig

    data = pattern_pairs(12, 5)
    by_keywords = train_adapter(wide_llama, data, "resid.1", rank=2, steps=6, lr=0.05)
    config = AdapterConfig(rank=2, steps=6, lr=0.01)
    by_config = train_adapter(wide_llama, data, "resid.1", config, lr=0.05)  # a keyword overrides the config
    assert torch.equal(by_config.W, by_keywords.W) and by_config.params["val_loss"] == by_keywords.params["val_loss"]
    assert config.lr == 0.01  # the caller's config is not modified
    saved = AdapterConfig.from_dict(by_config.params["config"])
    assert saved == AdapterConfig(rank=2, steps=6, lr=0.05)
    path = save_interventions([by_config], tmp_path / "a.safetensors")
    assert AdapterConfig.from_dict(load_interventions(path).params["config"]) == saved
    with pytest.raises(ActlabError, match="unknown AdapterConfig option"):
        train_adapter(wide_llama, data, "resid.1", stpes=3)


def test_subspace_keeps_R_inside_the_data_principal_directions(wide_llama):
    from actlab.interventions.adapter_train import principal_basis

    data = pattern_pairs(40)
    kind, examples = encode_lm_data(wide_llama, data)
    P = principal_basis(wide_llama, "resid.1", examples, 8)
    # the reference: SVD of the centred activations of every token but each example's first
    rows = []
    for p, t in examples:
        with wide_llama.capture("resid.1") as cap:
            wide_llama(torch.tensor([list(p) + list(t)]))
        rows.append(cap["resid.1"][0, 1:])
    x = torch.cat(rows).double()
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    assert torch.allclose((P.double() @ vh[:8].T).abs().diagonal(), torch.ones(8, dtype=torch.float64), atol=1e-4)

    adapter = train_adapter(wide_llama, data, "resid.1", rank=4, steps=60, lr=0.05, seed=0, subspace=8)
    assert adapter.params["config"]["subspace"] == 8
    assert adapter.params["val_loss"] < 0.5 * adapter.params["val_loss_before"]
    assert torch.allclose(adapter.R @ adapter.R.T, torch.eye(4), atol=1e-5)
    basis = principal_basis(wide_llama, "resid.1", [examples[i] for i in _train_order(len(examples))], 8)
    inside = adapter.R @ basis.T @ basis  # projection of R's rows onto the training data's subspace
    assert torch.allclose(inside, adapter.R, atol=1e-4)  # R moved, but never left the subspace
    free = train_adapter(wide_llama, data, "resid.1", rank=4, steps=60, lr=0.05, seed=0)
    assert (free.R @ basis.T @ basis - free.R).norm() > 0.5  # unconstrained R does leave it

    with pytest.raises(ActlabError, match="at least the rank"):
        train_adapter(wide_llama, data, "resid.1", rank=4, subspace=2)
    with pytest.raises(ActlabError, match="more principal directions"):
        train_adapter(wide_llama, [("ab", "cd")], "resid.1", rank=4, subspace=8, val_fraction=0.0)
    with pytest.raises(ActlabError, match="width"):
        train_adapter(wide_llama, data, "resid.1", rank=4, subspace=33)


def _train_order(n: int, val_fraction: float = 0.2, seed: int = 0) -> list[int]:
    """The indices train_adapter trains on (its seeded split)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[int(round(n * val_fraction)):]


def test_a_given_basis_keeps_R_inside_it(wide_llama):
    data = pattern_pairs(40)
    basis = torch.linalg.qr(torch.randn(32, 8, generator=torch.Generator().manual_seed(5)))[0].T.contiguous()  # [8, 32]
    adapter = train_adapter(wide_llama, data, "resid.1", rank=4, steps=40, lr=0.05, seed=0, basis=basis)
    assert adapter.params["val_loss"] < adapter.params["val_loss_before"]
    assert torch.allclose(adapter.R @ basis.T @ basis, adapter.R, atol=1e-4)  # R never left the given directions
    with pytest.raises(ActlabError, match=r"basis must be \[m, 32\]"):
        train_adapter(wide_llama, data, "resid.1", rank=4, basis=basis[:2])
