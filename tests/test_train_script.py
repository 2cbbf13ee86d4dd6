"""The demo models' training data sampler (scripts/train_demo_models.py): genre-balanced,
single-genre windows, reproducible per (seed, step)."""

import importlib.util
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_models.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_demo_models", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _streams(tmp_path):
    """Three genres of very different sizes, each with its own token range; documents end in 0."""
    ids, genres = [], []
    rng = np.random.default_rng(0)
    for g, n_docs in enumerate((400, 40, 8)):
        for _ in range(n_docs):
            doc = list(rng.integers(100 * (g + 1), 100 * (g + 1) + 50, size=int(rng.integers(20, 60)))) + [0]
            ids += doc
            genres += [g] * len(doc)
    (tmp_path / "train.bin").write_bytes(np.array(ids, dtype=np.uint16).tobytes())
    (tmp_path / "train.genres.bin").write_bytes(np.array(genres, dtype=np.uint8).tobytes())
    return _script().genre_streams(tmp_path, "train", 3)


def _genre_of(row: torch.Tensor) -> set[int]:
    return {int(t) // 100 - 1 for t in row if t != 0}


def test_windows_are_single_genre_balanced_and_reproducible(tmp_path):
    mod, streams = _script(), _streams(tmp_path)
    assert [s[-1] for s in streams] == [0, 0, 0]  # every stream ends a document
    counts = np.zeros(3)
    for step in range(300):
        x = mod.get_batch(streams, seed=0, step=step, batch_size=8, seq_len=32)
        assert x.shape == (8, 32)
        for row in x:
            g = _genre_of(row)
            assert len(g) == 1  # one genre per window
            counts[g.pop()] += 1
    # uniform over genres although the corpus is 50:5:1 — binomial sd of a share over 2400 rows ≈ 0.01
    assert np.all(np.abs(counts / counts.sum() - 1 / 3) < 0.04), counts
    a = mod.get_batch(streams, seed=0, step=17, batch_size=8, seq_len=32)
    assert torch.equal(a, mod.get_batch(streams, seed=0, step=17, batch_size=8, seq_len=32))  # resume-safe
    assert not torch.equal(a, mod.get_batch(streams, seed=1, step=17, batch_size=8, seq_len=32))


def test_validation_windows_take_the_same_number_from_each_genre(tmp_path):
    mod, streams = _script(), _streams(tmp_path)
    batches = mod.val_batches(streams, n=3, batch_size=6, seq_len=32)
    rows = torch.cat(batches)
    assert rows.shape == (18, 32)
    assert [sum(_genre_of(r) == {g} for r in rows) for g in range(3)] == [6, 6, 6]
