"""The bundled demo models load offline with the transformers Auto classes and match their cards."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
from importlib.resources import files
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ZOO = Path(str(files("actlab") / "models" / "zoo"))
NAMES = ["demo-gpt2", "demo-llama"]
NEUTRAL = Path(str(files("actlab") / "datasets" / "genres" / "neutral.txt"))


def model_dir(name: str) -> Path:
    d = ZOO / name
    assert (d / "config.json").is_file(), (
        f"{d} has no exported model; run scripts/train_demo_models.py {name} (see docs/demo_models.md)"
    )
    return d


_CACHE: dict = {}


def load(name: str):
    if name not in _CACHE:
        d = model_dir(name)
        # float32: float16 matmuls are slow on CPU (the default-dtype load is tested on its own below)
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        _CACHE[name] = (AutoTokenizer.from_pretrained(str(d)), model)
    return _CACHE[name]


@pytest.mark.parametrize("name", NAMES)
def test_default_load_is_float16_and_runs(name):
    d = str(model_dir(name))
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert next(model.parameters()).dtype == torch.float16
    ids = tok(["In the beginning"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_zoo_files_and_size():
    total = 0
    for name in NAMES:
        d = model_dir(name)
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "README.md", "eval_results.json", "training_summary.json"]:
            assert (d / f).is_file(), f"{name}: missing {f}"
        assert not list(d.glob("*.bin")) and not list(d.glob("*.pt")), "no pickle weights in the zoo"
        total += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert total <= 40 * 1024 * 1024, f"zoo is {total / 2**20:.1f} MiB, the budget is 40 MiB"


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_float16_safetensors(name):
    from safetensors import safe_open

    with safe_open(str(model_dir(name) / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}


def test_architectures_differ_as_documented():
    _, gpt2 = load("demo-gpt2")
    _, llama = load("demo-llama")
    assert type(gpt2).__name__ == "GPT2LMHeadModel"
    assert type(llama).__name__ == "LlamaForCausalLM"
    g, l = gpt2.config, llama.config
    assert g.activation_function == "relu"
    assert l.hidden_act == "silu"  # SwiGLU: gate_proj/up_proj/down_proj with SiLU
    assert hasattr(llama.model.layers[0].mlp, "gate_proj")
    assert g.n_embd != l.hidden_size and g.n_layer != l.num_hidden_layers
    assert g.vocab_size == l.vocab_size == 4096


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_round_trip(name):
    tok, _ = load(name)
    texts = [
        "In the beginning God created the heaven and the earth.",
        "def f(x):\n    return {'a': x ** 2}  # comment\n",
        "hacker (noun): a programmer for whom computing is its own reward; \"a true hacker\"",
        "Unicode: café, naïve, 𝄞, 日本語 — and tabs\tand  double  spaces.",
    ]
    for t in texts:
        ids = tok(t)["input_ids"]
        assert all(0 <= i < len(tok) for i in ids)
        assert tok.decode(ids) == t
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id == 0


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_greedy_generation(name):
    tok, model = load(name)
    ids = tok(["And the LORD said unto Moses"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids)
        assert out.logits.shape == (1, ids.shape[1], 4096)
        assert torch.isfinite(out.logits).all()
        g1 = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        g2 = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert g1.shape[1] == ids.shape[1] + 8
    assert torch.equal(g1, g2)


def _neutral_ppl(name: str, n: int) -> tuple[float, dict]:
    """Perplexity of the first n shipped neutral passages, with the float16 weights upcast to float32
    as evaluate_demo_models.py computes it (float16 matmuls are slow on CPU)."""
    from actlab.evals import perplexity

    tok, _ = load(name)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir(name)), dtype=torch.float32)
    res = json.loads((model_dir(name) / "eval_results.json").read_text())
    texts = [ln for ln in NEUTRAL.read_text(encoding="utf-8").splitlines() if ln.strip()][:n]
    return perplexity(model, texts, tokenizer=tok), res


@pytest.mark.parametrize("name", NAMES)
def test_perplexity_matches_model_card(name):
    """Within 3% of the recorded number (CPU kernels may differ slightly across machines), and far
    below the unigram baseline."""
    ppl, res = _neutral_ppl(name, 20)
    ref = res["neutral"]["ppl_first20"]
    assert abs(ppl - ref) / ref < 0.03, (ppl, ref)
    assert ppl < 0.5 * res["all_genres"]["unigram_ppl"]
    card = (model_dir(name) / "README.md").read_text()
    assert f"{res['neutral']['ppl_all']:.2f}" in card


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_perplexity_matches_model_card_100_passages(name):
    ppl, res = _neutral_ppl(name, 100)
    ref = res["neutral"]["ppl_first100"]
    assert abs(ppl - ref) / ref < 0.03, (ppl, ref)


@pytest.mark.parametrize("name", NAMES)
def test_model_card_sections(name):
    card = (model_dir(name) / "README.md").read_text()
    for section in ["## Architecture", "## Training", "## Validation perplexity per genre",
                    "## Sample generations", "## Genre of generations", "unigram"]:
        assert section in card, section
    res = json.loads((model_dir(name) / "eval_results.json").read_text())
    for g in ["scripture", "fortunes", "jargon", "techdoc", "dictionary"]:
        r = res["per_genre"][g]
        assert r["ppl"] < r["unigram_ppl"], (g, r)  # the model beats the unigram baseline on every genre
    assert len(res["samples"]) == 3
