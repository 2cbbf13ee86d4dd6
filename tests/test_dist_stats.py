"""Statistics and reservoirs on 2 gloo ranks equal the single-process ones (exactly, or to float64 rounding)."""

from __future__ import annotations


import pytest
import torch

from actlab.analyses.base import collect_profile_data
from actlab.engine.reservoir import Reservoir
from actlab.engine.runner import plan_rows
from actlab.files import load_tensors, save_tensors
from actlab.stats import StatsSink
from actlab.stats.distributed import rank_rows
from actlab.stats.state import FIELDS
from dist_helpers import run_ranks, torchrun_cli
from tiny_models import tiny_model

SITES = "resid.*,mlp.hidden.*"
BATCH = 3


def _docs() -> list[str]:
    words = "the cat sat on a mat while seven quiet rivers ran under old stone bridges".split()
    return [" ".join(words[(i * 5) % len(words):] + words[: i % 7]) * (1 + i % 3) for i in range(17)]


def _reservoir_tensors(res: Reservoir) -> dict[str, torch.Tensor]:
    out = {f"acts/{s}": t.contiguous() for s, t in res.acts.items()}
    out.update(keys=res.keys, doc_ids=res.doc_ids, positions=res.positions, token_ids=res.token_ids,
               seen=torch.tensor(res.seen))
    return out


def _distributed_stats(rank: int, out) -> None:
    model = tiny_model("llama")
    data = collect_profile_data(model, _docs(), sites=model.resolve(SITES), reservoir_size=40, seed=3,
                                batch_size=BATCH, distributed=True)  # the profile's pass: stats + reservoir
    sink, res, tokens = data.stats, data.samples, data.n_tokens
    sink.save(out / f"stats{rank}.safetensors", metadata={"tokens": tokens})  # every rank, to compare them
    save_tensors(out / f"res{rank}.safetensors", _reservoir_tensors(res), "test.reservoir", {})


def _assert_equal_states(a: StatsSink, b: StatsSink, float_rtol: float | None) -> None:
    assert a.widths == b.widths
    for site in a.sites:
        sa, sb = a[site].state_dict(), b[site].state_dict()
        for name in FIELDS:
            if float_rtol is not None and name in ("mean", "m2"):
                scale = sa["m2"].abs() + a[site].absmax if name == "m2" else a[site].absmax
                assert bool(((sa[name] - sb[name]).abs() <= float_rtol * scale).all()), (site, name)
            else:
                assert torch.equal(sa[name], sb[name]), (site, name)


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    run_ranks(_distributed_stats, 2, tmp_path)
    model = tiny_model("llama")
    docs = _docs()
    one_data = collect_profile_data(model, docs, sites=model.resolve(SITES), reservoir_size=40, seed=3,
                                    batch_size=BATCH)
    one, one_res, tokens = one_data.stats, one_data.samples, one_data.n_tokens
    got = [StatsSink.load(tmp_path / f"stats{r}.safetensors") for r in range(2)]
    # identical on both ranks, and the tokens counted once each
    _assert_equal_states(got[0], got[1], None)
    assert got[0].metadata["tokens"] == tokens == one.n_tokens
    # counts, histograms, extrema and top-k exactly; mean / M2 to float64 rounding of another fold order
    _assert_equal_states(one, got[0], 1e-9)
    # ... and bit for bit the single-process merge of the ranks' shares in rank order (the defined order)
    rows = plan_rows(model, docs)
    shares = []
    for r in range(2):
        sink = StatsSink({s: model.sites[s] for s in model.resolve(SITES)})
        model.run(None, model.resolve(SITES), sink, rows=rank_rows(rows, BATCH, r, 2), batch_size=BATCH)
        shares.append(sink)
    _assert_equal_states(shares[0].merge(shares[1]), got[0], None)
    # the reservoir: the very sample one process keeps, bit for bit, on both ranks
    want = _reservoir_tensors(one_res)
    for r in range(2):
        tensors, _ = load_tensors(tmp_path / f"res{r}.safetensors", "test.reservoir", "reservoir")
        assert set(tensors) == set(want)
        for key, value in want.items():
            assert torch.equal(tensors[key], value), key


def test_rank_rows_split_the_batches_disjointly():
    rows = list(range(23))
    shares = [rank_rows(rows, 4, r, 3) for r in range(3)]
    assert shares[0] == [0, 1, 2, 3, 12, 13, 14, 15] and shares[2] == [8, 9, 10, 11, 20, 21, 22]
    assert sorted(sum(shares, [])) == rows


@pytest.mark.slow
def test_cli_stats_under_torchrun(tmp_path):
    """`actlab stats` on 2 torchrun ranks writes one file (rank 0's) equal to the single-process command's."""
    from actlab.cli import app
    from typer.testing import CliRunner

    data = tmp_path / "docs.txt"
    data.write_text("\n".join(_docs()) + "\n")
    args = ["stats", "demo-gpt2", "--data", str(data), "--sites", "resid.1,mlp.hidden.0", "--batch-size", "2"]
    alone = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "one.safetensors")], catch_exceptions=False)
    assert alone.exit_code == 0, alone.output
    done = torchrun_cli([*args, "-o", str(tmp_path / "two.safetensors")], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "2 ranks" in done.stdout and done.stdout.count("wrote") == 1
    _assert_equal_states(StatsSink.load(tmp_path / "one.safetensors"), StatsSink.load(tmp_path / "two.safetensors"),
                         1e-9)
