"""A static, self-contained HTML report: summary table, then one section per analysis.

Figures are embedded as base64 PNG so the single file opens offline anywhere. A tiny inline
script counts the images that decoded and writes the count into ``data-images-loaded`` on
<body>, so a headless browser test can check that every figure rendered.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1.2em;
color:#1d2330;line-height:1.5;background:#fbfbfd}
h1{font-size:1.8em;margin-bottom:.1em}h2{border-bottom:2px solid #e4e7ef;padding-bottom:.2em;margin-top:2.2em}
.sub{color:#5b6478;margin-top:0}
table{border-collapse:collapse;margin:1em 0;font-size:.92em;background:white}
th,td{border:1px solid #e4e7ef;padding:.35em .7em;text-align:left;vertical-align:top}
th{background:#f1f3f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.explain{background:#f4f7fb;border-left:4px solid #5b8def;padding:.6em 1em;margin:1em 0}
.skip{background:#fff7e6;border-left:4px solid #f0a020;padding:.6em 1em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #e4e7ef;background:white}
nav a{margin-right:1em}code{background:#eef1f6;padding:0 .25em;border-radius:3px}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
"""


def figure_to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
        return f'<td class="num">{html.escape(text)}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value:,}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def render_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_section(result) -> str:
    key = html.escape(getattr(result, "key", "analysis"))
    parts = [f'<section id="{key}"><h2>{html.escape(result.title)}</h2>']
    reason = getattr(result, "reason", None)
    if reason is not None and result.headline() == "skipped":
        parts.append(f'<p class="skip">Skipped: {html.escape(reason)}</p>')
    if getattr(result, "explanation", ""):
        parts.append(f'<div class="explain">{html.escape(result.explanation)}</div>')
    for fig in result.figures() or []:
        parts.append(f'<figure><img alt="{key} figure" src="{figure_to_data_uri(fig)}"></figure>')
    table = result.table()
    if table:
        parts.append(render_table(*table))
    parts.append("</section>")
    return "\n".join(parts)


def render_report(title: str, subtitle: str, results: Sequence, extra_sections: Sequence[str] = ()) -> str:
    """The whole page: summary of headlines first, then each analysis."""
    summary_rows = [[r.title, r.headline()] for r in results]
    nav = " ".join(f'<a href="#{html.escape(r.key)}">{html.escape(r.key)}</a>' for r in results)
    sections = "\n".join(render_section(r) for r in results)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style><script>{SCRIPT}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='sub'>{html.escape(subtitle)}</p><nav>{nav}</nav>"
        f"<h2 id='summary'>Summary</h2>{render_table(['analysis', 'headline'], summary_rows)}"
        f"{sections}{''.join(extra_sections)}</body></html>"
    )


def write_report(path: str | Path, title: str, subtitle: str, results: Sequence, extra_sections: Sequence[str] = ()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(title, subtitle, results, extra_sections), encoding="utf-8")
    return path


def write_json(path: str | Path, data: dict) -> Path:
    from actlab.report.serialize import write_json as _write

    return _write(path, data, indent=1)
