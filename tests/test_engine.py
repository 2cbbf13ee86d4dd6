"""Runner, capture, edits and generation through the one hook engine."""

import pytest
import torch

from actlab.engine.batching import selection_mask, tokenize_documents
from actlab.engine.edits import AddVector, SetChannels
from actlab.errors import ActlabError
from tiny_models import ByteTokenizer, tiny_model

TEXTS = ["the quick brown fox jumps", "hi", "a somewhat longer sentence about nothing at all"]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "bert", "gemma2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_activations(arch, side):
    model = tiny_model(arch)
    ids, mask = model.tokenize(TEXTS, padding_side=side)
    with model.capture(["resid.*", "mlp.hidden.1"]) as batched:
        model(ids, attention_mask=mask)
    for i, text in enumerate(TEXTS):
        with model.capture(["resid.*", "mlp.hidden.1"]) as alone:
            model(text)
        for site in batched.sites:
            torch.testing.assert_close(batched[site][i][mask[i].bool()], alone[site][0], rtol=1e-4, atol=1e-5)


def test_capture_alignment_mask_and_flat():
    model = tiny_model("llama")
    with model.capture("resid.1") as cap:
        model(TEXTS)
    lengths = [len(t.encode()) for t in TEXTS]
    assert cap["resid.1"].shape == (3, max(lengths), model.d_model)
    assert cap.mask.sum(1).tolist() == lengths
    assert cap.flat("resid.1").shape == (sum(lengths), model.d_model)
    assert cap.input_ids.shape == cap.mask.shape
    with pytest.raises(ActlabError, match="not captured"):
        cap["resid.0"]


def test_runner_matches_capture_and_selects_positions():
    model = tiny_model("gpt2")

    class Keep:
        def __init__(self):
            self.batches = []

        def consume(self, batch):
            self.batches.append(batch)

    keep = Keep()
    summary = model.run(TEXTS, ["resid.0", "mlp.hidden.2"], keep, batch_size=2)
    assert summary.n_tokens == sum(len(t.encode()) for t in TEXTS) == summary.n_selected
    acts = torch.cat([b.acts["mlp.hidden.2"] for b in keep.batches])
    with model.capture("mlp.hidden.2") as cap:
        model(TEXTS)
    torch.testing.assert_close(acts, cap.flat("mlp.hidden.2"), rtol=1e-5, atol=1e-6)
    last = model.collect(TEXTS, "resid.0", positions="last")
    assert last.doc_ids.tolist() == [0, 1, 2]
    assert last.positions.tolist() == [len(t.encode()) - 1 for t in TEXTS]
    torch.testing.assert_close(last.acts["resid.0"][2], cap_last(model, TEXTS[2]), rtol=1e-5, atol=1e-6)
    span = model.collect(TEXTS, "resid.0", positions=(1, 3))
    assert span.positions.tolist() == [1, 2, 1, 1, 2]  # "hi" has only position 1 in the span


def test_runner_reads_in_place_without_copying_unless_the_model_changes_the_tensor():
    """With every token selected the runner hands sinks the site's own tensor (a view, no copy); a model that
    later changes that tensor in place is caught by its version counter, and the batch is run again with copies,
    so the rows are still the site's values when it was read."""
    model = tiny_model("llama")
    texts = ["abcdefgh", "ijklmnop"]  # equal lengths: no padding, every token selected
    want = model.collect(texts, "resid.0", positions="all", batch_size=2).acts["resid.0"]
    layer1 = model.hf.model.layers[1]

    def triple_in_place(module, args, kwargs):
        (args[0] if args else kwargs["hidden_states"]).mul_(3.0)  # returns None: the inputs stay, changed

    handle = layer1.register_forward_pre_hook(triple_in_place, with_kwargs=True)
    try:
        got = model.collect(texts, ["resid.0", "resid.2"], positions="all", batch_size=1)
    finally:
        handle.remove()
    torch.testing.assert_close(got.acts["resid.0"], want, rtol=0, atol=0)  # not the tripled values
    assert not torch.allclose(got.acts["resid.2"], model.collect(texts, "resid.2", positions="all").acts["resid.2"])
    # without any in-place change the rows share memory with the forward's own tensor: nothing was copied
    from actlab.engine.runner import RunOptions, _Reader

    reader = _Reader(["resid.0"], RunOptions(positions="all", stop_early=False))
    reader.every_token = True
    h = torch.randn(2, 5, 4)
    reader("resid.0", h, None)
    assert reader.collected["resid.0"].data_ptr() == h.data_ptr() and not reader.changed()
    h.add_(1.0)
    assert reader.changed()


def cap_last(model, text):
    with model.capture("resid.0") as cap:
        model(text)
    return cap["resid.0"][0, -1]


def test_long_documents_are_chunked_with_continuing_positions():
    rows = tokenize_documents(ByteTokenizer(), ["x" * 150], max_length=64)
    assert [(r.start, len(r.ids)) for r in rows] == [(0, 64), (64, 64), (128, 22)]
    sel = selection_mask(rows, 64, "last")
    assert sel.sum() == 1 and sel[2, 21]
    with pytest.warns(UserWarning, match="truncated"):
        rows = tokenize_documents(ByteTokenizer(), ["x" * 150], max_length=64, long_docs="truncate")
    assert len(rows) == 1


def test_empty_inputs_are_clear_errors():
    model = tiny_model("gpt2")
    with pytest.raises(ActlabError, match="empty"):
        model.run([], "resid.0")
    with pytest.raises(ActlabError, match="empty"):
        model.run(["", ""], "resid.0")
    with pytest.raises(ActlabError):
        model([])
    with pytest.raises(ActlabError, match="token ids"):
        model(torch.tensor([[5, 500]]))


def test_edit_changes_downstream_only_and_handle_restores():
    model = tiny_model("llama")
    vec = torch.randn(model.d_model)
    with model.capture(["resid.0", "resid.1", "resid.2"]) as plain:
        model(TEXTS[0])
    with model.edit(AddVector("resid.1", vec, 2.0)), model.capture(["resid.0", "resid.1", "resid.2"]) as edited:
        model(TEXTS[0])
    torch.testing.assert_close(edited["resid.0"], plain["resid.0"])
    torch.testing.assert_close(edited["resid.1"], plain["resid.1"] + 2.0 * vec, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(edited["resid.2"], plain["resid.2"])
    with model.capture("resid.2") as after:
        model(TEXTS[0])
    torch.testing.assert_close(after["resid.2"], plain["resid.2"])


def test_set_channels_clamps_neurons():
    model = tiny_model("gpt2")
    edit = SetChannels("mlp.hidden.0", [1, 5], 3.0)
    with model.edit(edit), model.capture("mlp.hidden.0") as cap:
        model(TEXTS[:2])
    assert torch.all(cap["mlp.hidden.0"][..., [1, 5]] == 3.0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_generate_edit_with_kv_cache_equals_no_cache(arch, positions):
    model = tiny_model(arch)
    prompts = ["hello there friend", "hi"]
    torch.manual_seed(0)
    vec = torch.randn(model.d_model) * 4
    plain = model.generate(prompts, max_new_tokens=6, return_ids=True)
    solo = [model.generate(p, max_new_tokens=6, return_ids=True)[0] for p in prompts]
    assert all(torch.equal(plain[i], solo[i]) for i in range(2))
    with model.edit(AddVector("resid.1", vec, 1.0, positions=positions)):
        cached = model.generate(prompts, max_new_tokens=6, return_ids=True)
        uncached = model.generate(prompts, max_new_tokens=6, return_ids=True, use_cache=False)
        with model.capture("resid.1") as cap:
            model.generate(prompts, max_new_tokens=3)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)
    assert cap["resid.1"].shape[:2] == (2, cap.mask.shape[1])  # prefill + cached steps joined on the sequence axis


def test_bad_edits_are_one_line_errors():
    model = tiny_model("gpt2")
    with pytest.raises(ActlabError, match="NaN"):
        AddVector("resid.0", torch.ones(32), float("nan"))
    with pytest.raises(ActlabError, match="width"):
        with model.edit(AddVector("resid.0", torch.ones(7))):
            model("abc")
    with pytest.raises(ActlabError, match="unknown site"):
        model.edit(AddVector("resid.x", torch.ones(32)))


def _logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "gemma2", "gpt_neox", "bert"])
def test_replacing_the_mlp_by_itself_changes_nothing(arch):
    """Replace("mlp.1", the MLP applied to mlp.in.1) is the identity; Replace by zeros is not."""
    from actlab.engine.edits import Replace
    from mlp_parts import mlp_of

    model = tiny_model(arch)
    ids = torch.randint(3, 90, (2, 7))
    plain = _logits(model, ids)
    with model.edit(Replace("mlp.1", mlp_of(model, arch, 1))):
        same = _logits(model, ids)
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-5)
    with model.edit(Replace("mlp.1", torch.zeros_like)):
        zeroed = _logits(model, ids)
    assert not torch.allclose(zeroed, plain, atol=1e-3)
    assert not model.hooks.active


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_replacing_a_block_by_itself_changes_nothing(arch):
    """Replace("resid.1", the block applied to resid.0) is the identity; resid.0 reads embed by default."""
    from actlab.engine.edits import Replace
    from mlp_parts import block

    model = tiny_model(arch)
    layer = block(model, 1)

    def again(x: torch.Tensor) -> torch.Tensor:
        if arch == "gpt2":
            out = layer(x)
        else:  # llama blocks take the rotary position embeddings from the model
            positions = torch.arange(x.shape[1]).unsqueeze(0)
            out = layer(x, position_embeddings=model.hf.model.rotary_emb(x, positions))
        return out[0] if isinstance(out, tuple) else out

    ids = torch.randint(3, 90, (1, 7))
    plain = _logits(model, ids)
    with model.edit(Replace("resid.1", again)):
        torch.testing.assert_close(_logits(model, ids), plain, rtol=0, atol=1e-5)
    with model.edit(Replace("resid.1", torch.zeros_like)):
        assert not torch.allclose(_logits(model, ids), plain, atol=1e-3)
    with model.edit(Replace("resid.0", lambda x: x + 1.0)), model.capture(["embed", "resid.0"]) as cap:
        model(ids)
    torch.testing.assert_close(cap["resid.0"], cap["embed"] + 1.0)  # resid.0 reads embed by default


def test_replace_errors():
    from actlab.engine.edits import Replace

    model = tiny_model("gpt2")
    with pytest.raises(ActlabError, match="input_site"):
        Replace("attn.1", torch.zeros_like)
    with pytest.raises(ActlabError, match="callable"):
        Replace("mlp.1", 3.0)
    with pytest.raises(ActlabError, match="shape"):
        with model.edit(Replace("mlp.1", lambda x: x[..., :4])):
            model("abc")
    with pytest.raises(ActlabError, match="not seen"):  # the input site runs after the replaced one
        with model.edit(Replace("resid.0", torch.zeros_like, input_site="resid.2")):
            model("abc")
    with model.edit(Replace("attn.1", torch.zeros_like, input_site="resid.0")), model.capture("attn.1") as cap:
        model("abc")
    assert torch.equal(cap["attn.1"], torch.zeros_like(cap["attn.1"]))
