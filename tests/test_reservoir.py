import torch

from actlab.engine.batch import TokenBatch
from actlab.engine.reservoir import Reservoir


def _batch(start, n, width=3):
    idx = torch.arange(start, start + n)
    acts = idx.float().unsqueeze(1).repeat(1, width)
    return TokenBatch(acts={"a": acts, "b": -acts}, token_ids=idx, doc_ids=idx // 10, positions=idx % 10)


def test_reservoir_is_bounded_aligned_and_uniform():
    counts = torch.zeros(1000)
    for seed in range(200):
        res = Reservoir(100, seed=seed)
        for start in range(0, 1000, 64):
            res.consume(_batch(start, min(64, 1000 - start)))
        assert len(res) == 100 and res.seen == 1000
        assert torch.equal(res["a"][:, 0].long(), res.token_ids) and torch.equal(res["b"], -res["a"])
        assert len(set(res.token_ids.tolist())) == 100  # without replacement
        counts[res.token_ids] += 1
    # each token kept with probability 0.1: 20 expected over 200 runs; binomial sd ~4.2
    assert abs(counts.mean().item() - 20) < 1e-6
    assert counts.min() > 20 - 6 * 4.3 and counts.max() < 20 + 6 * 4.3
    first_half, second_half = counts[:500].sum(), counts[500:].sum()
    assert abs(first_half - second_half) / counts.sum() < 0.05


def test_reservoir_merge_keeps_the_smallest_keys():
    a, b = Reservoir(50, seed=1), Reservoir(50, seed=2)
    a.consume(_batch(0, 300))
    b.consume(_batch(300, 300))
    keys = torch.cat([a.keys, b.keys])
    a.merge(b)
    assert len(a) == 50 and a.seen == 600
    assert torch.equal(torch.sort(a.keys).values, torch.sort(keys).values[:50])
