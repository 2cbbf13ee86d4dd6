"""`actlab profile` end to end: demo decoder, real encoder (MiniLM), bounded memory."""

import json
import subprocess
import sys
import textwrap

import pytest

import actlab
from actlab.analyses.profile import run_profile
from actlab.models.loading import zoo_models

from test_report import chromium_binary, loaded_images


@pytest.mark.slow
@pytest.mark.skipif("demo-llama" not in zoo_models(), reason="demo models are not in the zoo")
def test_profile_demo_model_writes_report_and_json(tmp_path):
    model = actlab.load("demo-llama")
    docs = actlab.datasets.default_prompts()[:120]
    run = run_profile(model, docs, out_dir=tmp_path, reservoir_size=2048)
    data = json.loads((tmp_path / "profile.json").read_text())
    assert set(data["summary"]) == {r.key for r in run.results} and len(run.results) == 8
    assert all(v != "skipped" for v in data["summary"].values())
    page = (tmp_path / "report.html").read_text()
    n_figures = page.count("<img ")
    assert n_figures >= 8 and page.index("Summary") < page.index("Activation sparsity")
    if chromium_binary():
        assert loaded_images(tmp_path / "report.html") == f"{n_figures}/{n_figures}"


def test_profile_real_encoder_skips_lm_head_analyses(minilm, tmp_path):
    texts = ["The cat sat on the mat.", "Encoders have no LM head.", "Statistics still work."] * 8
    run = run_profile(minilm, texts, eval_texts=texts[:4], out_dir=tmp_path, reservoir_size=512)
    assert run.meta["n_tokens"] > 100 and run.meta["model"]["model_class"] == "BertModel"
    summary = json.loads((tmp_path / "profile.json").read_text())["summary"]
    for key in ("ppl_sparsity", "lenses", "readout"):
        assert summary[key] == "skipped", key
    for key in ("sparsity", "dead_neurons", "massive", "linearity", "redundancy"):
        assert summary[key] != "skipped", key
    assert "Skipped:" in (tmp_path / "report.html").read_text()


PROBE = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, "tests")
    torch.set_num_threads(1)
    from tiny_models import tiny_model
    from actlab.analyses.base import collect_profile_data
    model = tiny_model("gpt2")
    n_docs = int(sys.argv[1])
    docs = [[3 + (i * 7 + j) % 90 for j in range(64)] for i in range(n_docs)]
    collect_profile_data(model, docs, reservoir_size=2048, batch_size=16)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


@pytest.mark.slow
def test_profile_memory_does_not_grow_with_tokens():
    """Streaming stats + a fixed reservoir: 10x the tokens must not cost more memory."""
    def peak_kib(n_docs):
        out = subprocess.run([sys.executable, "-c", PROBE, str(n_docs)], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    small, large = peak_kib(300), peak_kib(3000)  # ~19k vs ~192k tokens
    assert large - small < 30 * 1024, (small, large)  # < 30 MiB growth for 10x the tokens
