"""The kill -9 soak: a recording killed at seeded random moments, several of them mid-write, then
resumed, ends byte-identical to an uninterrupted run, verifies clean and leaves nothing behind.

One helper process imports torch and builds the model once, then forks a fresh recorder for each
run (so six kills cost one interpreter start). Before forking it slows the writes down so a kill
can land inside them: every safetensors file is written in two halves with a pause between (a
kill there leaves a half-written temp file), and every rename of a temp file (shard, marker,
manifest) pauses first. The recorder logs each of those moments to an events file; the test waits
for the moment a kill is aimed at, plus a random fraction of the pause, and sends SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actlab.cli import app
from actlab.store import MANIFEST_NAME, Store, record
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SITES = ["resid.0", "mlp.hidden.1", "final"]
PARAMS = dict(shard_tokens=40, batch_size=2)
PAUSE = 0.12  # seconds each half-written file and each pending rename is held
SEED = 1111
# what each kill aims at: a half-written shard file, a pending rename (of the manifest, a shard file, a
# completion marker), or just a random moment after the recorder starts (in a forward, a write, anywhere)
KILLS = ["half", "rename:manifest", "time", "rename:.safetensors", "rename:.done", "time"]

_HELPER = r"""
import json, os, sys, time
args = json.load(open(sys.argv[1]))
PAUSE = args["pause"]

def event(kind, detail=""):
    with open(args["events"], "a") as f:
        f.write(f"{os.getpid()} {kind} {detail}\n")

import safetensors.torch as st  # patched before actlab imports it
_save = st.save

def save_file_in_halves(tensors, filename, metadata=None):
    data = _save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        event("half", os.path.basename(filename))
        time.sleep(PAUSE)
        f.write(data[len(data) // 2 :])

st.save_file = save_file_in_halves
_replace = os.replace

def slow_replace(src, dst, *a, **k):
    if str(src).endswith(".tmp"):
        event("rename", os.path.basename(str(dst)))
        time.sleep(PAUSE)
    return _replace(src, dst, *a, **k)

os.replace = slow_replace

import torch
torch.set_num_threads(1)
from tiny_models import tiny_model
from actlab.store import record

model = tiny_model("llama")
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() != "run":
        break
    pid = os.fork()
    if pid == 0:
        try:
            event("start")
            record(model, args["docs"], args["sites"], args["out"], **args["params"])
            event("finished")
        finally:
            os._exit(0)
    print("pid", pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("status", status, flush=True)
"""


def make_docs(n: int = 60) -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta"]
    return [" ".join(words[(i * 3 + j) % len(words)] for j in range(1 + (i * 7) % 19)) for i in range(n)]


class Helper:
    """The forking helper process: ``run()`` starts a recorder and returns its pid, ``status()`` its end."""

    def __init__(self, args_path: Path, log: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), HF_HUB_OFFLINE="1")
        self.log = log
        self._err = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", _HELPER, str(args_path)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err)
        self._buf = b""
        self.recorder: int | None = None  # the pid of a recorder not yet reaped
        assert self._line(120) == "ready"

    def _line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"the helper went silent:\n{self.log.read_text()[-2000:]}"
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            assert chunk, f"the helper died:\n{self.log.read_text()[-2000:]}"
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode().strip()

    def run(self) -> int:
        self.proc.stdin.write(b"run\n")
        self.proc.stdin.flush()
        kind, pid = self._line(30).split()
        assert kind == "pid"
        self.recorder = int(pid)
        return self.recorder

    def status(self) -> int:
        kind, status = self._line(60).split()
        assert kind == "status"
        self.recorder = None
        return int(status)

    def close(self) -> None:
        if self.recorder is not None:  # a failed check left a recorder running: stop it
            try:
                os.kill(self.recorder, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._err.close()


def wait_for(events: Path, pid: int, aim: str, nth: int, deadline: float) -> None:
    """Until recorder ``pid`` has logged its ``nth`` event of kind ``aim`` ("half", "rename:shard", ...)."""
    kind, _, target = aim.partition(":")
    while time.monotonic() < deadline:
        seen = 0
        for line in events.read_text().splitlines() if events.exists() else []:
            parts = line.split() + [""]
            if parts[0] == str(pid) and parts[1] == kind and target in parts[2]:
                seen += 1
        if seen >= nth:
            return
        time.sleep(0.005)
    raise AssertionError(f"recorder {pid} never reached {aim} #{nth}:\n{events.read_text()[-2000:]}")


def leftovers(directory: Path) -> list[str]:
    """Names that are neither the manifest nor a shard file: temp files, completion markers."""
    return sorted(p.name for p in directory.iterdir()
                  if p.name != MANIFEST_NAME and not (p.name.startswith("shard-") and p.suffix == ".safetensors"))


def manifest_wo_stamps(directory: Path) -> dict:
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    return {k: v for k, v in manifest.items() if k not in ("created", "updated")}


@pytest.mark.slow
def test_kill9_soak_resumes_to_identical_store(tmp_path):
    model = tiny_model("llama")
    docs = make_docs()
    ref = tmp_path / "ref"
    record(model, docs, SITES, ref, **PARAMS)
    n_shards = Store(ref).n_shards
    assert n_shards >= 20

    out, events = tmp_path / "killed", tmp_path / "events.log"
    args = tmp_path / "args.json"
    args.write_text(json.dumps(dict(docs=docs, sites=SITES, out=str(out), params=PARAMS, pause=PAUSE,
                                    events=str(events))))
    rng = random.Random(SEED)
    helper = Helper(args, tmp_path / "helper.log")
    debris = []
    try:
        for aim in KILLS:
            pid = helper.run()
            if aim == "time":
                wait_for(events, pid, "start", 1, time.monotonic() + 60)
                time.sleep(rng.uniform(0.05, 1.5))
            else:
                wait_for(events, pid, aim, rng.randint(1, 3), time.monotonic() + 60)
                time.sleep(rng.uniform(0.0, 0.8 * PAUSE))  # inside the pause: the write is in flight
            os.kill(pid, signal.SIGKILL)
            status = helper.status()
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
                f"recorder {pid} ended before its kill ({aim}): status {status}"
            debris.append(leftovers(out))
    finally:
        helper.close()

    assert any(name.endswith(".tmp") for left in debris for name in left), "some kill left a half-written temp file"
    partial = Store(out)
    assert not partial.complete and 0 < partial.n_shards < n_shards, "the kills fell part-way through the recording"

    store = record(model, docs, SITES, out, **PARAMS)  # the last resume, uninterrupted
    assert store.complete and store.verify() == []
    assert manifest_wo_stamps(out) == manifest_wo_stamps(ref)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in ref.iterdir()) and leftovers(out) == []
    for name in names:
        if name != MANIFEST_NAME:
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    result = CliRunner().invoke(app, ["store", "verify", str(out)], catch_exceptions=False)
    assert result.exit_code == 0 and "✓" in result.output and "✗" not in result.output, result.output
