"""The HTML report: self-contained, summary first, and every figure decodes in a real browser."""

import shutil
import subprocess
from dataclasses import dataclass

import matplotlib.pyplot as plt
import pytest

from actlab.analyses.base import Skipped
from actlab.report.html import write_report


@dataclass
class _Result:
    key: str = "demo"
    title: str = "A demo analysis"
    explanation: str = "What it measures."

    def headline(self):
        return "42 %"

    def to_dict(self):
        return {"x": 1}

    def figures(self):
        figs = []
        for k in range(2):
            fig, ax = plt.subplots(figsize=(3, 2))
            ax.plot([0, 1], [k, 1 - k])
            figs.append(fig)
        return figs

    def table(self):
        return ["layer", "value"], [[0, 0.5], [1, 0.25]]


def test_report_has_summary_sections_and_embedded_figures(tmp_path):
    path = write_report(tmp_path / "r.html", "Profile", "demo-llama", [_Result(), Skipped("lens", "Lenses", "no LM head")])
    page = path.read_text()
    assert page.index("Summary") < page.index("A demo analysis") < page.index("Lenses")
    assert page.count("data:image/png;base64,") == 2 and "Skipped: no LM head" in page
    assert "http://" not in page and "https://" not in page  # opens offline


def chromium_binary():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def loaded_images(path) -> str:
    """Load the page in headless Chromium and read the count of decoded images the page's script wrote."""
    cmd = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={path.parent / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom",
           path.resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    marker = 'data-images-loaded="'
    assert marker in dom, "the page's load script did not run"
    return dom.split(marker, 1)[1].split('"', 1)[0]


@pytest.mark.skipif(chromium_binary() is None, reason="Chromium is not installed (make test installs Debian's chromium when root)")
def test_every_figure_loads_in_chromium(tmp_path):
    path = write_report(tmp_path / "r.html", "Profile", "demo", [_Result(), _Result(key="other")])
    assert loaded_images(path) == "4/4"
