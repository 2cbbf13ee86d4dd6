"""ReLU-fication (issue #16): the swap, the progressive L1 schedule, sparsity rising, checkpoint and resume."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from actlab.errors import ActlabError
from actlab.sparse.relufy import RelufyConfig, ShiftedReLU, hidden_sparsity, l1_weight, load_relufied, relufy, \
    relufy_finetune
from tiny_models import tiny_hf_model, tiny_model

_TEXTS = ["the cat sat on the mat and looked at the dog. " * 4, "numbers 1 2 3 4 5 6 7 8 9 and letters a b c. " * 4] * 8


def _fresh_llama():
    import copy

    import actlab
    from tiny_models import ByteTokenizer

    return actlab.load(copy.deepcopy(tiny_hf_model("llama")), tokenizer=ByteTokenizer())


def test_relufy_swaps_the_activation_for_relu():
    model = _fresh_llama()
    relufy(model, shift=0.1)
    parts = model.anatomy.mlp_parts(1)
    assert isinstance(parts.act, ShiftedReLU)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    expected = F.linear(F.relu(F.linear(x, parts.gate) - 0.1) * F.linear(x, parts.up), parts.down)
    with model.capture(["mlp.in.1", "mlp.1"]) as cap:
        model("some text to run")
    assert torch.allclose(parts(cap["mlp.in.1"]), cap["mlp.1"], atol=1e-6)
    assert torch.allclose(parts(x), expected, atol=1e-6)
    assert not isinstance(tiny_model("llama").anatomy.mlp_parts(1).act, ShiftedReLU)  # a copy was changed


def test_l1_schedule_rises_in_stages_then_holds():
    config = RelufyConfig(steps=100, l1_max=0.5, l1_warmup=0.5, l1_stages=5)
    weights = [l1_weight(t, config) for t in range(100)]
    assert weights[0] == pytest.approx(0.1) and weights[-1] == 0.5
    assert all(b >= a for a, b in zip(weights, weights[1:])) and len(set(weights)) == 5
    assert all(w == 0.5 for w in weights[50:])


def test_finetune_raises_sparsity_and_resumes_exactly(tmp_path):
    """A short run with a strong L1 makes more neurons exactly zero than right after the swap; 6 steps in one go and
    3 + 3 resumed from the checkpoint give the same weights."""
    torch.manual_seed(0)
    config = RelufyConfig(steps=6, batch_size=4, seq_len=32, lr=3e-3, l1_max=5.0, l1_warmup=0.5, l1_stages=2,
                          checkpoint_every=3)
    whole = _fresh_llama()
    relufy(whole)
    before = hidden_sparsity(whole, _TEXTS[:4])
    history = relufy_finetune(whole, tmp_path / "a", config, texts=_TEXTS)
    assert [h["step"] for h in history] == list(range(6)) and history[0]["l1_weight"] < history[-1]["l1_weight"]
    assert hidden_sparsity(whole, _TEXTS[:4]) > before + 0.05

    resumed = _fresh_llama()
    relufy_finetune(resumed, tmp_path / "b", config, texts=_TEXTS, until=3)  # interrupted after 3 steps
    with pytest.raises(ActlabError, match="other settings"):
        relufy_finetune(_fresh_llama(), tmp_path / "b", RelufyConfig(**{**config.__dict__, "lr": 1e-3}),
                        texts=_TEXTS, resume=True)
    relufy_finetune(resumed, tmp_path / "b", config, texts=_TEXTS, resume=True)
    for (n, a), (_, b) in zip(whole.hf.named_parameters(), resumed.hf.named_parameters()):
        assert torch.equal(a, b), n
    loaded = _fresh_llama()
    load_relufied(loaded, tmp_path / "a" / "checkpoint.safetensors")
    assert isinstance(loaded.anatomy.mlp_parts(0).act, ShiftedReLU)
    assert all(torch.equal(a, b) for a, b in zip(whole.hf.parameters(), loaded.hf.parameters()))
