"""engine.memory: the allocator tuning is done once, can be turned off, and the flat-copy reader path equals
the mask-indexed one."""

from __future__ import annotations

import sys

import pytest
import torch

import actlab.engine.memory as memory
from tiny_models import tiny_model


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(memory, "_done", None)


def test_turned_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("ACTLAB_MALLOC_TUNING", "off")
    assert memory.retain_freed_memory() is False
    monkeypatch.setenv("ACTLAB_MALLOC_TUNING", "on")
    assert memory.retain_freed_memory() is False  # decided once per process


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tunes_glibc_once(fresh, monkeypatch):
    monkeypatch.delenv("ACTLAB_MALLOC_TUNING", raising=False)
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert memory.retain_freed_memory() is True and memory._done is True


def test_every_token_rows_equal_masked_rows():
    model = tiny_model("llama")
    docs = [[5, 6, 7, 8], [9, 10, 11, 12]]  # equal lengths: no padding, every position selected
    flat = model.collect(docs, ["resid.0", "mlp.hidden.1"], positions="all", batch_size=2)
    one_by_one = [model.collect([d], ["resid.0", "mlp.hidden.1"], positions="all", batch_size=1) for d in docs]
    ragged = model.collect(docs + [[3, 4]], ["resid.0", "mlp.hidden.1"], positions="all", batch_size=3)  # padded
    for site in ("resid.0", "mlp.hidden.1"):
        joined = torch.cat([c.acts[site] for c in one_by_one])
        assert torch.allclose(flat.acts[site], joined, atol=1e-6)
        assert torch.allclose(ragged.acts[site][:8], flat.acts[site], atol=1e-6)
        assert flat.acts[site].is_contiguous() and flat.acts[site].shape[0] == 8
