"""actlab.dist: the torchrun environment is read and checked; two gloo ranks see each other."""

from __future__ import annotations

import pytest
import torch

from actlab.dist import Rank, current, torchrun_env
from actlab.errors import ActlabError
from dist_helpers import run_ranks


def test_alone_is_rank_zero_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_env() == Rank(0, 1, 0) == current()
    assert list(Rank(1, 3).share(8)) == [1, 4, 7]
    shares = [set(Rank(r, 3).share(8)) for r in range(3)]
    assert set().union(*shares) == set(range(8)) and sum(map(len, shares)) == 8


@pytest.mark.parametrize("env", [{"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}])
def test_inconsistent_environment_is_refused(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ActlabError, match="RANK"):
        torchrun_env()


def _sum_ranks(rank: int, out) -> None:
    import torch.distributed as dist
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    (out / f"rank{rank}.txt").write_text(f"{current().rank} {current().world_size} {t.item()}")


def test_two_gloo_ranks_reduce(tmp_path):
    run_ranks(_sum_ranks, 2, tmp_path)
    assert sorted((tmp_path / f"rank{r}.txt").read_text() for r in range(2)) == ["0 2 3.0", "1 2 3.0"]
