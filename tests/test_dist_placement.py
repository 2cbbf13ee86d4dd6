"""Which devices a torchrun rank uses (``dist.placement`` for --device, ``models.placement`` for device maps):
pure choices from (local rank, ranks per machine, GPUs) with made-up GPU counts; on this CPU-only machine
the real paths leave every device and map as they were."""

from __future__ import annotations

import copy

import pytest
import torch

import actlab
from actlab.dist import Rank
from actlab.dist import placement as dp
from actlab.errors import ActlabError
from actlab.models import placement as mp


def test_bare_cuda_is_the_ranks_own_gpu():
    assert [dp.choose_device("cuda", r, 4, 4) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [dp.choose_device("cuda", r, 2, 8) for r in range(2)] == ["cuda:0", "cuda:1"]
    assert dp.choose_device("cuda", 3, 4, 1) == "cuda:0"  # each rank sees one GPU (CUDA_VISIBLE_DEVICES per rank)
    for kept in ("cpu", "cuda:5", "auto", "map.json"):
        assert dp.choose_device(kept, 1, 2, 2) == kept
    assert dp.choose_device("cuda", 0, 1, 4) == "cuda"  # alone on the machine: unchanged
    assert dp.choose_device("cuda", 1, 2, 0) == "cuda"  # no GPU: unchanged (loading says it is unavailable)
    with pytest.raises(ActlabError, match="LOCAL_RANK=2 has no GPU of its own: this machine shows 2 GPUs for 4"):
        dp.choose_device("cuda", 2, 4, 2)


def test_a_device_map_rank_owns_an_even_slice_of_the_gpus():
    assert [mp.rank_gpus(r, 2, 8) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [mp.rank_gpus(r, 4, 4) for r in range(4)] == [[0], [1], [2], [3]]
    assert mp.rank_gpus(0, 1, 3) == [0, 1, 2] and mp.rank_gpus(1, 2, 0) == [] and mp.rank_gpus(1, 2, 1) == [0]
    for local_world, n_gpus in ((3, 8), (4, 2)):
        with pytest.raises(ActlabError, match="is ambiguous"):
            mp.rank_gpus(0, local_world, n_gpus)


def test_a_strategys_budget_names_the_ranks_gpus_only():
    measured = {0: 80, 1: 80, 2: 80, 3: 80, "cpu": 1000}
    assert mp.rank_budget(None, 1, 2, 4, lambda: measured) == {2: 80, 3: 80, "cpu": 500}  # CPU memory shared
    assert mp.rank_budget(None, 3, 4, 4, lambda: measured) == {3: 72, "cpu": 250}  # one GPU: accelerate's 10% buffer
    assert mp.rank_budget(None, 0, 1, 4, lambda: measured) is None  # alone on the machine: accelerate measures all
    given = {0: 10, 1: 11, 2: 12, 3: 13, "cpu": 99, "disk": 7}
    assert mp.rank_budget(given, 0, 2, 4, lambda: measured) == {0: 10, 1: 11, "cpu": 99, "disk": 7}
    assert mp.rank_budget(given, 1, 2, 4, lambda: measured) == {2: 12, 3: 13, "cpu": 99, "disk": 7}
    assert mp.rank_budget({"cpu": 5}, 1, 2, 4, lambda: measured) == {"cpu": 5}  # no GPU named: the CPU only
    with pytest.raises(ActlabError, match=r"LOCAL_RANK 1's \(\[2, 3\]\) has none"):  # refused on rank 0 too
        mp.rank_budget({0: 10, "cpu": 9}, 0, 2, 4, lambda: measured)


def test_an_explicit_map_naming_gpus_is_refused_with_several_ranks_per_machine():
    mp.check_rank_map({"model": "cpu", "lm_head": "disk"}, 2, 4)
    mp.check_rank_map({"model": "cuda:0"}, 1, 4)  # one rank per machine
    mp.check_rank_map({"model": "cuda:0"}, 4, 1)  # each rank sees its own single GPU
    with pytest.raises(ActlabError, match="names cuda:1, but torchrun started 2 ranks on this machine of 4 GPUs"):
        mp.check_rank_map({"model": "cpu", "lm_head": "cuda:1"}, 2, 4)


def _torchrun_env(monkeypatch, rank: int, world: int) -> None:
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", rank), ("LOCAL_WORLD_SIZE", world)):
        monkeypatch.setenv(name, str(value))


def test_restrict_for_rank_with_four_fake_gpus(monkeypatch):
    """The path models.placement takes, with CUDA faked: rank 1 of 2 keeps to GPUs 2 and 3."""
    import accelerate.utils
    from tiny_models import tiny_hf_model

    hf = tiny_hf_model("llama")
    half = accelerate.utils.compute_module_sizes(hf)[""] // 2
    _torchrun_env(monkeypatch, 1, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {**{g: half for g in range(4)}, "cpu": 8 * half})
    budget = mp.restrict_for_rank("auto", None)
    assert budget == {2: half, 3: half, "cpu": 4 * half}
    # accelerate's own inference within that budget: blocks on GPUs 2 and 3 only (the rest offloaded to the CPU)
    placed = accelerate.utils.infer_auto_device_map(hf, max_memory=budget, no_split_module_classes=hf._no_split_modules)
    assert {v for v in placed.values() if isinstance(v, int)} == {2, 3} and "cpu" in placed.values()
    with pytest.raises(ActlabError, match="every rank gets the same map"):
        mp.restrict_for_rank({"": "cuda:0"}, None)
    with pytest.raises(ActlabError, match="'balanced_low_0' with 2 ranks on a machine of 4 GPUs"):
        mp.restrict_for_rank("balanced_low_0", None)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(str(d)))
    assert dp.rank_device("cuda", Rank(1, 2, 1)) == "cuda:1" and current == ["cuda:1"]
    assert dp.rank_device("auto", Rank(1, 2, 1)) == "auto" and current[-1] == "cuda:1"  # NCCL's GPU: its own
    assert dp.rank_device("cpu", Rank(1, 2, 1)) == "cpu" and current[-1] == "cuda:1"


def test_without_gpus_a_ranks_devices_and_maps_are_unchanged(monkeypatch, tmp_path):
    from test_device_map import LLAMA_MAP, _hf
    from tiny_models import ByteTokenizer

    _torchrun_env(monkeypatch, 1, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cpu", "cuda", "cuda:1", "auto"):
        assert dp.rank_device(device, Rank(1, 2, 1)) == device
    assert mp.restrict_for_rank("auto", {"cpu": 60_000}) == {"cpu": 60_000}
    ref = actlab.load(copy.deepcopy(_hf()), tokenizer=ByteTokenizer())
    split = actlab.load(_hf(), tokenizer=ByteTokenizer(), device_map=LLAMA_MAP, offload_folder=tmp_path)
    ids = torch.tensor([[3, 7, 11, 2]])
    assert torch.equal(split.hf(ids).logits, ref.hf(ids).logits)
