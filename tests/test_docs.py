"""The README's quickstarts really run (Python block and CLI block), offline, on the demo models."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from actlab.models.loading import zoo_models

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
pytestmark = [pytest.mark.slow, pytest.mark.skipif("demo-llama" not in zoo_models(), reason="demo models absent")]


def _block(lang: str, after: str) -> str:
    section = README[README.index(after):]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    return match.group(1)


def test_python_quickstart_runs(tmp_path):
    code = _block("python", "## Python quickstart")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == "256 688"


def test_cli_quickstart_runs(tmp_path):
    actlab_bin = Path(sys.executable).with_name("actlab")
    for line in _block("bash", "## CLI quickstart").strip().splitlines():
        command = shlex.split(line.split("#")[0])
        assert command[0] == "actlab"
        result = subprocess.run([str(actlab_bin), *command[1:]], cwd=tmp_path, capture_output=True, text=True,
                                timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, (line, result.stdout[-1500:], result.stderr[-1500:])
