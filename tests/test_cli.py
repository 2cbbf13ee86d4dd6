"""The CLI is a thin shell: each command runs end to end on a demo model and bad input is one clear line."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from actlab.cli import app
from actlab.models.loading import zoo_models

pytestmark = pytest.mark.skipif("demo-llama" not in zoo_models(), reason="demo models are not in the zoo yet")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def small_data(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("In the beginning was the word.\nA quick test of the command line.\nThird line, third document.\n")
    return path


def test_sites_lists_every_site():
    result = invoke("sites", "demo-llama")
    assert result.exit_code == 0
    assert "resid.0" in result.output and "mlp.hidden.0" in result.output


def test_stats_writes_a_loadable_file(tmp_path, small_data):
    out = tmp_path / "s.safetensors"
    result = invoke("stats", "demo-gpt2", "--data", small_data, "--sites", "mlp.hidden.0", "-o", out)
    assert result.exit_code == 0, result.output
    from actlab.stats import StatsSink

    sink = StatsSink.load(out)
    assert sink.sites == ["mlp.hidden.0"] and sink.n_tokens > 10


def test_record_info_verify(tmp_path, small_data):
    out = tmp_path / "store"
    assert invoke("record", "demo-llama", "--data", small_data, "--sites", "resid.0,resid.-1", "--out", out).exit_code == 0
    info = invoke("store", "info", out)
    assert info.exit_code == 0 and "resid.0" in info.output
    assert invoke("store", "verify", out).exit_code == 0
    shard = sorted(out.glob("shard-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = invoke("store", "verify", out)
    assert bad.exit_code == 1 and "checksum" in bad.output.lower()


def test_generate_streams_text():
    result = invoke("generate", "demo-llama", "In the beginning", "--max-new-tokens", "8")
    assert result.exit_code == 0 and result.output.startswith("In the beginning") and len(result.output) > 20


@pytest.mark.parametrize(
    "args, message",
    [
        (["sites", "no-such-model-dir/"], "does not exist"),
        (["stats", "demo-gpt2", "--sites", "resid.99"], "out of range"),
        (["stats", "demo-gpt2", "--sites", "potato.1"], "unknown site"),
    ],
)
def test_bad_input_is_one_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_empty_and_binary_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = runner.invoke(app, ["stats", "demo-gpt2", "--data", str(empty)])
    assert result.exit_code == 2 and "empty" in result.output.lower()
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"hello\n\xff\xfe world\n")
    result = runner.invoke(app, ["stats", "demo-gpt2", "--data", str(binary)])
    assert result.exit_code == 2 and "utf-8" in result.output.lower()


PAIRS = Path(__file__).resolve().parents[1] / "src/actlab/datasets/genres/contrast_pairs.jsonl"


@pytest.mark.slow
def test_steer_fit_paste_run_generate(tmp_path):
    """The Command-V path from the command line: fit in the donor, paste, apply in the recipient."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(PAIRS.read_text().splitlines()[:32]) + "\n")
    vec = tmp_path / "vec.safetensors"
    assert invoke("steer", "fit", "demo-llama", "--pos", pairs, "--site", "resid.1", "-o", vec).exit_code == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Prompt number {i} about {w}" for i, w in enumerate(["law", "code", "jokes"] * 30)))
    pasted = tmp_path / "pasted.safetensors"
    result = invoke("paste", "run", "--donor", "demo-llama", "--recipient", "demo-gpt2", "--intervention", vec,
                    "-o", pasted, "--prompts", prompts, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert "resid.2" in result.output  # relative depth: llama block 1 of 4 -> gpt2 block 2 of 6
    assert "de-attenuation gains" in result.output
    from actlab.interventions import load_interventions
    import actlab

    recipient = actlab.load("demo-gpt2")
    edit = load_interventions(pasted, recipient)
    assert edit.site == "resid.2" and edit.width == 192
    assert 1.0 <= edit.params["deattenuation"]["gains"][0] <= 1.5
    plain = tmp_path / "plain.safetensors"
    assert invoke("paste", "run", "--donor", "demo-llama", "--recipient", "demo-gpt2", "--intervention", vec,
                  "-o", plain, "--prompts", prompts, "--cache-dir", tmp_path / "cache", "--no-deattenuate").exit_code == 0
    plain_edit = load_interventions(plain, recipient)
    assert "deattenuation" not in plain_edit.params
    assert float(plain_edit.vector.norm()) <= float(edit.vector.norm())
    assert invoke("generate", "demo-gpt2", "In the beginning", "--edit", f"{pasted}:0.5",
                  "--max-new-tokens", "6").exit_code == 0
    refused = runner.invoke(app, ["generate", "demo-gpt2", "x", "--edit", f"{vec}:1"])
    assert refused.exit_code == 2 and "paste" in refused.output


@pytest.mark.slow
def test_paste_run_defaults_are_the_librarys(tmp_path):
    """No flags beyond the files: `steer fit` acts at the middle layer and `paste run` profiles the bundled
    profile texts at every token (the tokenizers agree), exactly as ``paste_between`` does by default, and
    prints the expected effect ratio before anything is sampled."""
    import actlab
    from actlab.experiments.genre_data import passage_contrast
    from actlab.interventions import load_interventions
    from actlab.transfer import paste_between

    contrast = passage_contrast("techdoc", "tune", seed=0, n=16)
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(t.replace("\n", " ") for t in contrast.pos) + "\n")
    neg.write_text("\n".join(t.replace("\n", " ") for t in contrast.neg) + "\n")
    vec, pasted = tmp_path / "vec.safetensors", tmp_path / "pasted.safetensors"
    assert invoke("steer", "fit", "demo-llama", "--pos", pos, "--neg", neg, "-o", vec).exit_code == 0
    cache = tmp_path / "cache"
    result = invoke("paste", "run", "--donor", "demo-llama", "--recipient", "demo-gpt2", "--intervention", vec,
                    "-o", pasted, "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert "expected effect ratio" in result.output
    donor, recipient = actlab.load("demo-llama"), actlab.load("demo-gpt2")
    edit = load_interventions(vec, donor)
    assert edit.site == "resid.1"  # resid.mid of a 4-layer model
    want = paste_between(donor, recipient, edit, cache_dir=cache)
    got = load_interventions(pasted, recipient)
    assert want.positions == "all" and got.site == want.pasted.site == "resid.2"
    assert torch.equal(got.vector, want.pasted.vector)
    assert 0 < got.params["expected_ratio"] <= 1


@pytest.mark.slow
def test_adapter_train_writes_a_working_adapter(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()[:24]]
    data.write_text("\n".join(json.dumps({"prompt": r["prompt"], "completion": r["pos"]}) for r in rows) + "\n")
    out = tmp_path / "adapter.safetensors"
    result = invoke("adapter", "train", "demo-llama", "--data", data, "--site", "resid.1", "--rank", "2",
                    "--steps", "10", "-o", out)
    assert result.exit_code == 0, result.output
    assert "validation loss" in result.output and out.is_file()
    # pasted by `paste run` with its defaults: by its effect, at the recipient's last layer, as the library does
    import actlab
    from actlab.datasets import profile_texts
    from actlab.interventions import load_interventions
    from actlab.transfer import paste_between

    texts = [t.replace("\n", " ") for t in profile_texts()[::23]]
    prompts, pasted = tmp_path / "profile.txt", tmp_path / "pasted.safetensors"
    prompts.write_text("\n".join(texts) + "\n")
    result = invoke("paste", "run", "--donor", "demo-llama", "--recipient", "demo-gpt2", "--intervention", out,
                    "-o", pasted, "--prompts", prompts, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "pasted by its effect on the last layer" in said and "expected effect ratio" in said
    donor, recipient = actlab.load("demo-llama"), actlab.load("demo-gpt2")
    got = load_interventions(pasted, recipient)
    want = paste_between(donor, recipient, load_interventions(out, donor), texts, cache_dir=tmp_path / "cache").pasted
    assert got.site == want.site == "resid.5" and got.params["method"] == "effect"
    h = torch.ones(1, recipient.d_model)
    torch.testing.assert_close(got.delta(h), want.delta(h))


@pytest.mark.slow
def test_demo_tour_quick(tmp_path):
    """What `make demo` runs, in its quick form: every step and the combined report."""
    result = invoke("demo", "--quick", "--out", tmp_path / "demo")
    assert result.exit_code == 0, result.output[-3000:]
    page = (tmp_path / "demo" / "report.html").read_text()
    for fragment in ("Steering demo-llama", "Pasting the vector into demo-gpt2", "Profile of demo-llama",
                     "Profile of demo-gpt2"):
        assert fragment in page
    assert (tmp_path / "demo" / "profile-demo-gpt2" / "report.html").is_file()
