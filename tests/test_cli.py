"""The CLI is a thin shell: each command runs end to end on a demo model and bad input is one clear line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
