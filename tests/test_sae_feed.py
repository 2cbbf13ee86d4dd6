"""Feeding SAE training (issue #13): the model stream is a deterministic function of the step, bounded
in memory, resumable bit-identically; several SAEs from one stream equal each trained alone; stores."""

from __future__ import annotations

import pytest
import torch

from actlab.errors import ActlabError
from actlab.sae import SAETrainConfig, train_sae
from actlab.sae.batches import StepBatches
from actlab.sae.feed import ModelStream, store_feed, train_many

TEXTS = [f"document {i}: " + " ".join(f"word{(i * 7 + j) % 31}" for j in range(20 + i % 9)) for i in range(60)]
SMALL = dict(n_latents=64, k=4, batch_size=128, lr=1e-3)


@pytest.fixture(scope="module")
def stream(llama):
    return ModelStream(llama, TEXTS, ["resid.1", "mlp.in.1", "mlp.1"], batch_size=128, chunk_tokens=512, seed=3)


def test_stream_batches_are_a_function_of_the_step(llama, stream):
    other = ModelStream(llama, TEXTS, ["resid.1", "mlp.in.1", "mlp.1"], batch_size=128, chunk_tokens=512, seed=3)
    steps = [0, 5, stream.batches_per_epoch + 1, 2]  # out of order, across an epoch boundary
    for step in steps:
        a, b = stream(step), other(step)
        assert all(torch.equal(a[s], b[s]) for s in a) and a["resid.1"].shape == (128, llama.d_model)
    assert not torch.equal(stream(0)["resid.1"], stream(1)["resid.1"])


def test_stream_hands_out_a_chunk_as_a_permutation_of_its_tokens(llama, stream):
    """The first chunk's batches are consecutive slices of one permutation of the chunk's tokens, which are
    exactly the activations the model gives for the chunk's documents; only one chunk is kept in memory."""
    chunks, ends = stream._plan(0)
    batches = torch.cat([stream(s)["resid.1"] for s in range(ends[0])])
    held = stream._cache[1]["resid.1"]
    assert torch.equal(batches, held[:ends[0] * 128])
    direct = llama.collect([TEXTS[d] for d in chunks[0]], ["resid.1"], positions="all").acts["resid.1"].float()
    probe = torch.randn(llama.d_model, generator=torch.Generator().manual_seed(0))
    assert held.shape == direct.shape
    assert torch.allclose((held @ probe).sort().values, (direct @ probe).sort().values, atol=1e-5)
    assert ends[0] * 128 <= held.shape[0] < (ends[0] + 1) * 128  # the remainder of a chunk is skipped
    assert held.shape[0] < 512 + 60  # about chunk_tokens rows, never the whole run


def test_stream_training_resumes_bit_identically(llama, stream, tmp_path, monkeypatch):
    cfg = SAETrainConfig(steps=12, checkpoint_every=4, **SMALL)
    whole = train_sae(stream.site("resid.1"), llama.d_model, cfg).sae
    real_get = StepBatches.get

    def get(self, step):
        if step == 9:
            raise KeyboardInterrupt
        return real_get(self, step)

    monkeypatch.setattr(StepBatches, "get", get)
    with pytest.raises(KeyboardInterrupt):
        train_sae(stream.site("resid.1"), llama.d_model, cfg, checkpoint_dir=tmp_path)
    monkeypatch.setattr(StepBatches, "get", real_get)
    resumed = train_sae(stream.site("resid.1"), llama.d_model, cfg, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 8
    assert all(torch.equal(v, resumed.sae.state_dict()[k]) for k, v in whole.state_dict().items())


def test_several_saes_from_one_stream_equal_each_trained_alone(llama, stream):
    jobs = {"wide": ("resid.1", SAETrainConfig(steps=6, **SMALL)),
            "sparse": ("resid.1", SAETrainConfig(steps=6, **{**SMALL, "k": 2, "n_latents": 32})),
            "tc": (("mlp.in.1", "mlp.1"), SAETrainConfig(steps=6, **SMALL))}
    together = train_many(stream, jobs)
    alone = train_sae(stream.site("resid.1"), llama.d_model, jobs["sparse"][1]).sae
    assert all(torch.equal(v, together["sparse"].sae.state_dict()[k]) for k, v in alone.state_dict().items())
    tc = train_sae(stream.pair("mlp.in.1", "mlp.1"), llama.d_model, jobs["tc"][1], d_out=llama.d_model).sae
    assert tc.transcoder and torch.equal(tc.W_dec, together["tc"].sae.W_dec)
    with pytest.raises(ActlabError, match="batch_size"):
        train_many(stream, {"x": ("resid.1", SAETrainConfig(steps=2, **{**SMALL, "batch_size": 64}))})


def test_stream_refuses_bad_input(llama):
    with pytest.raises(ActlabError, match="non-empty"):
        ModelStream(llama, ["", "  "], ["resid.1"])
    with pytest.raises(ActlabError, match="fewer than one batch"):
        ModelStream(llama, ["tiny"], ["resid.1"], batch_size=4096)
    s = ModelStream(llama, TEXTS, ["resid.1"], batch_size=128, chunk_tokens=512)
    with pytest.raises(ActlabError, match="records"):
        s.site("resid.0")


def test_training_from_a_store(llama, tmp_path):
    from actlab.store import record

    store = record(llama, TEXTS, ["resid.1"], tmp_path / "store", shard_tokens=300)
    feed = store_feed(store, "resid.1", 128, steps=20, seed=1)
    run = train_sae(feed, llama.d_model, SAETrainConfig(steps=20, **SMALL))
    again = train_sae(store_feed(store, "resid.1", 128, steps=20, seed=1), llama.d_model,
                      SAETrainConfig(steps=20, **SMALL))
    assert torch.equal(run.sae.W_dec, again.sae.W_dec)  # the shuffled reader is re-iterable and seeded
    assert run.history[-1]["fvu"] < run.history[0]["fvu"]
