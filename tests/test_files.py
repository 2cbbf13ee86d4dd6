"""actlab.files: the one safetensors writer / reader and the one JSON serialiser.

The files it writes are byte-identical to what the store, the stats sink and the genre classifier
wrote with safetensors directly, so files made before it still load and reruns stay identical.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import actlab.report.serialize as serialize
from actlab.engine.batch import TokenBatch
from actlab.errors import ActlabError
from actlab.evals.genre import GenreClassifier
from actlab.files import load_tensors, open_tensors, save_tensors, to_jsonable, write_json
from actlab.stats import StatsSink
from actlab.store import Store, record
from tiny_models import tiny_model


def metadata_of(path: Path) -> dict[str, str]:
    with open_tensors(path) as f:
        return f.metadata() or {}


def rewritten_directly(path: Path, tmp_path: Path) -> bytes:
    """The bytes safetensors' own writer gives for the tensors and metadata read back from ``path``."""
    direct = tmp_path / ("direct-" + path.name)
    save_file(load_file(str(path)), str(direct), metadata=metadata_of(path))
    return direct.read_bytes()


def test_raw_metadata_writes_what_safetensors_writes(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.int64), "a": torch.randn(3, 4, generator=torch.Generator().manual_seed(0))}
    ours = save_tensors(tmp_path / "x.safetensors", tensors, None, {"key": "value"})
    save_file(tensors, str(tmp_path / "y.safetensors"), metadata={"key": "value"})
    assert ours.read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    assert metadata_of(ours) == {"key": "value"}  # no format tag added
    tagged = save_tensors(tmp_path / "t.safetensors", tensors, "kind", {"k": "v"}, durable=True)
    loaded, meta = load_tensors(tagged, "kind", "test")
    assert meta["format"] == "kind" and meta["k"] == "v" and "actlab_version" in meta
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with pytest.raises(ActlabError, match="not an actlab other file"):
        load_tensors(tagged, "elsewhere", "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors", "x.safetensors", "y.safetensors"]


def test_a_failed_write_leaves_no_file_and_no_temp(tmp_path, monkeypatch):
    import actlab.files

    target = save_tensors(tmp_path / "keep.safetensors", {"a": torch.ones(2)}, None, {})
    before = target.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("no space left")

    monkeypatch.setattr(actlab.files, "save_file", broken)
    with pytest.raises(OSError):
        save_tensors(target, {"a": torch.zeros(2)}, None, {}, tmp=tmp_path / ".keep.tmp")
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


def test_store_shards_are_what_safetensors_writes(tmp_path):
    store = record(tiny_model("llama"), [[5, 6, 7, 8, 9, 10], [11, 12, 13]], ["resid.0", "final"], tmp_path / "s",
                   shard_tokens=4, dtype="float16")
    assert store.n_shards == 2
    for path in store.shard_paths():
        assert path.read_bytes() == rewritten_directly(path, tmp_path)
        assert list(metadata_of(path)) == ["actlab-store"]  # one metadata key, so reruns are byte-identical
    manifest = (tmp_path / "s" / "manifest.json").read_text()
    assert manifest == json.dumps(json.loads(manifest), indent=2) + "\n"  # the JSON layout of before


def test_stats_files_are_what_safetensors_writes_and_old_ones_load(tmp_path):
    sink = StatsSink({"a": 6}, topk=3)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    sink.consume(TokenBatch(acts={"a": x}, token_ids=torch.arange(40), doc_ids=torch.zeros(40, dtype=torch.long),
                            positions=torch.arange(40)))
    path = sink.save(tmp_path / "stats.safetensors", metadata={"model": "m"})
    assert path.read_bytes() == rewritten_directly(path, tmp_path)
    # a file written the old way (safetensors directly) loads
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=metadata_of(path))
    assert StatsSink.load(old).summary() == sink.summary()


def test_genre_classifier_files_are_unchanged(tmp_path):
    from safetensors.numpy import load_file as load_numpy
    from safetensors.numpy import save_file as save_numpy

    clf = GenreClassifier.load()
    clf.save(tmp_path / "clf")
    weights = tmp_path / "clf" / "weights.safetensors"
    # what the numpy writer made before
    save_numpy({"log_prob": clf.log_prob.astype(np.float16), "log_prior": clf.log_prior.astype(np.float32)},
               str(tmp_path / "numpy.safetensors"), metadata={"format": "actlab-genre-nb-v1"})
    assert weights.read_bytes() == (tmp_path / "numpy.safetensors").read_bytes()
    assert (weights.stat().st_mode & 0o777) == 0o644
    cfg = (tmp_path / "clf" / "config.json").read_text()
    assert json.loads(cfg)["genres"] == clf.genres and cfg == json.dumps(json.loads(cfg), indent=2) + "\n"
    again = GenreClassifier.load(tmp_path / "clf")
    assert np.array_equal(again.log_prob, load_numpy(str(weights))["log_prob"].astype(np.float32))
    texts = ["And the LORD spake unto Moses, saying,", "def f(x):\n    return x"]
    assert again.predict(texts) == clf.predict(texts)


def test_json_is_plain_and_written_atomically(tmp_path):
    data = {"nan": math.nan, "inf": float("inf"), "t": torch.tensor([1.5, 2.0]), "n": np.float32(0.25),
            "i": np.int64(3), "b": np.bool_(True), "tuple": (1, 2), 7: "seven", "obj": Path("p")}
    path = write_json(tmp_path / "out" / "r.json", data)
    assert json.loads(path.read_text()) == {
        "nan": None, "inf": None, "t": [1.5, 2.0], "n": 0.25, "i": 3, "b": True, "tuple": [1, 2], "7": "seven", "obj": "p",
    }
    assert path.read_text() == json.dumps(to_jsonable(data), indent=2) + "\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temp file left
    write_json(path, {"x": 1}, indent=None, tmp=tmp_path / "out" / ".r.tmp", durable=True)
    assert path.read_text() == '{"x": 1}\n' and sorted(p.name for p in path.parent.iterdir()) == ["r.json"]
    with pytest.raises(TypeError):
        write_json(path, {"x": 1}, indent=object())  # a failed write keeps the old file and no temp
    assert path.read_text() == '{"x": 1}\n' and sorted(p.name for p in path.parent.iterdir()) == ["r.json"]
    # one serialiser: the report module re-exports it
    assert serialize.to_jsonable is to_jsonable and serialize.write_json is write_json


def test_the_store_reads_through_open_tensors(tmp_path):
    store = record(tiny_model("llama"), [[5, 6, 7, 8, 9, 10]], "resid.0", tmp_path / "s")
    with open_tensors(store.shard_paths()[0]) as f:
        assert set(f.keys()) == {"resid.0", "token_ids", "doc_ids", "positions"}
        assert torch.equal(f.get_tensor("resid.0"), Store(tmp_path / "s")["resid.0"][:])


def test_stats_files_carry_a_checksum_that_load_checks(tmp_path):
    """A stats file is a user file too: its header holds the content checksum, a flipped value is
    refused on load, and a file without the checksum (written before it existed) still loads."""
    from actlab.errors import ActlabError
    from actlab.files import CHECKSUM_KEY

    sink = StatsSink({"a": 4}, topk=2)
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(2))
    sink.consume(TokenBatch(acts={"a": x}, token_ids=torch.arange(30), doc_ids=torch.zeros(30, dtype=torch.long),
                            positions=torch.arange(30)))
    path = sink.save(tmp_path / "stats.safetensors")
    meta = metadata_of(path)
    assert json.loads(meta["actlab"])[CHECKSUM_KEY].startswith("sha256:")
    tensors = load_file(str(path))
    name = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata=meta)
    with pytest.raises(ActlabError, match="checksum mismatch"):
        StatsSink.load(damaged)
    legacy = tmp_path / "legacy.safetensors"
    header = json.loads(meta["actlab"])
    del header[CHECKSUM_KEY]
    save_file(load_file(str(path)), str(legacy), metadata={"actlab": json.dumps(header, sort_keys=True)})
    assert StatsSink.load(legacy).summary() == sink.summary()
