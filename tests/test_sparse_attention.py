"""Attention projections in the sparse path (issue #16): the anatomy's q/k/v/o weights, decode through the kernel."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from actlab.errors import ActlabError
from actlab.sparse.attention import same_zeros
from actlab.sparse.mlp import measured_sparsity, splice
from actlab.sparse.thresholds import calibrate
from tiny_models import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_attn_parts_are_the_modules_maps(arch):
    """Each projection's [out, in] weight and bias give the module's own output (GPT-2's Conv1D is transposed), and
    q/k/v read d_model while o writes it."""
    model = tiny_model(arch)
    parts = model.anatomy.attn_parts(1)
    x = torch.randn(3, model.d_model, generator=torch.Generator().manual_seed(0))
    for proj in parts.qkv:
        assert torch.allclose(proj.module(x), F.linear(x, proj.weight, proj.bias), atol=1e-6)
    assert parts.o.weight.shape[0] == model.d_model
    h = torch.randn(3, parts.o.weight.shape[1], generator=torch.Generator().manual_seed(1))
    assert torch.allclose(parts.o.module(h), F.linear(h, parts.o.weight, parts.o.bias), atol=1e-6)
    with pytest.raises(ActlabError, match="no attention module"):
        model.anatomy.attn_parts(7)


def test_decode_runs_the_attention_projections_through_the_kernel():
    """Greedy decode with TEAL thresholds on every input: the prefill takes the module's forward with the zeros, then
    one row per step goes through the kernel; the dense model given the same zeros decodes the same tokens; the
    overrides are gone afterwards."""
    model = tiny_model("qwen3")
    thresholds = calibrate(model, "teal", 0.5, texts=["some calibration text, repeated. " * 8] * 8, tokens=512)
    trace: dict = {}
    with splice(model, thresholds, trace=trace) as spliced:
        ids = model.generate("hello there", max_new_tokens=6, return_ids=True)
        with pytest.raises(ActlabError, match="already overridden"):
            model.anatomy.override_projection(model.anatomy.attn_parts(0).o, lambda x, dense: dense(x))
    rows = [keep.reshape(-1, keep.shape[-1]).shape[0] for keep in trace[("attn.o.2", 0)]]
    assert rows[0] == len("hello there") and rows[1:] == [1] * 5
    assert all(0.05 < s < 0.95 for k, s in measured_sparsity(spliced).items() if k.startswith("attn"))
    with same_zeros(model, trace):
        assert torch.equal(model.generate("hello there", max_new_tokens=6, return_ids=True), ids)
    parts = model.anatomy.attn_parts(2)
    assert all("forward" not in p.module.__dict__ for p in parts.qkv + (parts.o,))


def test_attention_can_be_left_dense():
    model = tiny_model("llama")
    thresholds = calibrate(model, "wina", 0.5, texts=["a b c d e f g h"] * 20, tokens=128, attention=False)
    assert sorted({k.rsplit(".", 1)[0] for k in thresholds.tensors}) == ["mlp.hidden", "mlp.in"]


@pytest.mark.slow
def test_greedy_allocation_hits_its_levels_on_held_out_text():
    """TEAL's greedy allocation on the tiny Llama (tuned on training text): every block's weight-weighted level is
    the target, the levels differ between inputs, and on the held-out split each input runs at its own level
    within 3 points."""
    from actlab.datasets import training_text
    from actlab.sparse.allocate import effective_sparsity, unit_weights

    model = tiny_model("llama")
    thresholds = calibrate(model, "teal", 0.5, texts=training_text("train")[:60], tokens=1024, allocation="greedy",
                           tune_tokens=384)
    levels = thresholds.info["levels"]
    assert all(abs(effective_sparsity(levels[i], unit_weights(model, i)) - 0.5) < 1e-6 for i in range(3))
    assert any(len({round(v, 6) for v in levels[i].values()}) > 1 for i in range(3))
    with splice(model, thresholds) as spliced:
        for text in training_text("eval")[:30]:
            model(text[:200])
    got = measured_sparsity(spliced)
    assert all(abs(got[f"{u}.{i}"] - level) <= 0.03 for i in range(3) for u, level in levels[i].items() if level > 0)
    with pytest.raises(ActlabError, match="allocation"):
        calibrate(model, "cats", 0.5, texts=["a b c"] * 4, tokens=64, allocation="greedy")
