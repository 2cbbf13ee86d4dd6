"""The Command-V matrix (issue #12): disjoint tuning / evaluation data, and seed pooling with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from actlab.datasets import profile_texts
from actlab.errors import ActlabError
from actlab.experiments.genre_data import SPLITS, passage_contrast, split_passages, split_prompts, split_setup
from actlab.experiments.transfer_matrix import Cell, markdown_table, matrix_cells, summarise, targets_met


def test_tuning_and_evaluation_data_are_disjoint_and_apart_from_the_profile():
    from actlab.datasets import genres

    profile = set(profile_texts())
    assert 700 <= len(profile) <= 1000
    tune, held = split_prompts("tune"), split_prompts("eval")
    assert len(tune) >= 100 and len(held) >= 100 and not set(tune) & set(held)
    assert not (set(tune) | set(held)) & profile
    for genre in genres.GENRES:
        a, b = split_passages(genre, "tune"), split_passages(genre, "eval")
        assert len(a) == len(b) == 100 and not set(a) & set(b)
        assert not (set(a) | set(b)) & profile  # the profile is documents of the training text
        for split in SPLITS:
            c = passage_contrast(genre, split, seed=0)
            assert len(c.pos) == len(c.neg) == 64 and set(c.pos) <= set(split_passages(genre, split))
            others = {t for g in genres.GENRES if g != genre for t in split_passages(g, split)}
            assert set(c.neg) <= others and not set(c.neg) & set(c.pos)


def test_a_seed_draws_its_own_contrast_and_prompts_deterministically():
    a, again, other = split_setup("techdoc", "eval", 0), split_setup("techdoc", "eval", 0), split_setup("techdoc", "eval", 1)
    assert a.contrast.pos == again.contrast.pos and a.prompts == again.prompts
    assert a.contrast.pos != other.contrast.pos and a.prompts != other.prompts
    assert len(a.prompts) == 80 and set(a.prompts) <= set(split_prompts("eval"))
    with pytest.raises(ActlabError, match="split must be one of"):
        split_setup("techdoc", "test")
    with pytest.raises(ActlabError, match="unknown genre"):
        split_passages("poetry", "tune")


def _fake(cell: Cell, direct: np.ndarray, pasted: np.ndarray, random: np.ndarray) -> dict:
    """A finished cell as ``run_cell`` writes it, with per-prompt rates."""
    none = np.full_like(direct, 0.2)
    per = {"none": none, "direct": none + direct, "pasted": none + pasted, "random": none + random}
    cond = {k: {"rate": float(v.mean()), "effect": float((v - none).mean()), "perplexity": 100.0} for k, v in per.items()}
    return {"cell": cell.__dict__ | {"name": cell.name}, "conditions": cond,
            "donor_conditions": {"none": {"rate": 0.1}, "edited": {"rate": 0.5}},
            "ratios": {"per_prompt": {k: v.tolist() for k, v in per.items()},
                       "pasted_over_direct": float(pasted.mean() / direct.mean()) if direct.mean() else None},
            "diagnostics": {}, "settings": {}}


def test_pooling_over_seeds_has_the_known_answer():
    """Pasted effect exactly 0.6 × direct on every prompt of every seed → pooled ratio 0.6 with a zero-width
    interval; random exactly 0 → 0. Seeds with different direct effects pool as a ratio of means."""
    rng = np.random.default_rng(0)
    results = []
    for seed in range(3):
        direct = rng.uniform(0.1, 0.5, size=40)
        results.append(_fake(Cell("jargon", "a", "b", "vector", seed), direct, 0.6 * direct, np.zeros(40)))
    row, = summarise(results)
    assert row["pasted_over_direct"] == pytest.approx(0.6) and row["pasted_ci"] == pytest.approx([0.6, 0.6])
    assert row["random_over_direct"] == 0.0 and row["per_seed"] == [0.6, 0.6, 0.6] and row["seeds"] == [0, 1, 2]
    # a noisy pasted effect: the interval covers the point and has width
    noisy = [_fake(Cell("jargon", "a", "b", "adapter", s), np.full(40, 0.3), rng.uniform(0, 0.6, 40), np.zeros(40))
             for s in range(3)]
    row, = summarise(noisy)
    assert row["pasted_ci"][0] < row["pasted_over_direct"] < row["pasted_ci"][1]
    means = [np.mean(r["ratios"]["per_prompt"]["pasted"]) - 0.2 for r in noisy]
    assert row["pasted_over_direct"] == pytest.approx(np.mean(means) / 0.3)
    t = targets_met(summarise(results + noisy), "vector")
    assert t["cells"] == 1 and t["mean"] == pytest.approx(0.6) and not t["mean_ok"] and t["min_ok"]
    assert "| vector | jargon | a → b | 3 |" in markdown_table(summarise(results))


def test_a_cell_without_direct_effect_has_no_ratio_and_fails_the_targets():
    """A direct edit that moves nothing gives no pasted/direct (nan, not inf or a crash), and the cell counts
    as missed rather than vanishing from the targets."""
    flat = _fake(Cell("fortunes", "a", "b", "adapter", 0), np.zeros(40), np.full(40, 0.1), np.zeros(40))
    good = _fake(Cell("jargon", "a", "b", "adapter", 0), np.full(40, 0.3), np.full(40, 0.3), np.zeros(40))
    rows = summarise([flat, good])
    by_genre = {r["genre"]: r for r in rows}
    assert np.isnan(by_genre["fortunes"]["pasted_over_direct"]) and by_genre["fortunes"]["per_seed"] == [None]
    assert by_genre["jargon"]["pasted_over_direct"] == pytest.approx(1.0)
    t = targets_met(rows, "adapter")
    assert t["cells"] == 2 and t["no_ratio"] == 1 and not t["mean_ok"] and not t["min_ok"]
    assert "| adapter | fortunes | a → b | 1 |" in markdown_table(rows)


def test_matrix_lists_every_cell_once():
    cells = matrix_cells(["scripture", "techdoc"], seeds=(0, 1, 2))
    assert len(cells) == 2 * 2 * 2 * 3 and len({c.name for c in cells}) == len(cells)
    assert cells[0].kind == "vector" and cells[-1].kind == "adapter"


def test_evaluation_data_keeps_the_profile_apart_unless_asked():
    """The evaluation's profile never holds its prompts or contrast texts; ``profile_contrast`` adds the
    contrast texts on purpose (converters that see the behaviour's own data), and nothing else."""
    from types import SimpleNamespace

    from actlab.experiments.transfer_eval import TransferEvalConfig, evaluation_data
    from tiny_models import ByteTokenizer

    a, b = SimpleNamespace(name="a", tokenizer=ByteTokenizer()), SimpleNamespace(name="b", tokenizer=ByteTokenizer())
    plain = evaluation_data(a, b, TransferEvalConfig(target_genre="jargon", split="tune", seed=2))
    assert plain.positions == "all" and plain.profile_prompts == profile_texts()
    assert not set(plain.profile_prompts) & (set(plain.prompts) | set(plain.contrast.pos) | set(plain.contrast.neg))
    both = evaluation_data(a, b, TransferEvalConfig(target_genre="jargon", split="tune", seed=2, profile_contrast=2))
    extra = both.profile_prompts[len(plain.profile_prompts):]
    assert both.profile_prompts[: len(plain.profile_prompts)] == plain.profile_prompts
    assert set(extra) == set(plain.contrast.pos) | set(plain.contrast.neg) and len(extra) == 2 * 128
    with pytest.raises(ActlabError, match="profile_contrast is how many times"):
        TransferEvalConfig(profile_contrast=-1).validate()
    with pytest.raises(ActlabError, match="keep them apart"):
        evaluation_data(a, b, TransferEvalConfig(target_genre="jargon", split="tune", seed=2,
                                                 profile_prompts=plain.contrast.pos[:3] + ["x"]))
