"""The engine's shared APIs: run options (select, grad, device), encode_pair, token_nll, prompt_length, configs."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from actlab.engine.batching import continuation_mask, encode_pair, pair_rows
from actlab.engine.config import Config
from actlab.engine.edits import AddVector
from actlab.engine.grad import frozen_weights
from actlab.engine.hooks import StopForward
from actlab.engine.likelihood import layout, token_nll
from actlab.engine.runner import RunOptions, run
from actlab.errors import ActlabError
from tiny_models import ByteTokenizer, tiny_model

TEXTS = ["the quick brown fox jumps", "hi", "a somewhat longer sentence about nothing at all"]


def byte(text: str) -> list[int]:
    return ByteTokenizer()(text)["input_ids"]


def test_engine_imports_nothing_from_models():
    code = ("import sys, actlab.engine.runner, actlab.engine.likelihood, actlab.engine.edits, actlab.engine.grad, "
            "actlab.engine.capture; print(sorted(m for m in sys.modules if m.startswith('actlab.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_encode_pair_layout_and_limits():
    tok = ByteTokenizer()
    assert encode_pair(tok, "ab", "cde", max_length=None) == (byte("ab"), byte("cde"))
    assert encode_pair(tok, "", "cde", max_length=None) == ([], byte("cde"))
    assert encode_pair(tok, "ab", "cdefg", max_length=None, max_continuation=2) == (byte("ab"), byte("cd"))
    # too long: the prompt loses its start, and keeps one token when the continuation fills the context
    assert encode_pair(tok, "abcd", "efg", max_length=5) == (byte("cd"), byte("efg"))
    assert encode_pair(tok, "abcd", "efghij", max_length=4) == (byte("d"), byte("efg"))
    assert encode_pair(tok, "", "efghij", max_length=4) == ([], byte("efgh"))


def test_select_overrides_positions_and_rows_carry_the_prompt():
    model = tiny_model("gpt2")
    pairs = [encode_pair(model.tokenizer, "abc", "defg", max_length=None), encode_pair(model.tokenizer, "", "xy",
                                                                                        max_length=None)]
    rows = pair_rows(pairs)
    assert [r.prompt_length for r in rows] == [3, 0]
    got = model.collect(None, "resid.1", rows=rows, select=continuation_mask)
    assert got.positions.tolist() == [3, 4, 5, 6, 0, 1] and got.doc_ids.tolist() == [0, 0, 0, 0, 1, 1]
    every = model.collect(None, "resid.1", rows=rows, positions="all")
    keep = torch.tensor([False] * 3 + [True] * 6)
    torch.testing.assert_close(got.acts["resid.1"], every.acts["resid.1"][keep])


def test_grad_keeps_the_graph_and_device_none_stays_on_the_model():
    model = tiny_model("llama")
    vec = torch.zeros(model.d_model, requires_grad=True)
    with frozen_weights(model), model.edit(AddVector("resid.0", vec)):
        batch = model.collect(TEXTS, "resid.1", positions="all", grad=True, device=None)
        acts = batch.acts["resid.1"]
        assert acts.requires_grad and acts.device == model.device
        acts.pow(2).sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.hf.parameters())
    plain = model.collect(TEXTS, "resid.1", positions="all")
    assert not plain.acts["resid.1"].requires_grad
    torch.testing.assert_close(plain.acts["resid.1"], acts.detach())


def test_run_options_and_overrides():
    model = tiny_model("gpt2")
    seen = []

    class Keep:
        def consume(self, batch):
            seen.append(batch.n_tokens)

    opts = RunOptions(batch_size=1, positions="last")
    summary = run(model, TEXTS, "resid.0", Keep(), options=opts)
    assert summary.n_selected == 3 and seen == [1, 1, 1]
    summary = run(model, TEXTS, "resid.0", Keep(), options=opts, batch_size=3)  # a keyword overrides the options
    assert seen[-1] == 3
    with pytest.raises(ActlabError, match="unknown RunOptions option"):
        run(model, TEXTS, "resid.0", Keep(), batchsize=2)
    with pytest.raises(ActlabError, match="batch_size"):
        RunOptions(batch_size=0)

    class Halt:  # stops the forward before the requested site
        site = "resid.0"

        def __call__(self, h, state):
            raise StopForward

    with model.edit(Halt()), pytest.raises(ActlabError, match="never reached"):
        run(model, TEXTS, "resid.2", Keep())


def test_token_nll_matches_the_hf_loss_and_batching():
    model = tiny_model("llama")
    examples = [(byte("ab"), byte("cdef")), ([], byte("ghijk")), (byte("lmnop"), byte("q"))]
    total, n = token_nll(model, examples, batch_size=3, prompt_length_known=True)
    assert n == 4 + 4 + 1
    want = 0.0
    for p, c in examples:  # one at a time, no padding, through the HF model's own loss
        ids = torch.tensor([p + c])
        labels = ids.clone()
        labels[0, : max(len(p), 1)] = -100
        with torch.no_grad():
            out = model.hf(input_ids=ids, labels=labels)
        want += float(out.loss) * int((labels[0, 1:] != -100).sum())
    assert float(total) == pytest.approx(want, rel=1e-5)
    one, _ = token_nll(model, examples, batch_size=1, prompt_length_known=True)
    assert float(one) == pytest.approx(float(total), rel=1e-5)
    ids, mask, labels, P = layout(examples, 0)
    assert P == 5 and mask.sum(1).tolist() == [6, 5, 6] and (labels != -100).sum() == 9


def test_token_nll_grad_and_prompt_length():
    model = tiny_model("llama")
    examples = [(byte("ab"), byte("cdef")), (byte("xyz"), byte("uv"))]
    vec = torch.zeros(model.d_model, requires_grad=True)
    seen = []

    class Spy:
        site = "resid.1"

        def __call__(self, h, state):
            seen.append(state.prompt_length)
            return h

    with frozen_weights(model), model.edit(AddVector("resid.0", vec, positions="generated"), Spy()):
        total, n = token_nll(model, examples, batch_size=2, prompt_length_known=True, grad=True)
        (total / n).backward()
        token_nll(model, examples, batch_size=2, prompt_length_known=False)
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    assert seen == [3, None] and model.hooks.state.prompt_length is None
    with model.hooks.prompt_length(4):
        assert model.hooks.state.prompt_length == 4
        with model.hooks.prompt_length(None):
            assert model.hooks.state.prompt_length is None
        assert model.hooks.state.prompt_length == 4
    assert model.hooks.state.prompt_length is None


@dataclass
class _Toy(Config):
    steps: int = 3
    name: str = "a"

    def validate(self) -> None:
        if self.steps < 1:
            raise ActlabError("steps must be positive")


def test_config_overrides_and_round_trip():
    base = _Toy(steps=5)
    assert _Toy.with_overrides(None, {}) == _Toy()
    assert _Toy.with_overrides(base, {"name": "b"}) == _Toy(steps=5, name="b")
    assert base.steps == 5  # not modified in place
    with pytest.raises(ActlabError, match="unknown _Toy option.*stpes"):
        _Toy.with_overrides(base, {"stpes": 2})
    with pytest.raises(ActlabError, match="positive"):
        _Toy.with_overrides(base, {"steps": 0})
    with pytest.raises(ActlabError, match="must be a _Toy"):
        _Toy.with_overrides(RunOptions(), {})
    assert _Toy.from_dict({**base.to_dict(), "future_key": 1}) == base


def test_model_facts():
    model = tiny_model("gpt2")
    assert model.vocab_size == 96
    assert model.n_params == sum(p.numel() for p in model.hf.parameters())
    assert model.anatomy is model.anatomy  # built once
