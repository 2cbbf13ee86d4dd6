"""`actlab profile` on 2 torchrun ranks writes the very files the one-process command writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dist_helpers import torchrun_cli
from test_dist_stats import _docs

ANALYSES = "sparsity,dead,massive,lenses,linearity"  # the ones that read the stats and the reservoir (fast)


def _json_without_timings(path: Path) -> dict:
    """profile.json less the wall-clock fields (two one-process runs differ in those alone)."""
    data = json.loads(path.read_text())
    data["meta"].pop("seconds")
    data["meta"].pop("timings")
    return data


def _html_without_seconds(path: Path) -> str:
    return re.sub(r"(reservoir [\d,]+ tokens · )[\d,]+ s<", r"\1<", path.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_cli_profile_under_torchrun(tmp_path):
    from actlab.cli import app
    from typer.testing import CliRunner

    data = tmp_path / "docs.txt"
    data.write_text("\n".join(_docs()) + "\n")
    args = ["profile", "demo-gpt2", "--data", str(data), "--batch-size", "2", "--reservoir", "64",
            "--analyses", ANALYSES]
    alone = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "one")], catch_exceptions=False)
    assert alone.exit_code == 0, alone.output
    done = torchrun_cli([*args, "-o", str(tmp_path / "two")], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("report:") == 1  # rank 0 alone reports (and writes)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["profile.json", "report.html"]
    one, two = _json_without_timings(tmp_path / "one" / "profile.json"), _json_without_timings(tmp_path / "two" / "profile.json")
    assert one["meta"]["n_tokens"] == two["meta"]["n_tokens"] > 0
    assert one == two
    assert _html_without_seconds(tmp_path / "one" / "report.html") == _html_without_seconds(tmp_path / "two" / "report.html")
