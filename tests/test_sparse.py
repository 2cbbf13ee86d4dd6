"""Activation-sparse inference (issue #16): the kernel, the spliced sparse MLP, calibrated thresholds, files."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from actlab.errors import ActlabError
from actlab.sparse import kernel
from actlab.sparse.kernel import input_major, sparse_matvec
from actlab.sparse.attention import same_zeros
from actlab.sparse.mlp import mask_edits, measured_sparsity, sparse_edits, splice
from actlab.sparse.thresholds import METHODS, calibrate, load_thresholds
from tiny_models import ARCHS, tiny_model

_EPS32 = torch.finfo(torch.float32).eps


def _problem(rows=3, n_in=300, n_out=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g)
    thr = torch.rand(n_in, generator=g)  # about 1 - P(|N(0,1)| > U) ~ 40% of the channels skipped
    bias = torch.randn(n_out, generator=g)
    return x, w, thr, bias


def _check_against_float64(y, x, w, thr, bias):
    """|y - exact| <= gamma_n * (|kept x| @ |W|.T + |bias|): the float32 summation error bound (n = n_in + 1 terms)."""
    keep = x.abs() > thr
    kept = torch.where(keep, x, torch.zeros_like(x)).double()
    exact = kept @ w.double().T + bias.double()
    n = x.shape[1] + 1
    bound = (n * _EPS32 / (1 - n * _EPS32)) * (kept.abs() @ w.double().abs().T + bias.double().abs())
    assert bool(((y.double() - exact).abs() <= bound).all())
    return keep


def test_kernel_equals_dense_with_the_same_zeros():
    x, w, thr, bias = _problem()
    count: list[int] = []
    y = sparse_matvec(x, input_major(w), thr, bias, count=count)
    keep = _check_against_float64(y, x, w, thr, bias)
    assert count == [int(keep.sum())] and 0.2 < 1 - keep.float().mean() < 0.6


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_rows_threads_and_tiles(threads, monkeypatch):
    monkeypatch.setattr(kernel, "TILE", 16)  # many tiles, and a last tile shorter than the others
    x, w, thr, bias = _problem(rows=2, n_in=41, n_out=37, seed=1)
    _check_against_float64(sparse_matvec(x, input_major(w), thr, bias, threads=threads), x, w, thr, bias)
    # no threshold: every nonzero channel is kept; an all-zero row gives the bias
    x[1] = 0
    y = sparse_matvec(x, input_major(w), None, bias)
    _check_against_float64(y, x, w, torch.zeros(41), bias)
    assert torch.equal(y[1], bias)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_kernel_is_compiled_where_a_compiler_exists():
    assert kernel.kernel_available()


@pytest.fixture
def fresh_kernel_state():
    kernel._reset_for_tests()
    yield
    kernel._reset_for_tests()


@pytest.mark.parametrize("how", ["env", "no-compiler"])
def test_fallback_is_taken_and_announced_once(how, monkeypatch, tmp_path, fresh_kernel_state):
    if how == "env":
        monkeypatch.setenv("ACTLAB_SPARSE_KERNEL", "off")
    else:
        monkeypatch.setenv("ACTLAB_CACHE", str(tmp_path))  # nothing cached: it must build, and cannot
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    x, w, thr, bias = _problem()
    wt = input_major(w)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = sparse_matvec(x, wt, thr, bias)
        sparse_matvec(x, wt, thr, bias)
    messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(messages) == 1 and "using dense torch" in messages[0] and "\n" not in messages[0]
    assert not kernel.kernel_available()
    assert torch.equal(y, torch.where(x.abs() > thr, x, torch.zeros_like(x)) @ wt + bias)


def test_kernel_refuses_wrong_layouts():
    x, w, thr, bias = _problem()
    with pytest.raises(ActlabError, match="input_major"):
        sparse_matvec(x, w.T, thr)  # a transposed view, not contiguous
    with pytest.raises(ActlabError, match=r"x must be \[rows, 300\]"):
        sparse_matvec(x[:, :10], input_major(w), thr)


def _logits(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_path_equals_dense_with_the_same_zeros(arch, method):
    """Every mapped architecture's tiny model, both splices (the MLP module and, for TEAL / WINA, the attention
    projections overridden; Replace edits of the MLP only): the kernel on every call (prefill too) against the dense
    model given the zeros the sparse run chose, to 1e-5; and the zeros are really there."""
    from actlab.datasets import training_text

    model = tiny_model(arch)
    thresholds = calibrate(model, method, 0.5, texts=training_text("train")[:40], tokens=1024)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    for how in ("splice", "edits"):
        trace: dict = {}
        if how == "splice":
            with splice(model, thresholds, max_rows=None, trace=trace) as spliced:
                sparse = _logits(model(ids))
        else:
            spliced = sparse_edits(model, thresholds, max_rows=None, trace=trace)
            with model.edit(*spliced):
                sparse = _logits(model(ids))
        skipped = measured_sparsity(spliced)
        assert all(0.3 < s < 0.7 for k, s in skipped.items() if k.startswith("mlp.hidden"))
        assert all(0.1 < s < 0.9 for k, s in skipped.items() if k.startswith("attn"))  # random ids, not the text
        attn = {k for k in skipped if k.startswith("attn")}
        assert len(attn) == (6 if how == "splice" and method in ("teal", "wina") else 0)
        with same_zeros(model, trace):
            dense = _logits(model(ids))
        assert (sparse - dense).abs().max() <= 1e-5, how


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "phi3", "opt", "bert"])
def test_splice_skips_the_dense_mlp_where_it_is_one_module(arch):
    model = tiny_model(arch)
    thresholds = calibrate(model, "teal", 0.5, texts=["a few words of text. " * 6] * 6, tokens=256)
    one_module = arch not in ("opt", "bert")
    with splice(model, thresholds) as spliced:
        assert spliced.overridden == ([0, 1, 2] if one_module else [])
        with pytest.raises(ActlabError, match="already in place"):
            spliced.install()
        with model.capture(["mlp.in.0", "mlp.hidden.0"]) as cap:
            model("some text")
        assert cap["mlp.in.0"].shape[-1] == 32  # the module's hooks still run
        if one_module:
            with pytest.raises(ActlabError, match="nothing captured"):
                cap["mlp.hidden.0"]  # the down projection never ran
    assert all("forward" not in model.anatomy.mlp_module(i).__dict__ for i in range(3)) if one_module else True


def test_greedy_decode_runs_the_kernel_one_token_at_a_time():
    model = tiny_model("llama")
    thresholds = calibrate(model, "teal", 0.5, texts=["some calibration text, repeated. " * 8] * 8, tokens=512)
    trace: dict = {}
    with splice(model, thresholds, trace=trace):
        ids = model.generate("hello there", max_new_tokens=6, return_ids=True)
    rows = [k_in.shape[0] for k_in, _ in trace[0]]
    assert rows[0] == len("hello there") and rows[1:] == [1] * 5  # the prefill, then one row per step
    with model.edit(*mask_edits(trace)):
        assert torch.equal(model.generate("hello there", max_new_tokens=6, return_ids=True), ids)


@pytest.fixture(scope="module")
def demo_llama():
    import actlab

    return actlab.load("demo-llama")


@pytest.mark.parametrize("method", [pytest.param("teal", marks=pytest.mark.slow),
                                    pytest.param("wina", marks=pytest.mark.slow), "cats", "cett"])
def test_thresholds_hit_their_target_on_held_out_text(demo_llama, method):
    """Calibrated on the training text, run on the eval split (no padding: one document per call), the
    sparsity each input ran with is the target within 3 points (CETT: the mean over hidden inputs). TEAL and WINA
    cover the attention inputs too: four inputs a block calibrated in turn, slow (~25 s each on 2 quiet cores)."""
    from actlab.datasets import training_text

    target = 0.5
    thresholds = calibrate(demo_llama, method, target, tokens=4096)
    with splice(demo_llama, thresholds) as spliced:
        # about 5,000 tokens for the attention inputs: 12 passages (1,400) left attn.o 4 points off
        for text in training_text("eval")[:40 if method in ("teal", "wina") else 12]:
            demo_llama(text)
    got = measured_sparsity(spliced)
    hidden = [s for k, s in got.items() if k.startswith("mlp.hidden")]
    if method == "cett":
        assert abs(sum(hidden) / len(hidden) - target) <= 0.03
    else:
        checked = hidden if method == "cats" else list(got.values())
        assert all(abs(s - target) <= 0.03 for s in checked), got


def test_threshold_file_round_trip_and_refusals(tmp_path):
    model, other = tiny_model("llama"), tiny_model("qwen2")
    thresholds = calibrate(model, "wina", 0.4, texts=["a b c d e f g h"] * 20, tokens=128)
    path = thresholds.save(tmp_path / "t.safetensors")
    back = load_thresholds(path, model)
    assert back.method == "wina" and back.sparsity == 0.4 and back.rule == "hidden"
    assert back.tensors.keys() == thresholds.tensors.keys()
    assert all(torch.equal(back.tensors[k], v) for k, v in thresholds.tensors.items())
    with pytest.raises(ActlabError, match="calibrate them for this model"):
        load_thresholds(path, other)
    with pytest.raises(ActlabError, match="calibrate them for this model"):
        sparse_edits(other, back)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ActlabError, match="damaged"):
        load_thresholds(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("kwargs, match", [(dict(method="dejavu"), "unknown sparsity method"),
                                           (dict(sparsity=1.5), "fraction in"), (dict(sparsity=-0.1), "fraction in")])
def test_calibrate_refuses_bad_input(kwargs, match):
    with pytest.raises(ActlabError, match=match):
        calibrate(tiny_model("llama"), **{"method": "teal", "sparsity": 0.5, **kwargs})


def test_cli_sparsify_and_eval(tmp_path):
    from typer.testing import CliRunner

    from actlab.cli import app

    runner = CliRunner()
    out = tmp_path / "t.safetensors"
    result = runner.invoke(app, ["sparsify", "demo-gpt2", "--method", "teal", "--sparsity", "0.5", "--tokens", "512",
                                 "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    import actlab

    assert load_thresholds(out, actlab.load("demo-gpt2")).method == "teal"
    bad = runner.invoke(app, ["sparsify", "demo-gpt2", "--sparsity", "1.2", "-o", str(out)])
    assert bad.exit_code == 2 and "fraction in [0, 1)" in bad.output
    bad = runner.invoke(app, ["sparsify", "demo-gpt2", "--method", "cats", "--allocation", "greedy", "-o", str(out)])
    assert bad.exit_code == 2 and "greedy for teal and wina" in bad.output
    result = runner.invoke(app, ["sparse", "eval", "demo-gpt2", "--methods", "teal,cats", "--sparsities", "0.5",
                                 "--tokens", "512", "--genre-prompts", "1", "-o", str(tmp_path / "ev")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert [r["method"] for r in record["rows"]] == ["teal", "cats"]
    assert all(r["genre_rate"] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) for r in record["rows"])  # 5 prompts, one a genre
    assert 0 < record["rows"][0]["reads_skipped"] < 1 and record["rows"][0]["attn_in"] > 0.4  # TEAL: attention too
    assert all(v <= 1e-4 for v in record["exactness"].values())  # logits of a 6-layer fp32 model: rounding only
    assert "<img" in (tmp_path / "ev" / "report.html").read_text()
