"""Every file actlab reads is validated before it is trusted (issue 11).

Store manifests: types and ranges of every field, counts that agree with each other and with the
shard files, shard paths confined to the store, no loop or allocation sized by a header number.
User files (interventions, profiles, converters, stats): checked headers and a checksum. And
``actlab store verify --repair``, which drops damaged shards so the same record call re-records them.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import actlab.files
from actlab.cli import app
from actlab.errors import ActlabError
from actlab.files import content_sha256, open_tensors
from actlab.interventions import AffineMap, Composition, NeuronClamp, SteeringVector, load_interventions
from actlab.stats import StatsSink
from actlab.store import MANIFEST_NAME, Store, record, repair_store
from actlab.transfer import ActivationProfile, ConverterSet, fit_converters, profile_model
from actlab.transfer.profiles import cached_profile
from tiny_models import tiny_model

SITES = ["resid.0", "mlp.hidden.1", "final"]
STAMPS = ("created", "updated")
DOCS = [" ".join(["alpha", "beta", "gamma", "delta"][(i + j) % 4] for j in range(3 + (i * 5) % 11)) for i in range(16)]
PARAMS = dict(shard_tokens=40, batch_size=4)
cli = CliRunner()


# ------------------------------------------------------------------ helpers (test_fuzz_files uses them too)
def invoke(*args):
    return cli.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *fragments: str) -> str:
    """The CLI failed with exit 2 and one `error:` line that holds every fragment; no traceback."""
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out and out.count("error:") == 1, out
    line = " ".join(out.split())
    for fragment in fragments:
        assert fragment in line, (fragment, out)
    return line


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def edit_manifest(out: Path, edit) -> None:
    manifest = read_json(out / MANIFEST_NAME)
    edit(manifest)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))


def store_state(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file but the manifest: (inode, mtime, bytes)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.iterdir()) if p.name != MANIFEST_NAME}


def assert_same_store(a: Path, b: Path) -> None:
    ma, mb = read_json(a / MANIFEST_NAME), read_json(b / MANIFEST_NAME)
    assert {k: v for k, v in ma.items() if k not in STAMPS} == {k: v for k, v in mb.items() if k not in STAMPS}
    fa, fb = store_state(a), store_state(b)
    assert sorted(fa) == sorted(fb)
    assert all(fa[name][2] == fb[name][2] for name in fa)


def record_opens(monkeypatch) -> list[Path]:
    """Every path opened from now on (Python's open, os.open, safetensors), links resolved."""
    seen: list[Path] = []
    real_open, real_os_open = builtins.open, os.open
    real_safe_open, real_load_file = actlab.files.safe_open, actlab.files.load_file

    def note(path):
        if isinstance(path, (str, bytes, os.PathLike)):
            seen.append(Path(os.fsdecode(path)).resolve())

    def opener(file, *args, **kwargs):
        note(file)
        return real_open(file, *args, **kwargs)

    def os_opener(path, *args, **kwargs):
        note(path)
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr(os, "open", os_opener)
    monkeypatch.setattr(actlab.files, "safe_open", lambda p, *a, **k: (note(p), real_safe_open(p, *a, **k))[1])
    monkeypatch.setattr(actlab.files, "load_file", lambda p, *a, **k: (note(p), real_load_file(p, *a, **k))[1])
    return seen


def outside(seen: list[Path], folder: Path, area: Path) -> list[Path]:
    """Paths under ``area`` (the test's scratch space) or /etc that were opened but are not in ``folder``."""
    folder, area = folder.resolve(), area.resolve()
    return [p for p in seen if p != folder and folder not in p.parents and (area in p.parents or str(p).startswith("/etc"))]


def rewrite_tensors(path: Path, *, tensors=None, metadata=None, checksum: str = "recompute") -> None:
    """Rewrite a tagged file with edited tensors / metadata; its checksum recomputed, kept stale or dropped."""
    with open_tensors(path) as f:
        meta = dict(f.metadata() or {})
    data = load_file(str(path))
    if tensors is not None:  # the edits change their argument in place (what they return is ignored)
        tensors(data)
    if metadata is not None:
        metadata(meta)
    new_meta = meta
    if checksum == "recompute":
        new_meta["checksum"] = content_sha256(data, new_meta)
    elif checksum == "drop":
        new_meta.pop("checksum", None)
    save_file(data, str(path), metadata=new_meta)


# ------------------------------------------------------------------ a reference store
@pytest.fixture(scope="module")
def reference(llama, tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("ref") / "store"
    store = record(llama, DOCS, SITES, ref, **PARAMS)
    assert store.n_shards >= 4 and store.verify() == []
    return ref


@pytest.fixture()
def out(reference, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(reference, copy)
    return copy


# ------------------------------------------------------------------ issue item 1: paths
@pytest.mark.parametrize("name", [
    "../other/shard-00001.safetensors", "/etc/hostname", "sub/shard-00001.safetensors", "..\\other\\x.safetensors",
    "shard-00001.safetensors/../../other/shard-00001.safetensors", "shard-1.safetensors", "", "shard-00002.safetensors",
])
def test_a_shard_file_that_is_not_the_stores_own_name_is_refused(llama, out, tmp_path, monkeypatch, name):
    shutil.copytree(out, tmp_path / "other")  # a valid store next door: the entry would verify against it
    edit_manifest(out, lambda m: m["shards"][1].update(file=name))
    seen = record_opens(monkeypatch)
    with pytest.raises(ActlabError, match="must be the bare file name shard-00001.safetensors"):
        Store(out)
    one_line_error(invoke("store", "verify", out), "must be the bare file name", "--repair")
    with pytest.raises(ActlabError, match="bare file name"):
        record(llama, DOCS, SITES, out, **PARAMS)
    assert outside(seen, out, tmp_path) == []
    monkeypatch.undo()
    assert repair_store(out) and Store(out).n_shards == Store(tmp_path / "other").n_shards - 1
    record(llama, DOCS, SITES, out, **PARAMS)
    assert_same_store(tmp_path / "other", out)


def test_links_out_of_the_store_are_not_followed(llama, reference, out, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(reference, elsewhere)
    (out / "shard-00001.safetensors").unlink()
    (out / "shard-00001.safetensors").symlink_to(elsewhere / "shard-00001.safetensors")  # identical bytes
    seen = record_opens(monkeypatch)
    store = Store(out)
    problems = store.verify()
    assert len(problems) == 1 and "outside the store" in problems[0]
    store["final"][: store.manifest["shards"][1]["token_offset"]]  # the shard before it still reads
    with pytest.raises(ActlabError, match="outside the store.*--repair"):
        store["final"][:]
    assert outside(seen, out, tmp_path) == []
    monkeypatch.undo()
    assert len(repair_store(out)) == 1
    assert not (out / "shard-00001.safetensors").exists() and (elsewhere / "shard-00001.safetensors").is_file()
    record(llama, DOCS, SITES, out, **PARAMS)
    assert not (out / "shard-00001.safetensors").is_symlink()
    assert_same_store(reference, out)
    # the manifest itself is confined too (markers: test_stale_or_foreign_markers_are_ignored)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / MANIFEST_NAME).symlink_to(elsewhere / MANIFEST_NAME)
    with pytest.raises(ActlabError, match="outside the store"):
        Store(tmp_path / "m")


# ------------------------------------------------------------------ issue item 2: numbers
def test_a_huge_shard_count_neither_allocates_nor_loops(out):
    edit_manifest(out, lambda m: m["plan"].update(n_shards=10**12))
    with pytest.raises(ActlabError, match="the plan's counts disagree"):
        Store(out)
    one_line_error(invoke("store", "verify", out), "plan's counts disagree")

    def inflate(m):  # every count inflated consistently: a sound header, the shards on disk say otherwise
        n = 10**13
        m["plan"].update(n_shards=10**12, n_rows=n, n_tokens=n)
        m["shapes"] = {k: [n, *v[1:]] for k, v in m["shapes"].items()}

    edit_manifest(out, inflate)
    tracemalloc.start()
    start = time.perf_counter()
    problems = Store(out).verify(checksums=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 20 * 2**20
    assert problems == [f"incomplete: {10**12 - Store(out).n_shards} of {10**12} planned shards are not recorded yet "
                        "(run the same record command again to finish)"]


def test_a_huge_token_count_in_a_shard_entry_is_refused(llama, reference, out):
    edit_manifest(out, lambda m: m["shards"][2].update(n_tokens=10**30))
    with pytest.raises(ActlabError, match=r"shard-00002.safetensors: n_tokens about 10\^30 or token_offset \d+ is not a token count"):
        Store(out)
    with pytest.raises(ActlabError, match=r"store verify --repair") as err:
        record(llama, DOCS, SITES, out, **PARAMS)  # the resume refuses: it used to exit 0 and print 10^30
    assert str(10**30) not in str(err.value)
    one_line_error(invoke("store", "verify", out), "shard-00002.safetensors", "--repair")
    before = store_state(out)
    assert repair_store(out) == [str(err.value).split("is damaged: ")[1].split("; run")[0]]
    record(llama, DOCS, SITES, out, **PARAMS)
    assert_same_store(reference, out)
    after = store_state(out)
    assert [n for n in after if after[n][:2] != before.get(n, (0, 0))[:2]] == ["shard-00002.safetensors"]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["shapes"]["resid.0"].__setitem__(1, 33), "'shapes'"),
    (lambda m: m["shapes"].__setitem__("token_ids", [5]), "'shapes'"),
    (lambda m: m["sites"].__setitem__("resid.0", 33), "'shapes'"),
    (lambda m: m.__setitem__("sites", ["resid.0", "mlp.hidden.1", "final"]), "'sites' should be a non-empty object"),
    (lambda m: m.__setitem__("n_tokens", "123"), "'n_tokens' is '123'"),
    (lambda m: m.__setitem__("shards", {"0": 1}), "'shards' should be a list"),
    (lambda m: m["plan"].__setitem__("n_shards", "5"), "plan.n_shards is '5'"),
    (lambda m: m["plan"].__setitem__("plan_sha256", None), "plan.plan_sha256 is None"),
    (lambda m: m.__setitem__("dtype", "float64"), "'dtype' is 'float64'"),
    (lambda m: m.__setitem__("format_version", True), "format_version"),
    (lambda m: m.__setitem__("model", "llama"), "'model' should be an object"),
    (lambda m: m.__setitem__("positions", {"a": 1}), "'positions'"),
    (lambda m: m["shards"][1].update(token_offset=m["shards"][1]["token_offset"] + 1), "does not follow"),
    (lambda m: m["shards"].__setitem__(1, m["shards"][0]), "listed twice"),
    (lambda m: m["shards"][0].update(index=-1), "index -1"),
    (lambda m: m["shards"][0].update(bytes=10), "bytes cannot hold"),
    (lambda m: m["shards"][0].update(sha256="../../etc"), "not a sha256"),
    (lambda m: m["shards"][0].update(rows="all"), "rows 'all'"),
])
def test_edited_manifest_fields_are_refused(llama, out, edit, message):
    edit_manifest(out, edit)
    before = store_state(out)
    with pytest.raises(ActlabError, match="manifest.json is damaged") as err:
        Store(out)
    assert message in str(err.value) and "\n" not in str(err.value)
    one_line_error(invoke("store", "verify", out), message)
    with pytest.raises(ActlabError, match="manifest.json is damaged"):
        record(llama, DOCS, SITES, out, **PARAMS)
    assert store_state(out) == before  # refused before anything was touched


def test_edits_that_agree_with_each_other_still_disagree_with_the_files(llama, out):
    def narrower(m):  # sites and shapes edited together: the header is consistent, the shards are not
        m["sites"]["resid.0"] = 16
        m["shapes"]["resid.0"][1] = 16

    edit_manifest(out, narrower)
    store = Store(out)
    problems = store.verify(checksums=False)
    assert len(problems) == store.n_shards and all("'resid.0' has shape" in p for p in problems)
    with pytest.raises(ActlabError, match="has shape.*--repair"):
        store["resid.0"][0]
    with pytest.raises(ActlabError, match="sites: store resid.0"):
        record(llama, DOCS, SITES, out, **PARAMS)


def test_a_shard_count_edited_within_range_is_caught_by_its_file(llama, reference, out, tmp_path):
    def edit(m):  # an interrupted store: shard 2 is the last one listed, its count one less
        m["shards"] = m["shards"][:3]
        m["shards"][2]["n_tokens"] -= 1
        m.update(complete=False, n_tokens=sum(s["n_tokens"] for s in m["shards"]))

    edit_manifest(out, edit)
    store = Store(out)
    problems = store.verify(checksums=False)
    assert any("its header says n_tokens" in p for p in problems) and any("has shape" in p for p in problems)
    with pytest.raises(ActlabError, match="cannot read .*shard-00002.*--repair"):
        store["final"][len(store) - 1]
    repaired = tmp_path / "repaired"
    shutil.copytree(out, repaired)
    assert len(repair_store(repaired)) == 1 and Store(repaired).n_shards == 2
    # the resume trusts the plan, not the manifest's numbers: the shard is recorded again
    before = store_state(out)
    for directory in (out, repaired):
        record(llama, DOCS, SITES, directory, **PARAMS)
        assert_same_store(reference, directory)
    after = store_state(out)
    assert "shard-00002.safetensors" in [n for n in after if after[n][:2] != before.get(n, (0, 0))[:2]]


def test_a_wrong_total_is_reported_and_repaired(reference, out):
    edit_manifest(out, lambda m: m.update(n_tokens=m["n_tokens"] + 7))
    held = Store(out).n_tokens
    assert Store(out).verify() == [f"manifest: n_tokens is {held + 7}, the shards hold {held}"]
    before = store_state(out)
    assert len(repair_store(out)) == 1 and Store(out).verify() == []
    assert store_state(out) == before  # only the manifest was rewritten
    assert_same_store(reference, out)


def test_stale_or_foreign_markers_are_ignored(llama, reference, out, tmp_path):
    from actlab.store.manifest import marker_name

    (tmp_path / "secret.json").write_text(json.dumps({"plan_sha256": "x", "shard": {}}))
    edit_manifest(out, lambda m: (m["shards"].pop(), m.update(complete=False, n_tokens=sum(s["n_tokens"] for s in m["shards"]))))
    last = Store(reference).n_shards - 1
    (out / marker_name(last)).symlink_to(tmp_path / "secret.json")
    (out / marker_name(0)).write_text(json.dumps({"plan_sha256": read_json(out / MANIFEST_NAME)["plan"]["plan_sha256"],
                                                  "shard": {"index": 0, "n_tokens": 10**30}}))
    record(llama, DOCS, SITES, out, **PARAMS)
    assert_same_store(reference, out)


# ------------------------------------------------------------------ item 3: verify --repair
@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "header"])
def test_verify_repair_rerecords_just_the_damaged_shard(llama, reference, out, damage):
    target = out / "shard-00002.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[-50] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "header":
        data[12] ^= 0xFF
    target.write_bytes(bytes(data))
    if damage == "missing":
        target.unlink()
    before = store_state(out)
    bad = invoke("store", "verify", out)
    assert bad.exit_code == 1 and "shard-00002.safetensors" in bad.output
    assert "actlab store verify --repair" in bad.output and "re-record just those" in " ".join(bad.output.split())
    repaired = invoke("store", "verify", out, "--repair")
    assert repaired.exit_code == 0 and "repaired: shard-00002.safetensors" in repaired.output
    assert "rerun the same `actlab record" in " ".join(repaired.output.split())
    assert not target.exists() and Store(out).n_shards == Store(reference).n_shards - 1
    assert "nothing to repair" in " ".join(invoke("store", "verify", out, "--repair").output.split())
    record(llama, DOCS, SITES, out, **PARAMS)
    assert_same_store(reference, out)
    after = store_state(out)
    assert [n for n in after if after[n][:2] != before.get(n, (0, 0))[:2]] == ["shard-00002.safetensors"]
    assert invoke("store", "verify", out).exit_code == 0


def test_repair_refuses_a_damaged_header_and_touches_nothing(out):
    edit_manifest(out, lambda m: m["sites"].update({"resid.0": "wide"}))
    before = store_state(out)
    with pytest.raises(ActlabError, match="overwrite"):
        repair_store(out)
    one_line_error(invoke("store", "verify", out, "--repair"), "is damaged", "--overwrite")
    assert store_state(out) == before


# ------------------------------------------------------------------ item 2 (files): interventions
@pytest.fixture()
def vector_file(tmp_path) -> Path:
    vector = SteeringVector(site="resid.1", vector=torch.linspace(-1, 1, 32), model={"model_name": "m"})
    return vector.save(tmp_path / "v.safetensors")


def _set_header(key, value):
    def edit(meta):
        headers = json.loads(meta["interventions"])
        if value is KeyError:
            del headers[0][key]
        else:
            headers[0][key] = value
        meta["interventions"] = json.dumps(headers)
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda meta: meta.pop("interventions"), "its header has no 'interventions' field"),
    (lambda meta: meta.update(interventions="[{"), "'interventions' header field is not valid JSON"),
    (lambda meta: meta.update(interventions='{"kind": 1}'), "'interventions' should be a list"),
    (lambda meta: meta.update(interventions="[3]"), "interventions[0] should be an object"),
    (_set_header("site", KeyError), "interventions[0] has no 'site'"),
    (_set_header("site", 3), "interventions[0].site should be a string"),
    (_set_header("coef", "4"), "interventions[0].coef should be an integer or a number"),
    (_set_header("coef", True), "interventions[0].coef should be"),
    (_set_header("params", []), "interventions[0].params should be an object"),
    (_set_header("positions", "everywhere"), "positions must be one of"),
    (lambda meta: meta.update(format_version="x"), "format_version"),
])
def test_intervention_headers_are_checked(vector_file, edit, message):
    original = vector_file.read_bytes()
    for checksum in ("recompute", "drop"):  # with a matching checksum, and as a file from before checksums
        vector_file.write_bytes(original)
        rewrite_tensors(vector_file, metadata=edit, checksum=checksum)
        with pytest.raises(ActlabError, match="intervention file .* is damaged") as err:
            load_interventions(vector_file)
        assert message in str(err.value) and "re-create it" in str(err.value)


def test_intervention_files_carry_a_checksum(vector_file, tmp_path):
    original = load_interventions(vector_file)
    with open_tensors(vector_file) as f:
        assert f.metadata()["checksum"].startswith("sha256:")
    rewrite_tensors(vector_file, tensors=lambda t: t.update({"0/vector": t["0/vector"] * 2}), checksum="keep")
    with pytest.raises(ActlabError, match=r"intervention file '.*v.safetensors' is damaged \(checksum mismatch\): re-create it"):
        load_interventions(vector_file)
    data = bytearray(vector_file.read_bytes())
    data[-3] ^= 0x10  # a flipped bit in the tensor data
    vector_file.write_bytes(bytes(data))
    with pytest.raises(ActlabError, match="checksum mismatch"):
        load_interventions(vector_file)
    # a file from before the checksum existed still loads, and is the same intervention
    old = tmp_path / "old.safetensors"
    SteeringVector(site="resid.1", vector=original.vector, model={"model_name": "m"}).save(old)
    rewrite_tensors(old, checksum="drop")
    with open_tensors(old) as f:
        assert "checksum" not in f.metadata()
    assert torch.equal(load_interventions(old).vector, original.vector)


@pytest.mark.parametrize("case, message", [
    ("empty", "holds no intervention (its list is empty)"),
    ("unknown kind", "unknown kind 'telepathy'"),
    ("missing tensor", "a steering vector must be a 1-D tensor"),
    ("extra tensor", "tensors no intervention uses (0/secret)"),
    ("shapes disagree", "does not fit its tensors"),
    ("negative neuron", "negative or boolean entries"),
    ("neuron out of range", "does not fit its tensors"),
])
def test_intervention_contents_are_checked(tmp_path, case, message):
    path = tmp_path / "i.safetensors"
    if case in ("shapes disagree",):
        AffineMap(site="resid.0", bias=torch.zeros(8), diag=torch.ones(8)).save(path)
        rewrite_tensors(path, tensors=lambda t: t.update({"0/diag": torch.ones(5)}))
    elif case in ("negative neuron", "neuron out of range"):
        NeuronClamp(site="mlp.hidden.0", neurons=torch.tensor([1, 2]), values=torch.zeros(2), params={"site_width": 48}).save(path)
        bad = torch.tensor([-1, 2]) if case == "negative neuron" else torch.tensor([1, 99])
        rewrite_tensors(path, tensors=lambda t: t.update({"0/neurons": bad}))
    else:
        SteeringVector(site="resid.0", vector=torch.ones(8)).save(path)
        rewrite_tensors(path, **{
            "empty": dict(metadata=lambda m: m.update(interventions="[]"), tensors=lambda t: t.clear()),
            "unknown kind": dict(metadata=_set_header("kind", "telepathy")),
            "missing tensor": dict(tensors=lambda t: t.clear()),
            "extra tensor": dict(tensors=lambda t: t.update({"0/secret": torch.ones(2)})),
        }[case])
    with pytest.raises(ActlabError) as err:
        load_interventions(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_empty_composition_is_not_saved(tmp_path):
    with pytest.raises(ActlabError, match="holds no intervention"):
        Composition([]).save(tmp_path / "none.safetensors")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ profiles, converters, stats
@pytest.fixture(scope="module")
def profiles(llama):
    prompts = [f"prompt {i} {'xy' * (i % 4)}" for i in range(12)]
    return profile_model(llama, prompts), profile_model(tiny_model("gpt2"), prompts)


@pytest.mark.parametrize("edit, message", [
    (dict(metadata=lambda m: m.pop("prompts")), "no 'prompts' field"),
    (dict(metadata=lambda m: m.update(prompts='["other"]')), "do not match their hash"),
    (dict(metadata=lambda m: m.update(model="[1]")), "'model' should be an object"),
    (dict(metadata=lambda m: m.update(positions="some")), "'positions' should be 'last' or 'all'"),
    (dict(tensors=lambda t: t.pop("row_prompt")), "no int64 'row_prompt'"),
    (dict(tensors=lambda t: t.update({"resid.x": torch.ones(1)})), "should be resid.0 .. resid.N"),
    (dict(tensors=lambda t: t.update({"resid.1": t["resid.1"][:, :5].contiguous()})), "resid.1 should be a float tensor"),
    (dict(tensors=lambda t: t.update({"row_prompt": t["row_prompt"] + 100})), "'row_prompt' should hold prompt indices"),
])
def test_profile_files_are_checked_and_a_bad_cache_entry_is_recomputed(llama, profiles, tmp_path, edit, message):
    profile = profiles[0]
    path = profile.save(tmp_path / "p.safetensors")
    rewrite_tensors(path, **edit)
    with pytest.raises(ActlabError, match="activation profile file .* is damaged") as err:
        ActivationProfile.load(path)
    assert message in str(err.value)
    # the same file as a cache entry: recomputed and replaced, not an error
    key = f"{llama.config_hash}-{llama.weights_hash}-{profile.prompts_hash}-last"
    cache = tmp_path / "cache" / "profiles" / f"{key}.safetensors"
    cache.parent.mkdir(parents=True)
    shutil.copy(path, cache)
    again = cached_profile(llama, profile.prompts, cache_dir=tmp_path / "cache")
    assert all(torch.equal(again.acts[i], profile.acts[i]) for i in profile.acts)
    assert ActivationProfile.load(cache).prompts == profile.prompts


@pytest.mark.parametrize("edit, message", [
    (dict(metadata=lambda m: m.update(layer_map='{"a": 1}')), "layer_map entry 'a'"),
    (dict(metadata=lambda m: m.update(layer_map="{}")), "its layer_map is empty"),
    (dict(metadata=lambda m: m.update(fits="{}")), "fits['to_donor.0'] should be an object"),
    (dict(metadata=lambda m: m.pop("donor")), "no 'donor' field"),
    (dict(metadata=lambda m: m.update(fit_seconds="soon")), "fit_seconds is not a number"),
    (dict(tensors=lambda t: t.update({"to_donor.0.weight": t["to_donor.0.weight"][:3].contiguous()})), "shapes of 'to_donor.0' disagree"),
    (dict(tensors=lambda t: t.pop("to_recipient.0.y_mean")), "'to_recipient.0.y_mean' is missing"),
])
def test_converter_files_are_checked(profiles, tmp_path, edit, message):
    path = fit_converters(*profiles).save(tmp_path / "c.safetensors")
    assert ConverterSet.load(path).layer_map
    rewrite_tensors(path, **edit)
    with pytest.raises(ActlabError, match="converter file .* is damaged") as err:
        ConverterSet.load(path)
    assert message in str(err.value)


def test_a_stats_width_is_checked_before_anything_of_that_size_is_allocated(tmp_path):
    from actlab.engine.batch import TokenBatch

    sink = StatsSink({"a": 6})
    sink.consume(TokenBatch(acts={"a": torch.randn(10, 6)}, token_ids=torch.arange(10),
                            doc_ids=torch.zeros(10, dtype=torch.long), positions=torch.arange(10)))
    path = sink.save(tmp_path / "s.safetensors")

    def widen(meta):
        header = json.loads(meta["actlab"])
        header["sites"]["a"] = 2**30
        header.pop("checksum", None)  # as a file written before stats carried a checksum
        meta["actlab"] = json.dumps(header)

    rewrite_tensors(path, metadata=widen, checksum="keep")
    tracemalloc.start()
    with pytest.raises(ActlabError, match="site 'a' has width 1073741824 in the header but a mean of shape"):
        StatsSink.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20


def test_the_cli_round_trip_record_damage_repair_record(tmp_path):
    from actlab.models.loading import zoo_models

    if "demo-llama" not in zoo_models():
        pytest.skip("demo models absent")
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(12)) + "\n")
    command = ["record", "demo-llama", "--data", data, "--sites", "resid.0", "--shard-tokens", "40", "--out"]
    assert invoke(*command, tmp_path / "ref").exit_code == 0
    out = tmp_path / "store"
    shutil.copytree(tmp_path / "ref", out)
    assert Store(out).n_shards >= 3
    target = out / "shard-00001.safetensors"
    target.write_bytes(target.read_bytes()[:-7] + b"garbage")
    before = store_state(out)
    bad = invoke("store", "verify", out)
    assert bad.exit_code == 1 and "checksum mismatch" in bad.output and "--repair" in bad.output
    assert invoke("store", "verify", out, "--repair").exit_code == 0
    assert invoke(*command, out).exit_code == 0  # the same command re-records just that shard
    after = store_state(out)
    assert [n for n in after if after[n][:2] != before.get(n, (0, 0))[:2]] == ["shard-00001.safetensors"]
    assert_same_store(tmp_path / "ref", out)
    assert invoke("store", "verify", out).exit_code == 0
