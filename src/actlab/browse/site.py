"""Write the browser as a static site: a few fixed pages and a script, plus small data files.

Layout (``DIR/``)::

    index.html, unit.html, app.js, style.css   the pages and their one script (from browse/static/)
    data/meta.json                              what was browsed, how, and the config (plain JSON, for tools)
    data/index.js                               one row per unit: id, density, max, mean, top tokens, top logits
    data/search.js                              the text around each unit's top contexts (the index loads it on the first search)
    data/vocab.js                               the decoded vocabulary (token ids in the data files refer to it)
    units/u{id}.js                              one unit: histogram, logit table, top contexts, interval samples

Why ``.js`` and not ``.json``: a page opened from disk (file://) may not ``fetch`` files, but it may load
scripts, so every data file is a script that hands its object to ``actlabBrowse``; the same files work
when served. A unit's page loads only its own file (and the shared vocabulary), never the others'.
The site is written into a temporary folder next to ``DIR`` and renamed into place, so an interrupted
build never leaves a half-written browser.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from actlab.browse.collect import UnitData
from actlab.browse.kept import Kept
from actlab.files import write_json

__all__ = ["write_site", "MARKER", "unit_record"]

MARKER = "data/meta.json"
STATIC = Path(__file__).with_name("static")
SEARCH_RADIUS = 8  # tokens each side of a top context's token that the text search sees


def _js(path: Path, call: str, data) -> None:
    path.write_text(f"actlabBrowse.{call}({json.dumps(data, separators=(',', ':'))});\n", encoding="utf-8")


def _decimals(scale: float) -> int:
    """Decimals that keep ~3 significant digits of values up to ``scale``."""
    return int(max(0, min(8, 3 - np.floor(np.log10(max(abs(scale), 1e-8))))))


def _contexts(kept: Kept, group: int, decimals: int, window_before: int) -> list[list]:
    """The kept entries of one group as ``[value, doc, pos, center, token ids, activations]``, best first."""
    out = []
    for slot in range(kept.cap):
        if kept.row[group, slot] < 0:
            continue
        tok, act = kept.win_tok[group, slot], kept.win_act[group, slot]
        valid = tok >= 0
        center = int(valid[:window_before].sum())
        out.append([round(float(kept.value[group, slot]), decimals), int(kept.doc[group, slot]),
                    int(kept.pos[group, slot]), center, tok[valid].tolist(),
                    np.round(act[valid].astype(np.float64), decimals).tolist()])
    return out


def unit_record(data: UnitData, i: int, logits: dict | None) -> dict:
    """The page data of the unit at index ``i`` of ``data.units``."""
    c = data.config
    top_value = float(data.max[i]) if np.isfinite(data.max[i]) else 0.0
    d = _decimals(top_value)
    width = float(data.bin_width[i])
    per = c.bins // c.intervals
    intervals = []
    for j in range(c.intervals):
        count = int(data.counts[i, j * per:(j + 1) * per].sum())
        if count:
            intervals.append({"lo": j * per * width, "hi": (j + 1) * per * width, "count": count,
                              "samples": _contexts(data.samples, i * c.intervals + j, d, c.window_before)})
    record = {
        "id": int(data.units[i]), "n_tokens": int(data.n_tokens), "n_fire": int(data.n_fire[i]),
        "density": float(data.density[i]), "max": top_value,
        "mean": float(data.total[i] / data.n_fire[i]) if data.n_fire[i] else 0.0,
        "hist": {"width": width, "counts": data.counts[i].tolist(), "below": int(data.n_tokens - data.n_fire[i])},
        "top": _contexts(data.top, i, d, c.window_before), "intervals": intervals, "logits": None,
    }
    if logits is not None:
        record["logits"] = {side: [[int(t), round(float(v), 4)] for t, v in
                                   zip(logits[f"{side}_ids"][i], logits[f"{side}_values"][i])]
                            for side in ("top", "bottom")}
    return record


def _search_text(record: dict, vocab: list[str]) -> str:
    pieces = []
    for ctx in record["top"]:
        center, toks = ctx[3], ctx[4]
        pieces.append("".join(vocab[t] for t in toks[max(0, center - SEARCH_RADIUS):center + SEARCH_RADIUS + 1]))
    return " \u2016 ".join(pieces)


def write_site(out: str | os.PathLike, data: UnitData, meta: dict, vocab: list[str], logits: dict | None,
               *, progress=None) -> Path:
    """Write the site for ``data`` into ``out`` (replacing a browser there) and return ``out/index.html``.
    ``progress``: an object with ``advance()``, called once per unit written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name in ("index.html", "unit.html", "app.js", "style.css"):
            shutil.copyfile(STATIC / name, tmp / name)
        (tmp / "data").mkdir()
        (tmp / "units").mkdir()
        rows, search = [], []
        ids = [int(u) for u in data.units]
        for i in range(len(ids)):
            record = unit_record(data, i, logits)
            record["prev"], record["next"] = (ids[i - 1] if i else None), (ids[i + 1] if i + 1 < len(ids) else None)
            _js(tmp / "units" / f"u{record['id']}.js", "unit", record)
            seen = list(dict.fromkeys(ctx[4][ctx[3]] for ctx in record["top"]))[:5]
            top_logits = [t for t, _ in record["logits"]["top"][:5]] if record["logits"] else []
            rows.append([record["id"], record["density"], record["max"], record["mean"], seen, top_logits])
            search.append(_search_text(record, vocab))
            if progress is not None:
                progress.advance()
        _js(tmp / "data" / "index.js", "index", {"meta": meta, "units": rows})
        _js(tmp / "data" / "search.js", "search", search)
        _js(tmp / "data" / "vocab.js", "vocab", vocab)
        write_json(tmp / MARKER, meta)
        _swap(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out / "index.html"


def _swap(tmp: Path, out: Path) -> None:
    """Put the finished folder at ``out``; an earlier browser there is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)
