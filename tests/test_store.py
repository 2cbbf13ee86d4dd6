"""The on-disk activation store: record, resume, read, verify."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import actlab
from actlab.errors import ActlabError
from actlab.store import MANIFEST_NAME, Store, record
from actlab.store._files import DirLock
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SITES = ["resid.0", "mlp.hidden.1", "final"]
STAMPS = ("created", "updated")


def make_docs(n: int = 24) -> list[str]:
    """Texts of varied lengths; a few are longer than the tiny models' 64-token context."""
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta"]
    return [" ".join(words[(i * 3 + j) % len(words)] for j in range(1 + (i * 7) % 19)) for i in range(n)]


@pytest.fixture(scope="module")
def docs():
    return make_docs()


def store_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != MANIFEST_NAME}


def manifest_wo_stamps(directory: Path) -> dict:
    m = json.loads((directory / MANIFEST_NAME).read_text())
    return {k: v for k, v in m.items() if k not in STAMPS}


def assert_same_store(a: Path, b: Path) -> None:
    assert manifest_wo_stamps(a) == manifest_wo_stamps(b)
    files_a, files_b = store_files(a), store_files(b)
    assert sorted(files_a) == sorted(files_b)
    for name in files_a:
        assert files_a[name] == files_b[name], name


# ---------------------------------------------------------------- round trip
def test_round_trip_equals_collect(llama, docs, tmp_path):
    store = record(llama, docs, SITES, tmp_path / "s", shard_tokens=60, batch_size=4)
    assert store.complete and store.n_shards > 3
    assert store.verify() == []
    ref = llama.collect(docs, SITES, positions="all", batch_size=4)
    assert len(store) == ref.n_tokens == store.manifest["plan"]["n_tokens"]
    assert store.sites == SITES and store.widths == {s: llama.sites[s] for s in SITES}
    for site in SITES:
        got = store[site][:]
        assert got.dtype == torch.float32 and got.shape == ref.acts[site].shape
        torch.testing.assert_close(got, ref.acts[site], rtol=1e-5, atol=1e-6)
    assert torch.equal(store["token_ids"][:], ref.token_ids)
    assert torch.equal(store["doc_ids"][:], ref.doc_ids)
    assert torch.equal(store["positions"][:], ref.positions)
    assert store.manifest["n_documents"] == len(docs)


@pytest.mark.parametrize("positions", ["last", (1, 4)])
def test_positions_match_collect(llama, docs, tmp_path, positions):
    store = record(llama, docs, "resid.1", tmp_path / "s", positions=positions, shard_tokens=7)
    ref = llama.collect(docs, "resid.1", positions=positions)
    torch.testing.assert_close(store["resid.1"][:], ref.acts["resid.1"], rtol=1e-5, atol=1e-6)
    assert torch.equal(store["doc_ids"][:], ref.doc_ids)
    assert torch.equal(store["positions"][:], ref.positions)
    assert Store(tmp_path / "s").positions == positions


def test_random_access_equals_iteration(llama, docs, tmp_path):
    store = record(llama, docs, SITES, tmp_path / "s", shard_tokens=50)
    shards = list(store.iter_shards())
    assert len(shards) == store.n_shards
    assert set(shards[0]) == set(SITES) | {"token_ids", "doc_ids", "positions"}
    full = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    n = len(store)
    reader = Store(tmp_path / "s", cache_size=2)
    for key, ref in full.items():
        assert torch.equal(reader[key][:], ref)
        for i in (0, 1, 49, 50, 51, n // 2, n - 1, -1, -n):
            assert torch.equal(reader[key][i], ref[i])
        assert torch.equal(reader[key][45:155], ref[45:155])  # crosses shard boundaries
        assert torch.equal(reader[key][3:n:7], ref[3:n:7])
        assert torch.equal(reader[key][10:5], ref[10:5])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:97]
        assert torch.equal(reader.get(key, perm), ref[perm])
        assert torch.equal(reader.get(key, [5, -2, 5, 0]), ref[[5, -2, 5, 0]])
        mask = torch.arange(n) % 3 == 0
        assert torch.equal(reader.get(key, mask), ref[mask])
    assert len(reader._cache) <= 2
    assert reader["resid.0"].shape == (n, 32) and len(reader["resid.0"]) == n
    with pytest.raises(IndexError):
        reader["resid.0"][n]
    with pytest.raises(IndexError):
        reader.get("resid.0", [0, -n - 1])
    with pytest.raises(ActlabError, match="not in this store"):
        reader["resid.2"]
    # only what iter_shards is asked for is loaded
    assert set(next(reader.iter_shards(["final"]))) == {"final"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_dtype(llama, docs, tmp_path, dtype):
    store = record(llama, docs[:8], SITES, tmp_path / "s", dtype=dtype, shard_tokens=40)
    target = getattr(torch, dtype)
    ref = llama.collect(docs[:8], SITES, positions="all")
    for site in SITES:
        got = store[site][:]
        assert got.dtype == target
        torch.testing.assert_close(got.float(), ref.acts[site].to(target).float(), rtol=1e-2, atol=1e-2)
    assert store.manifest["dtype"] == dtype and store.manifest["model_dtype"] == "float32"
    assert store.verify() == []
    assert store.info()["dtype"] == dtype


def test_max_tokens_budget(llama, docs, tmp_path):
    full = record(llama, docs, "resid.2", tmp_path / "full", shard_tokens=40)
    cut = record(llama, docs, "resid.2", tmp_path / "cut", shard_tokens=40, max_tokens=123)
    assert len(cut) == 123 and cut.manifest["plan"]["max_tokens"] == 123
    # causal model: the tokens kept are exactly the first 123 of the unbudgeted store
    torch.testing.assert_close(cut["resid.2"][:], full["resid.2"][:123])
    assert torch.equal(cut["positions"][:], full["positions"][:123])


# ------------------------------------------------------------------ resume
def test_resume_after_crash_equals_uninterrupted(llama, docs, tmp_path):
    """A crash state (last shards unlisted, one shard written but not listed, temp files) resumes cleanly."""
    ref = tmp_path / "ref"
    record(llama, docs, SITES, ref, shard_tokens=60, batch_size=4)
    n_shards = Store(ref).n_shards
    crashed = tmp_path / "crashed"
    shutil.copytree(ref, crashed)
    manifest = json.loads((crashed / MANIFEST_NAME).read_text())
    keep = 2
    manifest["shards"] = manifest["shards"][:keep]
    manifest["n_tokens"] = sum(s["n_tokens"] for s in manifest["shards"])
    manifest["complete"] = False
    (crashed / MANIFEST_NAME).write_text(json.dumps(manifest))
    for i in range(keep + 1, n_shards):  # shard `keep` stays: written, but killed before the manifest update
        (crashed / f"shard-{i:05d}.safetensors").unlink()
    (crashed / f".shard-{keep + 1:05d}.safetensors.999.tmp").write_bytes(b"half a shard")
    (crashed / ".manifest.json.999.tmp").write_text("{")
    first = (crashed / "shard-00000.safetensors").stat()

    partial = Store(crashed)
    assert not partial.complete and len(partial) == manifest["n_tokens"]
    assert any("incomplete" in p for p in partial.verify())
    assert torch.equal(partial["final"][:], Store(ref)["final"][: len(partial)])

    record(llama, docs, SITES, crashed, shard_tokens=60, batch_size=4)
    assert_same_store(ref, crashed)
    assert (crashed / "shard-00000.safetensors").stat().st_ino == first.st_ino  # not rewritten


def test_rerun_of_complete_store_changes_nothing(llama, docs, tmp_path):
    out = tmp_path / "s"
    record(llama, docs, SITES, out, shard_tokens=80)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    record(llama, docs, SITES, out)  # shard_tokens is taken from the store when not given
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == before


_CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
from tiny_models import tiny_model
from actlab.store import record
args = json.load(open(sys.argv[1]))
model = tiny_model("llama")
model.hooks.add_reader("embed", lambda site, h, state: time.sleep(args["delay"]))  # slow, read-only
record(model, args["docs"], args["sites"], args["out"], shard_tokens=args["shard_tokens"], batch_size=args["batch_size"])
"""


@pytest.mark.slow
def test_killed_subprocess_resumes_to_identical_store(llama, tmp_path):
    docs = make_docs(60)
    params = dict(shard_tokens=40, batch_size=2)
    ref = tmp_path / "ref"
    record(llama, docs, SITES, ref, **params)
    n_shards = Store(ref).n_shards
    assert n_shards >= 20

    out = tmp_path / "killed"
    args = tmp_path / "args.json"
    args.write_text(json.dumps(dict(docs=docs, sites=SITES, out=str(out), delay=0.1, **params)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), HF_HUB_OFFLINE="1")
    log = tmp_path / "child.log"
    with open(log, "wb") as sink:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(args)], env=env, stdout=sink, stderr=sink)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if (out / MANIFEST_NAME).exists() and len(json.loads((out / MANIFEST_NAME).read_text())["shards"]) >= 2:
                break
            time.sleep(0.01)
        assert child.poll() is None, f"the child ended before it was killed:\n{log.read_text()[-2000:]}"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    left = Store(out)
    assert 2 <= left.n_shards < n_shards, "the child must die part-way through"
    first = (out / "shard-00000.safetensors").stat().st_ino

    store = record(llama, docs, SITES, out, **params)
    assert store.complete and store.verify() == []
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert (out / "shard-00000.safetensors").stat().st_ino == first
    assert_same_store(ref, out)


# ------------------------------------------------------------------ checks
def test_verify_reports_flipped_byte_and_missing_shard(llama, docs, tmp_path):
    out = tmp_path / "s"
    record(llama, docs, SITES, out, shard_tokens=60)
    target = out / "shard-00001.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) - 100] ^= 0x01  # inside the tensor data: the file still opens
    target.write_bytes(bytes(data))
    problems = Store(out).verify()
    assert len(problems) == 1 and "shard-00001.safetensors" in problems[0] and "checksum" in problems[0]
    assert Store(out).verify(checksums=False) == []

    data[20] ^= 0xFF  # inside the JSON header: the file no longer parses
    target.write_bytes(bytes(data))
    problems = Store(out).verify()
    assert any("shard-00001" in p and "checksum" in p for p in problems)

    (out / "shard-00002.safetensors").unlink()
    problems = Store(out).verify()
    assert any(p == "shard-00002.safetensors: missing" for p in problems)
    damaged = Store(out)
    with pytest.raises(ActlabError, match="missing"):
        damaged["final"][damaged.manifest["shards"][2]["token_offset"]]
    with pytest.raises(ActlabError, match="cannot read"):
        damaged["final"][damaged.manifest["shards"][1]["token_offset"]]


def test_resume_repairs_a_missing_shard(llama, docs, tmp_path):
    out, ref = tmp_path / "s", tmp_path / "ref"
    record(llama, docs, SITES, ref, shard_tokens=60)
    shutil.copytree(ref, out)
    (out / "shard-00001.safetensors").unlink()
    record(llama, docs, SITES, out, shard_tokens=60)
    assert_same_store(ref, out)


def test_store_for_another_model_is_refused(llama, docs, tmp_path):
    out = tmp_path / "s"
    record(llama, docs[:6], "resid.*", out, shard_tokens=30)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ActlabError, match="model: the store was recorded with LlamaForCausalLM") as err:
        record(gpt2, docs[:6], "resid.*", out, shard_tokens=30)
    assert "overwrite" in str(err.value)
    with pytest.raises(ActlabError, match="recorded with LlamaForCausalLM"):
        Store(out).check_model(gpt2)
    Store(out).check_model(llama)
    # other mismatches are named too, and nothing was touched
    before = store_files(out)
    with pytest.raises(ActlabError, match="sites:"):
        record(llama, docs[:6], "resid.0", out)
    with pytest.raises(ActlabError, match="dtype:"):
        record(llama, docs[:6], "resid.*", out, dtype="float16")
    with pytest.raises(ActlabError, match="input data"):
        record(llama, docs[:7], "resid.*", out)
    with pytest.raises(ActlabError, match="positions:"):
        record(llama, docs[:6], "resid.*", out, positions="last")
    assert store_files(out) == before
    # overwrite replaces the store
    store = record(gpt2, docs[:6], "resid.*", out, shard_tokens=30, overwrite=True)
    store.check_model(gpt2)
    assert store.verify() == [] and store.model["model_class"] == "GPT2LMHeadModel"


def test_directory_checks(llama, docs, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ActlabError, match="not empty"):
        record(llama, docs[:3], "resid.0", foreign)
    with pytest.raises(ActlabError, match="not part of an activation store"):
        record(llama, docs[:3], "resid.0", foreign, overwrite=True)
    assert (foreign / "notes.txt").exists()
    with pytest.raises(ActlabError, match="not an activation store"):
        Store(foreign)
    with pytest.raises(ActlabError, match="does not exist"):
        Store(tmp_path / "nowhere")
    busy = tmp_path / "busy"
    busy.mkdir()
    with DirLock(busy):
        with pytest.raises(ActlabError, match="another process"):
            record(llama, docs[:3], "resid.0", busy)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ActlabError, match="overwrite"):
        record(llama, docs[:3], "resid.0", tmp_path / "bad")
    assert record(llama, docs[:3], "resid.0", tmp_path / "bad", overwrite=True).verify() == []
    orphans = tmp_path / "orphans"
    orphans.mkdir()
    (orphans / "shard-00000.safetensors").write_bytes(b"x")
    with pytest.raises(ActlabError, match="overwrite"):
        record(llama, docs[:3], "resid.0", orphans)
    record(llama, docs[:3], "resid.0", orphans, overwrite=True, shard_tokens=10_000)
    assert sorted(p.name for p in orphans.iterdir()) == [MANIFEST_NAME, "shard-00000.safetensors"]
    assert Store(orphans).verify() == []
    with pytest.raises(ActlabError, match="selects no token"):
        record(llama, docs[:3], "resid.0", tmp_path / "none", positions=(500, 600))
    with pytest.raises(ActlabError, match="dtype"):
        record(llama, docs[:3], "resid.0", tmp_path / "f64", dtype="float64")


def test_info(llama, docs, tmp_path):
    store = record(llama, docs, SITES, tmp_path / "s", shard_tokens=100)
    info = store.info()
    assert info["model"] == "LlamaForCausalLM" and info["config_hash"] == llama.config_hash
    assert info["sites"] == {"resid.0": 32, "mlp.hidden.1": 48, "final": 32}
    assert info["n_tokens"] == info["n_tokens_planned"] == len(store)
    assert info["n_shards"] == info["n_shards_planned"] == len(list((tmp_path / "s").glob("shard-*.safetensors")))
    assert info["complete"] is True and info["n_documents"] == len(docs)
    assert info["bytes"] == sum(p.stat().st_size for p in (tmp_path / "s").glob("shard-*"))
    json.dumps(info)  # printable as JSON by the CLI
    assert "LlamaForCausalLM" in repr(store)


def test_docs_example_runs(tmp_path, monkeypatch):
    """The reading example in docs/store.md runs as written."""
    text = (ROOT / "docs" / "store.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if "iter_shards" in b)
    monkeypatch.setattr("tempfile.mkdtemp", lambda: str(tmp_path))
    exec(compile(example, "docs/store.md", "exec"), {"__name__": "docs_example"})
    assert Store(tmp_path).complete


def test_same_model_under_another_name_reads_the_store(llama, docs, tmp_path):
    """A store names its model by config and weights, so the same checkpoint loaded as ``./path`` or
    as a zoo name may read (and resume) it; another model with the same config may not."""
    import copy

    out = tmp_path / "s"
    record(llama, docs[:4], "resid.0", out, shard_tokens=30)
    renamed = actlab.load(llama.hf, tokenizer=llama.tokenizer)
    renamed.name = "./somewhere/else"
    Store(out).check_model(renamed)
    record(renamed, docs[:4], "resid.0", out, shard_tokens=30)  # resuming a finished store: nothing to redo
    retuned = copy.deepcopy(llama.hf)
    with torch.no_grad():
        next(retuned.parameters()).add_(0.5)
    other = actlab.load(retuned, tokenizer=llama.tokenizer)
    other.name = "./fine-tuned"
    assert other.config_hash == llama.config_hash and other.weights_hash != llama.weights_hash
    with pytest.raises(ActlabError, match="recorded with"):
        Store(out).check_model(other)


def test_shard_files_are_safetensors_own_bytes_of_their_tensors(llama, docs, tmp_path):
    """Every shard is exactly what safetensors writes for fresh copies of its tensors and its metadata, whether
    the recorder kept a one-batch shard's own tensors, reused an earlier shard's buffer or filled a new one."""
    from safetensors import safe_open
    from safetensors.torch import save

    for shard_tokens, batch_size in ((60, 4), (10_000, 64), (25, 1)):  # reused buffers; one batch; many shards
        out = tmp_path / f"s{shard_tokens}"
        store = record(llama, docs, SITES, out, shard_tokens=shard_tokens, batch_size=batch_size)
        for path in store.shard_paths():
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
                metadata = f.metadata()
            assert save(tensors, metadata=metadata) == path.read_bytes(), path.name
    assert store.n_shards > 20 and Store(tmp_path / "s10000").n_shards == 1
