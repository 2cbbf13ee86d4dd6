"""The bad-input matrix: ordinary mistakes, across the command line and the Python API, each end in one
clear line (exit 2) or one ``ActlabError``; nothing is written, nothing is lost, no stray temp file.

Every case runs in one workspace folder holding all its inputs (and the working directory, where default
outputs would land); the folder is compared, file by file, before and after each case. An internal
error (a bug) is exit 1 with a one-line message naming a crash log that holds the traceback.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import actlab
from actlab.cli import app
from actlab.errors import ActlabError
from actlab.models.loading import ZOO_DIR, zoo_models

pytestmark = pytest.mark.skipif("demo-llama" not in zoo_models(), reason="demo models are not in the zoo yet")
runner = CliRunner()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
LLAMA_CONTEXT = 256


# ------------------------------------------------------------------------------- the workspace
def _model_copies(root: Path, llama) -> None:
    """Model folders that are broken in the usual ways (copies of demo-llama)."""
    src = ZOO_DIR / "demo-llama"

    def copy(name: str, weights: bool = True) -> Path:
        return Path(shutil.copytree(src, root / name, ignore=None if weights else shutil.ignore_patterns("*.safetensors")))

    torch.save(llama.hf.state_dict(), copy("pickle", weights=False) / "pytorch_model.bin")  # only pickle weights
    (copy("both") / "pytorch_model.bin").write_bytes(b"not a pickle: never read, safetensors come first")
    cut = copy("trunc") / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    copy("noweights", weights=False)
    (copy("badconfig") / "config.json").write_text("{not json")


def _jsonl(path: Path, *lines) -> None:
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")


@pytest.fixture(scope="module")
def llama():
    return actlab.load("demo-llama")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, llama):
    root = tmp_path_factory.mktemp("workspace")
    (root / "docs.txt").write_text("In the beginning was the word.\nA quick test of the command line.\n")
    (root / "latin1.txt").write_bytes(b"fine first line\ncaf\xe9 au lait\n")
    _jsonl(root / "bad.jsonl", '{"text": "ok"}', '{"text": broken')
    (root / "big.ids").write_text("1 2 3 99999\n")
    (root / "ok.ids").write_text("1 2 3 4 5 6\n7 8 9 10\n")
    (root / "words.ids").write_text("1 2 three\n")
    (root / "blank.jsonl").write_text("\n\n")
    pair = '{"prompt": "Say:", "pos": " the lord spake", "neg": " run make install"}'
    _jsonl(root / "pairs.jsonl", pair, pair.replace("lord", "god"))
    _jsonl(root / "pairs_badline.jsonl", pair, "{bad")
    _jsonl(root / "pairs_missing.jsonl", pair, '{"prompt": "a", "pos": "b"}')
    _jsonl(root / "pairs_utf8.jsonl", pair, b'{"prompt": "a", "pos": "caf\xe9", "neg": "b"}')
    row = '{"prompt": "Say:", "completion": " amen"}'
    _jsonl(root / "train_badline.jsonl", row, "{bad")
    _jsonl(root / "train_missing.jsonl", row, '{"prompt": "a"}')
    _jsonl(root / "train_utf8.jsonl", row, b'{"prompt": "a", "completion": "caf\xe9"}')
    _jsonl(root / "train_type.jsonl", row, '{"prompt": "a", "completion": 7}')
    (root / "folder").mkdir()
    (root / "folder" / "keep.txt").write_text("someone else's file\n")
    (root / "afile.txt").write_text("a plain file\n")
    vec = actlab.steering_vector(llama, ["the lord spake unto them", "and god said"],
                                 ["run make install", "the compiler warns"], "resid.1")
    vec.save(root / "vec.safetensors")
    _model_copies(root / "models", llama)
    return root


def snapshot(root: Path) -> dict:
    """Every path under ``root``, with each file's size and modification time: any new, removed or changed
    file shows (a folder's own time is left out: write probes and lock files come and go)."""
    return {str(p.relative_to(root)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def one_error_line(result, code: int = 2) -> str:
    """The run ended with ``code`` and exactly one error line, the last thing on stderr, and no traceback."""
    assert result.exit_code == code, result.output[-2000:]
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "internal error"))]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def invoke(ws: Path, monkeypatch, args: list[str]):
    monkeypatch.chdir(ws)  # default outputs (steer.safetensors, profile/, .actlab-cache, ...) would land here
    return runner.invoke(app, [a.format(ws=ws) for a in args], catch_exceptions=False)


# ------------------------------------------------------------------------------- the CLI matrix
GEN = ["generate", "demo-llama", "In the beginning"]
REC = ["record", "demo-llama", "--data", "{ws}/docs.txt", "-o", "{ws}/newstore"]
STATS = ["stats", "demo-llama", "--data", "{ws}/docs.txt", "--sites", "resid.0", "-o", "{ws}/new.safetensors"]
PROF = ["profile", "demo-llama", "--data", "{ws}/docs.txt", "-o", "{ws}/newprofile"]
FIT = ["steer", "fit", "demo-llama", "--pos", "{ws}/pairs.jsonl", "--site", "resid.1", "-o", "{ws}/new.safetensors"]
EVAL = ["steer", "eval", "demo-llama", "-o", "{ws}/neweval"]
TRAIN = ["adapter", "train", "demo-llama", "--site", "resid.1", "--steps", "1", "-o", "{ws}/new.safetensors"]
PASTE = ["paste", "run", "--donor", "demo-llama", "--recipient", "demo-gpt2", "--intervention", "{ws}/vec.safetensors",
         "--cache-dir", "{ws}/newcache", "--prompts", "{ws}/docs.txt"]

CLI_CASES = {
    # generate: settings, devices, dtypes, edits, models
    "gen-zero-tokens": (GEN + ["--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
    "gen-negative-tokens": (GEN + ["--max-new-tokens", "-3"], ["--max-new-tokens", "-3"]),
    "gen-tokens-fill-context": (GEN + ["--max-new-tokens", "256"], ["context is 256 tokens", "at most 255"]),
    "gen-temperature-zero": (GEN + ["--sample", "--temperature", "0"], ["--temperature", "positive"]),
    "gen-temperature-nan": (GEN + ["--sample", "--temperature", "nan"], ["--temperature"]),
    "gen-negative-seed": (GEN + ["--seed", "-1"], ["--seed"]),
    "gen-device-unknown": (GEN + ["--device", "tpu9"], ["unknown device", "tpu9"]),
    "gen-device-missing-gpu": (GEN + ["--device", "cuda:99"], ["cuda:99"]),
    "gen-device-unsupported": (GEN + ["--device", "hpu"], ["not supported"]),
    "gen-dtype-unknown": (GEN + ["--dtype", "float8"], ["unknown dtype", "float8"]),
    "gen-edit-missing-file": (GEN + ["--edit", "{ws}/nope.safetensors:1"], ["nope.safetensors"]),
    "gen-edit-bad-coef": (GEN + ["--edit", "{ws}/vec.safetensors:abc"], ["FILE:COEF"]),
    "gen-edit-nan-coef": (GEN + ["--edit", "{ws}/vec.safetensors:nan"], ["coefficient"]),
    "gen-edit-absurd-coef": (GEN + ["--edit", "{ws}/vec.safetensors:1e30", "--max-new-tokens", "4"], ["too strong"]),
    "gen-edit-not-an-intervention": (GEN + ["--edit", "{ws}/docs.txt:1"], ["docs.txt"]),
    "gen-model-missing": (["generate", "./no-such-model", "hi"], ["does not exist"]),
    # model folders
    "model-truncated-safetensors": (["sites", "{ws}/models/trunc"], ["not a complete safetensors file"]),
    "model-pickle-only": (["sites", "{ws}/models/pickle"], ["pickle", "--allow-pickle", "pytorch_model.bin"]),
    "model-no-weights": (["sites", "{ws}/models/noweights"], ["no model weights"]),
    "model-bad-config": (["sites", "{ws}/models/badconfig"], ["config.json"]),
    "model-folder-without-config": (["sites", "{ws}/folder"], ["no config.json"]),
    # record
    "record-token-id-too-big": (["record", "demo-llama", "--data", "{ws}/big.ids", "-o", "{ws}/newstore"],
                                ["big.ids", "99999", "[0, 4096)"]),
    "record-out-is-a-file": (REC[:-1] + ["{ws}/afile.txt"], ["afile.txt", "is a file"]),
    "record-into-foreign-folder": (REC[:-1] + ["{ws}/folder"], ["keep.txt", "activation store"]),
    "record-bad-positions": (REC + ["--positions", "middle"], ["--positions"]),
    "record-batch-zero": (REC + ["--batch-size", "0"], ["--batch-size"]),
    "record-shard-tokens-zero": (REC + ["--shard-tokens", "0"], ["--shard-tokens"]),
    "record-store-dtype": (REC + ["--store-dtype", "int7"], ["int7"]),
    "record-unwritable": (REC[:-1] + ["/sys/actlab-test-store"], ["cannot write"]),
    # stats
    "stats-out-is-a-folder": (STATS[:-1] + ["{ws}/folder"], ["folder", "needs a file path"]),
    "stats-unwritable": (STATS[:-1] + ["/sys/actlab-test.safetensors"], ["cannot write"]),
    "stats-parent-is-a-file": (STATS[:-1] + ["{ws}/afile.txt/s.safetensors"], ["afile.txt is a file"]),
    "stats-data-missing": (["stats", "demo-llama", "--data", "{ws}/nope.txt"], ["nope.txt", "not found"]),
    "stats-data-is-a-folder": (["stats", "demo-llama", "--data", "{ws}/folder"], ["is a directory"]),
    "stats-data-not-utf8": (["stats", "demo-llama", "--data", "{ws}/latin1.txt"], ["utf-8", "line 2"]),
    "stats-data-bad-jsonl": (["stats", "demo-llama", "--data", "{ws}/bad.jsonl"], ["line 2", "invalid json"]),
    "stats-data-bad-token-file": (["stats", "demo-llama", "--data", "{ws}/words.ids"], ["'three'", "integer"]),
    "stats-unknown-site": (STATS[:-3] + ["potato.1"], ["unknown site"]),
    "stats-negative-eps": (STATS + ["--eps", "-1"], ["--eps"]),
    "stats-max-tokens-zero": (STATS + ["--max-tokens", "0"], ["--max-tokens"]),
    # profile
    "profile-reservoir-zero": (PROF + ["--reservoir", "0"], ["--reservoir", "at least 1"]),
    "profile-reservoir-negative": (PROF + ["--reservoir", "-5"], ["--reservoir"]),
    "profile-batch-zero": (PROF + ["--batch-size", "0"], ["--batch-size"]),
    "profile-unknown-analysis": (PROF + ["--analyses", "sparsity,potato"], ["potato"]),
    "profile-into-foreign-folder": (PROF[:-1] + ["{ws}/folder"], ["keep.txt", "profile.json"]),
    "profile-out-is-a-file": (PROF[:-1] + ["{ws}/afile.txt"], ["is a file"]),
    # steer fit
    "fit-out-is-a-folder": (FIT[:-1] + ["{ws}/folder"], ["needs a file path"]),
    "fit-dims-zero": (FIT + ["--method", "dims", "--dims", "0"], ["--dims", "at least 1"]),
    "fit-dims-negative": (FIT + ["--method", "dims", "--dims", "-2"], ["--dims"]),
    "fit-dims-too-many": (FIT + ["--method", "dims", "--dims", "100000"], ["256 dimensions"]),
    "fit-unknown-method": (FIT + ["--method", "magic"], ["--method", "mean-diff"]),
    "fit-unknown-aggregate": (FIT + ["--aggregate", "max"], ["--aggregate"]),
    "fit-unknown-positions": (FIT + ["--positions", "middle"], ["--positions"]),
    "fit-pairs-bad-line": (["steer", "fit", "demo-llama", "--pos", "{ws}/pairs_badline.jsonl", "-o", "{ws}/n.safetensors"],
                           ["pairs_badline.jsonl line 2", "invalid json"]),
    "fit-pairs-missing-field": (["steer", "fit", "demo-llama", "--pos", "{ws}/pairs_missing.jsonl", "-o", "{ws}/n.st"],
                                ["line 2", "missing field 'neg'"]),
    "fit-pairs-not-utf8": (["steer", "fit", "demo-llama", "--pos", "{ws}/pairs_utf8.jsonl", "-o", "{ws}/n.st"],
                           ["utf-8", "line 2"]),
    "fit-text-without-neg": (["steer", "fit", "demo-llama", "--pos", "{ws}/docs.txt", "-o", "{ws}/n.st"], ["--neg"]),
    "fit-empty-pairs": (["steer", "fit", "demo-llama", "--pos", "{ws}/blank.jsonl", "-o", "{ws}/n.st"], ["empty contrast set"]),
    "fit-site-out-of-range": (FIT[:5] + ["--site", "resid.99", "-o", "{ws}/n.st"], ["out of range"]),
    # steer eval
    "eval-bad-coefs": (EVAL + ["--coefs", "a,b"], ["--coefs"]),
    "eval-nan-coef": (EVAL + ["--coefs", "1,nan"], ["--coefs", "finite"]),
    "eval-prompts-zero": (EVAL + ["--prompts", "0"], ["--prompts"]),
    "eval-into-foreign-folder": (EVAL[:-1] + ["{ws}/folder"], ["keep.txt", "evaluation.json"]),
    # adapter train
    "train-bad-line": (TRAIN + ["--data", "{ws}/train_badline.jsonl"], ["train_badline.jsonl line 2", "invalid json"]),
    "train-missing-field": (TRAIN + ["--data", "{ws}/train_missing.jsonl"], ["line 2", "missing field 'completion'"]),
    "train-not-utf8": (TRAIN + ["--data", "{ws}/train_utf8.jsonl"], ["utf-8", "line 2"]),
    "train-field-not-a-string": (TRAIN + ["--data", "{ws}/train_type.jsonl"], ["line 2", "must be a string"]),
    "train-rank-zero": (TRAIN + ["--data", "{ws}/docs.txt", "--rank", "0"], ["--rank"]),
    "train-steps-zero": (TRAIN[:-4] + ["--steps", "0", "--data", "{ws}/docs.txt"], ["--steps"]),
    "train-lr-zero": (TRAIN + ["--data", "{ws}/docs.txt", "--lr", "0"], ["--lr"]),
    "train-out-is-a-folder": (TRAIN[:-1] + ["{ws}/folder", "--data", "{ws}/docs.txt"], ["needs a file path"]),
    # paste
    "paste-profile-out-is-a-folder": (["paste", "profile", "demo-llama", "-o", "{ws}/folder"], ["needs a file path"]),
    "paste-profile-positions": (["paste", "profile", "demo-llama", "-o", "{ws}/p.st", "--positions", "first"],
                                ["--positions"]),
    "paste-run-out-is-a-folder": (PASTE + ["-o", "{ws}/folder"], ["needs a file path"]),
    "paste-run-missing-intervention": (PASTE[:7] + ["{ws}/nope.safetensors"] + PASTE[8:] + ["-o", "{ws}/p.st"],
                                       ["nope.safetensors"]),
    "paste-run-max-gain": (PASTE + ["-o", "{ws}/p.st", "--max-gain", "0.5"], ["--max-gain"]),
    "paste-run-bad-map": (PASTE + ["-o", "{ws}/p.st", "--map", "0:99"], ["--map"]),
    "paste-eval-kind": (["paste", "eval", "--kind", "magic"], ["--kind"]),
    "paste-eval-lambdas": (["paste", "eval", "--lambdas", "x,y"], ["--lambdas"]),
    # demo and store
    "demo-into-foreign-folder": (["demo", "-o", "{ws}/folder"], ["keep.txt", "report.html"]),
    "demo-out-is-a-file": (["demo", "-o", "{ws}/afile.txt"], ["is a file"]),
    "store-info-not-a-store": (["store", "info", "{ws}/folder"], ["folder"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_in_one_line(case, ws, monkeypatch):
    args, facts = CLI_CASES[case]
    before = snapshot(ws)
    result = invoke(ws, monkeypatch, args)
    line = one_error_line(result)
    for fact in facts:
        assert fact.lower() in line.lower(), line
    assert "tok/s" not in result.output  # refused before any computation (no progress bar ran)
    assert snapshot(ws) == before  # nothing written, nothing lost, no stray .tmp


@pytest.mark.skipif(IS_ROOT, reason="root may write into read-only folders")
def test_read_only_folder_is_refused_up_front(ws, monkeypatch, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = invoke(ws, monkeypatch, STATS[:-1] + [str(locked / "s.safetensors")])
        assert "cannot write" in one_error_line(result) and not list(locked.iterdir())
    finally:
        locked.chmod(0o755)


# ------------------------------------------------------------------------------- the boundary itself
def _raiser(exc):
    def load_model(*args, **kwargs):
        raise exc

    return load_model


BOUNDARY_CASES = {
    "permission": (PermissionError(errno.EACCES, "Permission denied", "/data/x.txt"), ["/data/x.txt", "permission denied"]),
    "is-a-directory": (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/d"), ["/data/d", "is a folder"]),
    "not-found": (FileNotFoundError(errno.ENOENT, "No such file", "/data/gone"), ["/data/gone", "no such file"]),
    "disk-full": (OSError(errno.ENOSPC, "No space left on device"), ["no space left"]),
    "not-utf8": (UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"), ["utf-8", "0xff"]),
    "not-json": (json.JSONDecodeError("Expecting value", "{x", 1), ["not valid json", "line 1"]),
    "out-of-memory": (MemoryError(), ["out of memory", "--batch-size"]),
    "markup-in-message": (ActlabError("bad site [/bold] in [red]x.txt"), ["bad site [/bold] in [red]x.txt"]),
    "multi-line-message": (ActlabError("first part\n   second part"), ["first part second part"]),
}


@pytest.mark.parametrize("case", list(BOUNDARY_CASES))
def test_user_caused_exceptions_are_exit_2(case, ws, monkeypatch):
    exc, facts = BOUNDARY_CASES[case]
    monkeypatch.setattr("actlab.cli.model.load_model", _raiser(exc))
    line = one_error_line(invoke(ws, monkeypatch, ["sites", "demo-llama"]))
    for fact in facts:
        assert fact.lower() in line.lower(), line


def test_internal_error_is_exit_1_with_a_crash_log(ws, monkeypatch, tmp_path):
    monkeypatch.setenv("ACTLAB_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr("actlab.cli.model.load_model", _raiser(RuntimeError("injected failure")))
    before = snapshot(ws)
    line = one_error_line(invoke(ws, monkeypatch, ["sites", "demo-llama"]), code=1)
    logs = list((tmp_path / "logs").glob("crash-*.log"))
    assert "internal error" in line and "injected failure" in line and len(logs) == 1 and str(logs[0]) in line
    text = logs[0].read_text()
    assert "Traceback" in text and "RuntimeError: injected failure" in text and "command:" in text
    assert snapshot(ws) == before


def test_ctrl_c_is_exit_130(ws, monkeypatch):
    monkeypatch.setattr("actlab.cli.model.load_model", _raiser(KeyboardInterrupt()))
    result = invoke(ws, monkeypatch, ["sites", "demo-llama"])
    assert result.exit_code == 130 and "interrupted" in result.stderr and "Traceback" not in result.output


# ------------------------------------------------------------------------------- what must work
def _prompt_of(llama, n_tokens: int) -> str:
    """A prompt of exactly ``n_tokens`` tokens: distinct words (so its start and end differ), then " and"s."""
    text = "one two three four five six seven eight nine ten"
    while len(llama.tokenizer(text)["input_ids"]) < n_tokens:
        text += " and"
    assert len(llama.tokenizer(text)["input_ids"]) == n_tokens
    return text


def test_long_prompt_keeps_its_end_and_says_so(llama, ws, monkeypatch):
    """20 prompt tokens, 252 new ones, context 256: the last 4 prompt tokens are kept (not the first 4)."""
    prompt = _prompt_of(llama, 20)
    ids = llama.tokenizer(prompt)["input_ids"]
    result = invoke(ws, monkeypatch, ["generate", "demo-llama", prompt, "--max-new-tokens", "252"])
    assert result.exit_code == 0 and "Traceback" not in result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and all(f in warning[0] for f in ("20 tokens", "context of 256 tokens", "last 4 tokens"))
    with pytest.warns(UserWarning, match="kept its last 4 tokens"):
        kept = llama.generate(prompt, max_new_tokens=252, return_ids=True)
    assert torch.equal(kept, llama.generate(torch.tensor([ids[-4:]]), max_new_tokens=252, return_ids=True))
    assert not torch.equal(kept, llama.generate(torch.tensor([ids[:4]]), max_new_tokens=252, return_ids=True))


def test_refused_record_leaves_nothing_and_the_corrected_rerun_works(ws, llama, monkeypatch, tmp_path):
    from actlab.store import record

    lib = tmp_path / "api-store"
    with pytest.raises(ActlabError, match="token id 99999"):
        record(llama, [[1, 2, 99999]], "resid.0", lib)
    assert not lib.exists() or not any(lib.iterdir())  # no manifest left to refuse the rerun
    assert record(llama, [[1, 2, 3]], "resid.0", lib).info()["n_tokens"] == 3
    out = tmp_path / "store"
    bad = invoke(ws, monkeypatch, ["record", "demo-llama", "--data", str(ws / "big.ids"), "-o", str(out)])
    assert "99999" in one_error_line(bad) and not out.exists()
    good = invoke(ws, monkeypatch, ["record", "demo-llama", "--data", str(ws / "ok.ids"), "-o", str(out),
                                    "--sites", "resid.0"])
    assert good.exit_code == 0, good.output
    assert invoke(ws, monkeypatch, ["store", "verify", str(out)]).exit_code == 0


def test_a_commands_own_exit_passes_the_boundary(ws, monkeypatch, tmp_path):
    """``store verify`` exits 1 on damage by itself: that is its answer, not an internal error."""
    import typer

    monkeypatch.setenv("ACTLAB_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr("actlab.cli.model.load_model", _raiser(typer.Exit(3)))
    result = invoke(ws, monkeypatch, ["sites", "demo-llama"])
    assert result.exit_code == 3 and "error" not in result.output and not (tmp_path / "logs").exists()


def test_pickle_needs_the_opt_in_and_safetensors_come_first(ws, monkeypatch):
    assert invoke(ws, monkeypatch, ["--allow-pickle", "sites", str(ws / "models/pickle")]).exit_code == 0
    both = invoke(ws, monkeypatch, ["sites", str(ws / "models/both")])  # its .bin is garbage: never read
    assert both.exit_code == 0 and "resid.0" in both.output


def test_prompt_with_markup_prints_as_given(ws, monkeypatch):
    result = invoke(ws, monkeypatch, ["generate", "demo-llama", "[/bold] [red]x", "--max-new-tokens", "2"])
    assert result.exit_code == 0 and result.stdout.startswith("[/bold] [red]x")


# ------------------------------------------------------------------------------- the Python API matrix
def _edit_generate(m, ws, coef):
    from actlab.interventions import load_interventions

    with m.edit(load_interventions(ws / "vec.safetensors", m) * coef):
        return m.generate("In the beginning", max_new_tokens=3)


def _contrast(*args):
    from actlab.interventions.contrast import ContrastSet

    return ContrastSet(*args)


def _run_profile(m, **kwargs):
    from actlab.analyses.profile import run_profile

    return run_profile(m, ["a short text to profile"], **kwargs)


API_CASES = {
    # load
    "load-device-unknown": (lambda m, ws: actlab.load("demo-llama", device="tpu9"), "unknown device 'tpu9'"),
    "load-device-missing": (lambda m, ws: actlab.load("demo-llama", device="cuda:99"), "cuda:99"),
    "load-device-type": (lambda m, ws: actlab.load("demo-llama", device=5), "device must be"),
    "load-dtype-unknown": (lambda m, ws: actlab.load("demo-llama", dtype="float8"), "unknown dtype"),
    "load-dtype-type": (lambda m, ws: actlab.load("demo-llama", dtype=["float32"]), "dtype must be"),
    "load-dtype-integer": (lambda m, ws: actlab.load("demo-llama", dtype=torch.int64), "not a floating-point"),
    "load-name-type": (lambda m, ws: actlab.load(5), "load takes a model name"),
    "load-name-empty": (lambda m, ws: actlab.load(""), "load takes a model name"),
    "load-truncated": (lambda m, ws: actlab.load(ws / "models/trunc"), "not a complete safetensors file"),
    "load-pickle-only": (lambda m, ws: actlab.load(ws / "models/pickle"), "allow_pickle=True"),
    "load-no-weights": (lambda m, ws: actlab.load(ws / "models/noweights"), "no model weights"),
    "load-bad-config": (lambda m, ws: actlab.load(ws / "models/badconfig"), "config.json"),
    # model(...)
    "call-id-too-big": (lambda m, ws: m([[99999]]), "token id 99999"),
    "call-id-negative": (lambda m, ws: m([[-1]]), "token id -1"),
    "call-id-float": (lambda m, ws: m([[1.5, 2]]), "token ids are integers"),
    "call-empty-row": (lambda m, ws: m([[]]), "empty token-id list"),
    "call-mixed-list": (lambda m, ws: m(["a text", 3]), "texts[1] is int"),
    "call-dict": (lambda m, ws: m({"text": "a"}), "not dict"),
    "call-float-tensor": (lambda m, ws: m(torch.tensor([[1.0, 2.0]])), "must hold integers"),
    "call-3d-tensor": (lambda m, ws: m(torch.ones(1, 2, 3, dtype=torch.long)), "[batch, tokens]"),
    "call-tensor-too-big": (lambda m, ws: m(torch.tensor([[5, 99999]])), "token id 99999"),
    "call-bad-mask": (lambda m, ws: m(torch.tensor([[5, 6]]), torch.ones(1, 3)), "attention_mask"),
    # generate
    "gen-zero-tokens": (lambda m, ws: m.generate("hi", max_new_tokens=0), "max_new_tokens must be a positive integer"),
    "gen-float-tokens": (lambda m, ws: m.generate("hi", max_new_tokens=1.5), "max_new_tokens"),
    "gen-fills-context": (lambda m, ws: m.generate("hi", max_new_tokens=300), "context is 256 tokens"),
    "gen-temperature-zero": (lambda m, ws: m.generate("hi", do_sample=True, temperature=0), "temperature"),
    "gen-top-p": (lambda m, ws: m.generate("hi", do_sample=True, top_p=1.5), "top_p"),
    "gen-seed-string": (lambda m, ws: m.generate("hi", seed="7"), "seed"),
    "gen-seed-negative": (lambda m, ws: m.generate("hi", seed=-1), "seed"),
    "gen-no-prompts": (lambda m, ws: m.generate([]), "no prompts"),
    "gen-do-sample-string": (lambda m, ws: m.generate("hi", do_sample="yes"), "do_sample"),
    "gen-absurd-edit": (lambda m, ws: _edit_generate(m, ws, 1e30), "far too strong"),
    # steering
    "sv-strings": (lambda m, ws: actlab.steering_vector(m, "abc", "def", "resid.1"), "not the single string 'abc'"),
    "sv-string-neg": (lambda m, ws: actlab.steering_vector(m, ["abc"], "def", "resid.1"), "neg must be a list"),
    "sv-ints": (lambda m, ws: actlab.steering_vector(m, [1, 2], ["def"], "resid.1"), "pos[0] is int"),
    "sv-empty": (lambda m, ws: actlab.steering_vector(m, [], ["def"], "resid.1"), "empty contrast set"),
    "sv-two-sites": (lambda m, ws: actlab.steering_vector(m, ["a"], ["b"], "resid.*"), "one site"),
    "fit-dims-zero": (lambda m, ws: actlab.fit_steering(m, _contrast(["a b"], ["c d"]), "resid.1", method="dims", dims=0),
                      "dims must be a positive"),
    "fit-dims-too-many": (lambda m, ws: actlab.fit_steering(m, _contrast(["a"], ["b"]), "resid.1", method="dims", dims=999),
                          "256 dimensions"),
    "fit-not-a-contrast": (lambda m, ws: actlab.fit_steering(m, (["a"], ["b"]), "resid.1"), "ContrastSet"),
    "fit-affine-method": (lambda m, ws: actlab.fit_steering(m, _contrast(["a"], ["b"]), "resid.1", method="affine"),
                          "fit_affine"),
    "contrast-string": (lambda m, ws: _contrast("abc", ["b"]).validate(), "single string"),
    # run / collect / capture / edit
    "run-string": (lambda m, ws: m.run("just one text", "resid.0"), "not the single string"),
    "collect-string": (lambda m, ws: m.collect("just one text", "resid.0"), "not the single string"),
    "run-mixed-docs": (lambda m, ws: m.run(["a", [1, 2]], "resid.0"), "docs[1] is list"),
    "run-id-too-big": (lambda m, ws: m.run([[1, 2, 99999]], "resid.0"), "token id 99999"),
    "run-no-docs": (lambda m, ws: m.run(None, "resid.0"), "nothing to run"),
    "run-bad-sink": (lambda m, ws: m.run(["a"], "resid.0", [object()]), "consume"),
    "run-batch-zero": (lambda m, ws: m.run(["a"], "resid.0", batch_size=0), "batch_size"),
    "run-bad-positions": (lambda m, ws: m.run(["a"], "resid.0", positions="first"), "positions"),
    "run-bad-device": (lambda m, ws: m.run(["a"], "resid.0", device="tpu9"), "unknown device"),
    "run-bad-long-docs": (lambda m, ws: m.run(["a"], "resid.0", long_docs="drop"), "long_docs"),
    "run-unknown-option": (lambda m, ws: m.run(["a"], "resid.0", batchsize=4), "unknown RunOptions option"),
    "capture-int": (lambda m, ws: m.capture(123), "sites must be"),
    "edit-path-string": (lambda m, ws: m.edit(str(ws / "vec.safetensors")), "load_interventions"),
    "edit-tensor": (lambda m, ws: m.edit(torch.zeros(256)), "model.edit takes"),
    # files through the API
    "read-docs-folder": (lambda m, ws: __import__("actlab.io").io.read_documents(ws / "folder"), "is a directory"),
    "read-contrast-utf8": (lambda m, ws: __import__("actlab.interventions.contrast").interventions.contrast.read_contrast(
        ws / "pairs_utf8.jsonl"), "line 2"),
    "output-file-is-folder": (lambda m, ws: __import__("actlab.io").io.check_output_file(ws / "folder"), "is a folder"),
    "output-dir-foreign": (lambda m, ws: __import__("actlab.io").io.check_output_dir(ws / "folder", "report.html"),
                           "keep.txt"),
    "output-dir-is-file": (lambda m, ws: __import__("actlab.io").io.check_output_dir(ws / "afile.txt"), "is a file"),
    # profile
    "profile-reservoir-zero": (lambda m, ws: _run_profile(m, reservoir_size=0), "reservoir_size must be a positive"),
    "profile-batch-zero": (lambda m, ws: _run_profile(m, batch_size=0), "batch_size must be a positive"),
    "profile-analyses-string": (lambda m, ws: _run_profile(m, analyses="sparsity"), "not the string 'sparsity'"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_refuses_with_one_clear_error(case, llama, ws, monkeypatch):
    fn, fact = API_CASES[case]
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    with pytest.raises(ActlabError) as info:
        fn(llama, ws)
    message = str(info.value)
    assert fact in message and "\n" not in message and "Traceback" not in message
    assert snapshot(ws) == before


def test_generate_on_an_encoder_is_refused():
    from tiny_models import tiny_model

    with pytest.raises(ActlabError, match="cannot generate"):
        tiny_model("bert").generate("hi")


def test_the_model_files_that_must_load(ws, llama):
    assert actlab.load(ws / "models/pickle", allow_pickle=True).weights_hash == llama.weights_hash
    assert actlab.load(ws / "models/both").weights_hash == llama.weights_hash
