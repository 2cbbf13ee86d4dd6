"""Property-based fuzzing of every file parser (issue 11), with Hypothesis.

Random mutations of a valid store manifest (or of a completion marker), and of the safetensors
headers, JSON metadata and bytes of intervention / profile / converter / stats files, give an
ActlabError or a correct result: never another exception, never a file opened outside the folder
(every open is recorded), never memory sized by a header number (the address space is capped at
a few GiB above what the process already maps). A store that verifies clean reads exactly the
reference data; recording again after ``repair_store`` gives back the reference store.

Budgets are small and fixed (``derandomize=True``: the same examples on every run, no database).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from actlab.errors import ActlabError
from actlab.files import content_sha256, open_tensors
from actlab.interventions import AffineMap, NeuronClamp, SteeringVector, load_interventions
from actlab.stats import StatsSink
from actlab.store import MANIFEST_NAME, Store, record, repair_store
from actlab.store.manifest import marker_name
from actlab.transfer import ActivationProfile, ConverterSet, fit_converters, profile_model
from test_trust_files import DOCS, PARAMS, SITES, outside, record_opens
from tiny_models import tiny_model

FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HUGE = "__HUGE_INT__"  # replaced by a 5000-digit integer in the JSON text (json.dumps cannot write one)
SPECIAL = [None, True, False, 0, -1, 1, 7, 2**31, 2**63, 10**12, 10**30, 1.5, -0.0, math.inf, math.nan, HUGE,
           "", "../x", "/etc/hostname", "..", "shard-00000.safetensors", "shard-00001.safetensors",
           "../other/shard-00000.safetensors", "shard-00000.safetensors/../../etc/hostname", "\u202eü\x00é",
           "a" * 300, "float64", "all", "last", [], {}, [0, None], [1, 2], {"a": 1}, [[[[[]]]]], "0" * 64]


# ------------------------------------------------------------------ mutations of a JSON tree
def json_values(huge: bool = True):
    """Any JSON value, biased to the edge cases; ``huge``: also a 5000-digit integer (which Python's
    json refuses to read, so a file holding one does not parse)."""
    special = SPECIAL if huge else [v for v in SPECIAL if v != HUGE]
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                        st.text(max_size=12))
    return st.one_of(st.sampled_from(special), st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6))


def mutate(data, tree, huge: bool = True):
    """One random edit somewhere in ``tree`` (in place): delete, replace, nudge a number, duplicate."""
    if not isinstance(tree, (dict, list)) or not tree:
        return
    parent, key = tree, data.draw(st.sampled_from(list(tree) if isinstance(tree, dict) else range(len(tree))))
    while isinstance(parent[key], (dict, list)) and parent[key] and data.draw(st.booleans()):
        parent = parent[key]
        key = data.draw(st.sampled_from(list(parent) if isinstance(parent, dict) else range(len(parent))))
    node = parent[key]
    op = data.draw(st.sampled_from(["delete", "replace", "nudge", "duplicate"]))
    if op == "delete":
        del parent[key]
    elif op == "nudge" and isinstance(node, int) and not isinstance(node, bool):
        parent[key] = node + data.draw(st.sampled_from([-1, 1, -node, node, 10**12]))
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(node))
    else:  # a copy: the edge cases are shared objects, which a later edit must not change
        parent[key] = copy.deepcopy(data.draw(json_values(huge)))


def dumps(tree) -> str:
    text = json.dumps(tree)
    return text.replace(json.dumps(HUGE), "1" + "0" * 5000)


@contextlib.contextmanager
def capped_memory(extra: int = 3 * 2**30):
    """The address space capped at what the process maps now plus ``extra``: an allocation sized by a
    header number fails (and shows up as a non-ActlabError) instead of filling the machine."""
    try:
        import resource

        size = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
    except (ImportError, OSError, StopIteration):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra if hard == resource.RLIM_INFINITY else min(hard, size + extra)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def watched(folder: Path, area: Path):
    """Every open recorded; on exit, none outside ``folder`` (in the scratch ``area`` or /etc)."""
    with pytest.MonkeyPatch.context() as mp:
        seen = record_opens(mp)
        with capped_memory():
            yield
    assert outside(seen, folder, area) == []


def attempt(fn, *args, **kwargs):
    """fn's result, or None when it raised an ActlabError (any other exception fails the test)."""
    try:
        return fn(*args, **kwargs)
    except ActlabError as e:
        assert "\n" not in str(e).strip() or "recorded differently" in str(e), str(e)
        return None


# ------------------------------------------------------------------ stores
@pytest.fixture(scope="module")
def reference(llama, tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("fuzzref") / "store"
    record(llama, DOCS, SITES, ref, **PARAMS)
    return ref


def _shards_of(store: Store) -> dict[int, dict[str, torch.Tensor]]:
    return {e["index"]: store.load_shard(k) for k, e in enumerate(store._shards)}


def _check_store(out: Path, ref_shards: dict) -> None:
    """A store that opens either verifies clean and reads the reference data, or says what is wrong."""
    store = attempt(Store, out)
    if store is None:
        return
    problems = store.verify()
    store.info()
    if not problems:
        got = _shards_of(store)
        assert all(all(torch.equal(t, ref_shards[i][k]) for k, t in shard.items()) for i, shard in got.items())
        attempt(lambda: next(iter(store.batches("final", 8)), None))
    else:
        attempt(lambda: store["final"][:])
        attempt(lambda: [store["final"][i] for i in (0, len(store) - 1)] if len(store) else None)


def _mutated_store(data, reference: Path, out: Path, *, entries_only: bool) -> None:
    """A copy of the reference store with 1-3 random edits of its manifest (only of its shard list
    with ``entries_only``), maybe interrupted: its last shards unlisted, with (maybe edited) markers."""
    shutil.copytree(reference, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(1, len(manifest["shards"]) - 1))
        for entry in manifest["shards"][cut:]:
            marker = {"plan_sha256": manifest["plan"]["plan_sha256"], "shard": copy.deepcopy(entry)}
            if data.draw(st.booleans()):
                mutate(data, marker["shard"] if entries_only else marker, huge=not entries_only)
            (out / marker_name(entry["index"])).write_text(dumps(marker))
        manifest["shards"] = manifest["shards"][:cut]
        manifest.update(complete=False, n_tokens=sum(e["n_tokens"] for e in manifest["shards"]))
    for _ in range(data.draw(st.integers(1, 3))):
        mutate(data, manifest["shards"] if entries_only else manifest, huge=not entries_only)
    (out / MANIFEST_NAME).write_text(dumps(manifest))


def _without_stamps(manifest: dict) -> dict:
    """A manifest less what differs between equal stores: time stamps, and the batch size each shard
    was recorded with (a resume may use another)."""
    shards = [{k: v for k, v in e.items() if k != "batch_size"} for e in manifest["shards"]]
    return {**{k: v for k, v in manifest.items() if k not in ("created", "updated")}, "shards": shards}


def _fuzz_store(llama, reference: Path, data, *, entries_only: bool) -> object:
    """Mutate, then read, verify, record, repair and record again, watching every open; returns the
    last record's Store, or None when it refused (an ActlabError)."""
    ref_shards = _shards_of(Store(reference))
    with tempfile.TemporaryDirectory() as tmp:
        area = Path(tmp)
        out = area / "store"
        _mutated_store(data, reference, out, entries_only=entries_only)
        shutil.copytree(reference, area / "other")  # a valid store next door, which a path could point to
        with watched(out, area):
            _check_store(out, ref_shards)
            if attempt(record, llama, DOCS, SITES, out, **PARAMS) is not None:
                _check_store(out, ref_shards)
            attempt(repair_store, out)
            try:
                again = record(llama, DOCS, SITES, out, **PARAMS)
            except ActlabError as e:  # after a repair, only a damaged header (or other arguments) is refused
                assert not entries_only and "overwrite" in str(e), str(e)
                return None
        # once repaired, the same record call gives back the reference store
        assert again.verify() == []
        for name in sorted(p.name for p in reference.iterdir() if p.name != MANIFEST_NAME):
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
        assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".done.json"))]
        assert _without_stamps(again.manifest) == _without_stamps(Store(reference).manifest)
        return again


@settings(max_examples=100, **FUZZ)
@given(data=st.data())
def test_fuzzed_manifests_give_an_error_or_the_right_store(llama, reference, data):
    _fuzz_store(llama, reference, data, entries_only=False)


@settings(max_examples=100, **FUZZ)
@given(data=st.data())
def test_fuzzed_shard_entries_and_markers_are_repaired(llama, reference, data):
    assert _fuzz_store(llama, reference, data, entries_only=True) is not None


# ------------------------------------------------------------------ user files
class Files(dict):
    """name -> (the file's bytes, its loader), with a short repr for Hypothesis' reports."""

    def __repr__(self) -> str:
        return f"Files({sorted(self)})"


@pytest.fixture(scope="module")
def user_files(llama, tmp_path_factory) -> Files:
    """name -> (the file's bytes, its loader)."""
    folder = tmp_path_factory.mktemp("files")
    prompts = [f"prompt {i} {'xy' * (i % 4)}" for i in range(10)]
    donor, recipient = profile_model(llama, prompts), profile_model(tiny_model("gpt2"), prompts)
    sink = StatsSink({"resid.0": 32}, topk=3)
    llama.run(DOCS[:4], ["resid.0"], sink)
    paths = {
        "vector": (SteeringVector(site="resid.1", vector=torch.linspace(-1, 1, 32)).save(folder / "v.safetensors"),
                   load_interventions),
        "composition": ((AffineMap(site="resid.0", bias=torch.zeros(32), diag=torch.ones(32), U=torch.ones(32, 2),
                                   V=torch.ones(32, 2))
                         + NeuronClamp(site="mlp.hidden.0", neurons=torch.tensor([1, 5]), values=torch.ones(2),
                                       params={"site_width": 48})).save(folder / "c.safetensors"), load_interventions),
        "profile": (donor.save(folder / "p.safetensors"), ActivationProfile.load),
        "converters": (fit_converters(donor, recipient).save(folder / "k.safetensors"), ConverterSet.load),
        "stats": (sink.save(folder / "s.safetensors", metadata={"model": "m"}), StatsSink.load),
    }
    return Files({name: (path.read_bytes(), loader) for name, (path, loader) in paths.items()})


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    text = dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def _mutated_header(data, raw: bytes) -> bytes:
    """Edit the JSON header: tensor entries, or a metadata value (itself JSON when it parses)."""
    header, body = _split(raw)
    meta = header.get("__metadata__", {})
    if meta and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(meta)))
        try:
            inner = {"v": json.loads(meta[key])}
        except ValueError:
            inner = None
        if inner is None:
            meta[key] = str(copy.deepcopy(data.draw(json_values())))
        else:
            mutate(data, inner)
            if "v" in inner:
                meta[key] = dumps(inner["v"])
            else:
                del meta[key]
        header["__metadata__"] = {k: v for k, v in meta.items() if isinstance(v, str)}
    else:
        mutate(data, header)
    return _join(header, body)


def _rechecksummed(path: Path) -> None:
    """Give a mutated file a matching checksum (when it still parses), so its header reaches the checks."""
    try:
        tensors = load_file(str(path))
        with open_tensors(path) as f:
            meta = dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - not a safetensors file any more
        return
    if "checksum" in meta:
        header, body = _split(path.read_bytes())
        header["__metadata__"]["checksum"] = content_sha256(tensors, meta)
        path.write_bytes(_join(header, body))


def _use(name: str, obj) -> None:
    """Use a loaded file the way actlab does; only ActlabErrors may come out."""
    if name in ("vector", "composition"):
        for item in obj.edits():
            attempt(item.apply, torch.zeros(1, 2, item.width or 48))
    elif name == "profile":
        assert obj.n_layers >= 1 and obj.d_model >= 1 and len(obj.prompts) >= 1
    elif name == "converters":
        for table in (obj.to_donor, obj.to_recipient):
            for m in table.values():
                m(torch.zeros(2, m.weight.shape[0]))
    else:
        obj.summary()


@settings(max_examples=200, **FUZZ)
@given(data=st.data())
def test_fuzzed_user_files(user_files, data):
    name = data.draw(st.sampled_from(sorted(user_files)))
    raw, loader = user_files[name]
    how = data.draw(st.sampled_from(["truncate", "flip", "header", "header+checksum"]))
    if how == "truncate":
        mutated = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        n_header = 8 + int.from_bytes(raw[:8], "little")
        mutated = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 3))):
            where = data.draw(st.one_of(st.integers(0, n_header - 1), st.integers(0, len(raw) - 1)))
            mutated[where] ^= data.draw(st.integers(1, 255))
        mutated = bytes(mutated)
    else:
        mutated = _mutated_header(data, raw)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in" / "file.safetensors"
        path.parent.mkdir()
        (Path(tmp) / "file.safetensors").write_bytes(raw)  # a sound copy next door: never to be opened
        path.write_bytes(mutated)
        if how == "header+checksum":
            _rechecksummed(path)
        with watched(path.parent, Path(tmp)):
            obj = attempt(loader, path)
            if obj is not None:
                _use(name, obj)
        if obj is not None and how == "flip" and name != "stats":
            with open_tensors(path) as f:
                meta = f.metadata()
            if "checksum" in meta:  # a stale checksum lets no change through (a file without one is an old file)
                assert content_sha256(load_file(str(path)), meta) == _split(raw)[0]["__metadata__"]["checksum"]


@settings(max_examples=40, **FUZZ)
@given(data=st.data())
def test_a_damaged_profile_cache_entry_is_recomputed(llama, user_files, data):
    from actlab.transfer.profiles import cached_profile

    raw = user_files["profile"][0]
    with tempfile.TemporaryDirectory() as tmp:
        good = Path(tmp) / "good.safetensors"
        good.write_bytes(raw)
        profile = ActivationProfile.load(good)
        key = f"{llama.config_hash}-{llama.weights_hash}-{profile.prompts_hash}-last"
        cache = Path(tmp) / "cache" / "profiles" / f"{key}.safetensors"
        cache.parent.mkdir(parents=True)
        damaged = bytearray(raw)
        if data.draw(st.booleans()):
            damaged = damaged[: data.draw(st.integers(0, len(raw) - 1))]
        else:
            damaged[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        cache.write_bytes(bytes(damaged))
        again = cached_profile(llama, profile.prompts, cache_dir=Path(tmp) / "cache")
        assert again.prompts == profile.prompts
        assert all(torch.equal(again.acts[i], profile.acts[i]) for i in profile.acts)
