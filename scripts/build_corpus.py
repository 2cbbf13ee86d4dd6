#!/usr/bin/env python3
"""Build actlab's five-genre English demo corpus from Debian packages (offline once installed).

Genres and their sources:

  scripture    bible-kjv + bible-kjv-text   King James Bible, one chapter per document
  fortunes     fortunes + fortunes-min      fortune(6) cookies, one cookie per document
  jargon       jargon-text                  the Jargon File lexicon, one entry per document
  techdoc      python3-doc                  Python 3 reST doc sources, one section per document
  dictionary   wordnet-base                 WordNet 3.0 glosses, 8 consecutive synsets per document

Each genre is cleaned into documents, exact duplicates (after whitespace and case folding) are
removed, and each genre is split *by document* into train / validation / test (90/5/5) with a fixed
seed. Output (default work-data/corpus/): train.jsonl, validation.jsonl, test.jsonl with fields
{"id", "genre", "text"}, and data_card.json (sizes, package versions, licences).

Installing the packages needs root; without root the script prints the apt-get command to run.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

GENRES = ["scripture", "fortunes", "jargon", "techdoc", "dictionary"]

PACKAGES = {
    "scripture": ["bible-kjv", "bible-kjv-text"],
    "fortunes": ["fortunes", "fortunes-min"],
    "jargon": ["jargon-text"],
    "techdoc": ["python3-doc"],
    "dictionary": ["wordnet-base"],
}

LICENCES = {
    "scripture": "King James Version text: public domain (copyright expired); Debian packaging GPL-2+",
    "fortunes": "fortune cookie files from the BSD fortune distribution (BSD licence for the "
    "collection; individual quotations belong to their authors, short quotations)",
    "jargon": "The Jargon File 4.4.7: public domain",
    "techdoc": "Python 3 documentation sources: PSF License Agreement (Python Software Foundation)",
    "dictionary": "WordNet 3.0: WordNet 3.0 licence (Princeton University, BSD-style, "
    "free use with attribution)",
}

DESCRIPTIONS = {
    "scripture": "King James Bible, verse references removed, one chapter per document",
    "fortunes": "fortune(6) cookies (offensive set not included), one cookie per document",
    "jargon": "Jargon File lexicon entries ('term: pos.' headword line + body)",
    "techdoc": "Python 3 documentation reST sources (markup roles stripped), one section per document",
    "dictionary": "WordNet 3.0 synsets as 'word, word (noun): gloss; \"example\"', 8 per document",
}

SPLIT_FRACTIONS = {"train": 0.90, "validation": 0.05, "test": 0.05}


def log(msg: str) -> None:
    print(f"[build_corpus] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# package installation


def package_installed(pkg: str) -> bool:
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False
    )
    return r.returncode == 0 and "install ok installed" in r.stdout


def package_version(pkg: str) -> str | None:
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False
    )
    return r.stdout.strip() if r.returncode == 0 else None


def ensure_packages(install: bool) -> None:
    if shutil.which("dpkg-query") is None:
        sys.exit(
            "build_corpus: this script needs a Debian/Ubuntu system (dpkg-query not found): the "
            "corpus is built from Debian packages."
        )
    needed = [p for pkgs in PACKAGES.values() for p in pkgs]
    missing = [p for p in needed if not package_installed(p)]
    if not missing:
        log("all source packages are installed: " + " ".join(needed))
        return
    cmd = "apt-get update && apt-get install -y " + " ".join(missing)
    if not install:
        sys.exit(f"build_corpus: missing Debian packages: {' '.join(missing)}\n"
                 f"Install them with (needs root):\n  sudo sh -c '{cmd}'")
    if os.geteuid() != 0:
        sys.exit(
            "build_corpus: missing Debian packages: "
            + " ".join(missing)
            + "\nInstalling them needs root. Run this first (as root or with sudo), then rerun this script:\n"
            + f"  sudo sh -c '{cmd}'"
        )
    log(f"installing {' '.join(missing)} with apt-get (root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", *missing], env=env, check=False)
    if r.returncode != 0:
        log("apt-get install failed; running apt-get update and retrying")
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", *missing], env=env, check=True)
    still = [p for p in needed if not package_installed(p)]
    if still:
        sys.exit(f"build_corpus: packages still missing after apt-get: {' '.join(still)}")


# ---------------------------------------------------------------------------------------------
# extraction / cleaning, one function per genre; each returns a list of document strings


def _norm_ws(text: str) -> str:
    lines = [ln.rstrip() for ln in text.replace("\t", "    ").splitlines()]
    out = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", out)


def extract_scripture() -> list[str]:
    exe = shutil.which("bible")
    if exe is None:
        sys.exit("build_corpus: the 'bible' program (package bible-kjv) is not on PATH")
    # -f turns pretty printing off: one verse per line, "Ge1:1 In the beginning ..."
    out = subprocess.run(
        [exe, "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    chapters: dict[str, list[str]] = {}
    order: list[str] = []
    pat = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
    for line in out.splitlines():
        m = pat.match(line.strip())
        if not m:
            continue
        key = f"{m.group(1)}{m.group(2)}"
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(m.group(4).strip())
    docs = []
    for key in order:
        # verses as lines; the verse numbers are dropped, the text is plain prose
        docs.append("\n".join(chapters[key]))
    return docs


def extract_fortunes() -> list[str]:
    root = Path("/usr/share/games/fortunes")
    skip = {"art", "ascii-art", "translate-me"}
    docs = []
    for f in sorted(root.iterdir()):
        if f.suffix or f.name in skip or f.is_symlink() or not f.is_file():
            continue
        if not (root / (f.name + ".dat")).exists():
            continue
        raw = f.read_bytes().decode("utf-8", errors="replace")
        for chunk in re.split(r"^%\s*$", raw, flags=re.M):
            t = _norm_ws(chunk)
            if len(t) >= 20:
                docs.append(t)
    return docs


def extract_jargon() -> list[str]:
    path = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
    text = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
    text = text.replace("\u00a0", " ")
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "Glossary")
    end = next(i for i, ln in enumerate(lines) if ln.strip() == "Part III. Appendices")
    head = re.compile(r"^   :(.+?):\s*(.*)$")
    docs: list[str] = []
    cur: list[str] | None = None
    for ln in lines[start:end]:
        m = head.match(ln)
        if m:
            if cur:
                docs.append(cur)
            cur = [f"{m.group(1)}: {m.group(2)}".rstrip()]
        elif cur is not None:
            cur.append(ln[3:] if ln.startswith("   ") else ln)
    if cur:
        docs.append(cur)
    out = []
    for d in docs:
        t = "\n".join(d)
        t = re.sub(r"\{([^{}]*)\}", r"\1", t)  # {cross-reference} -> cross-reference
        t = _norm_ws(t)
        if len(t) >= 40:
            out.append(t)
    return out


_ROLE = re.compile(r":[a-zA-Z:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_HEAD_UNDERLINE = re.compile(r"^([=\-~^*#+\"'`.])\1{2,}\s*$")
_SIG_DIRECTIVES = {
    "function", "class", "method", "attribute", "data", "exception", "decorator", "classmethod",
    "staticmethod", "opcode", "cmdoption", "option", "describe", "envvar", "c:function",
    "c:type", "c:member", "c:macro", "c:var", "c:struct", "pdbcommand", "index-term",
}
_DROP_DIRECTIVES = {
    "index", "highlight", "module", "moduleauthor", "sectionauthor", "toctree", "currentmodule",
    "testsetup", "testcleanup", "raw", "only", "include", "literalinclude", "image", "figure",
    "productionlist", "audit-event", "impl-detail", "tabularcolumns", "program", "c:namespace",
}


def _clean_rst(text: str) -> list[str]:
    """reST source -> list of sections (heading + body) in plain-ish text."""
    out_lines: list[str] = []
    drop_indent: int | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        stripped = ln.strip()
        indent = len(ln) - len(ln.lstrip())
        if drop_indent is not None:
            if stripped == "" or indent > drop_indent:
                i += 1
                continue
            drop_indent = None
        if _HEAD_UNDERLINE.match(ln) and stripped:
            # overline or underline of a heading: becomes a section break marker
            if out_lines and out_lines[-1].strip() and not _HEAD_UNDERLINE.match(lines[i - 1]):
                out_lines.insert(len(out_lines) - 1, "\x00SECTION")
            i += 1
            continue
        m = re.match(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$", ln)
        if m:
            name, arg = m.group(2), m.group(3).strip()
            if name in _DROP_DIRECTIVES:
                drop_indent = indent
            elif name in _SIG_DIRECTIVES and arg:
                out_lines.append(m.group(1) + arg)
            elif name in ("versionadded", "versionchanged", "deprecated"):
                word = {"versionadded": "New in version", "versionchanged": "Changed in version",
                        "deprecated": "Deprecated since version"}[name]
                out_lines.append(f"{m.group(1)}{word} {arg}")
            elif name in ("note", "warning", "seealso", "tip", "important", "caution", "attention", "hint"):
                out_lines.append(m.group(1) + name.capitalize() + ":" + (" " + arg if arg else ""))
            elif arg and name not in ("code-block", "sourcecode", "doctest", "testcode", "testoutput", "csv-table", "table", "list-table"):
                out_lines.append(m.group(1) + arg)
            i += 1
            continue
        if re.match(r"^\s*\.\.\s", ln) or stripped == "..":
            # comment, label target (.. _name:), substitution definition: drop with its block
            drop_indent = indent
            i += 1
            continue
        if re.match(r"^\s*:[\w -]+:( |$)", ln) and stripped.count(":") >= 2 and not stripped.startswith(":param"):
            # directive option such as :noindex: / :synopsis: x  (field lists like :param: kept)
            if re.match(r"^\s*:(noindex|synopsis|platform|module|maxdepth|numbered|hidden|linenos|"
                        r"emphasize-lines|caption|name|class|widths|header-rows|options|"
                        r"no-typesetting|nosignatures|canonical|type|value|async|abstractmethod|"
                        r"final|audit-event|skipif|glob|titlesonly|includehidden)\b", ln):
                i += 1
                continue
        s = _ROLE.sub(lambda mm: mm.group(1), ln)
        s = re.sub(r"``([^`]+)``", r"\1", s)
        s = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", s)
        s = re.sub(r"`([^`]+)`_+", r"\1", s)
        s = re.sub(r"\|(\w[\w-]*)\|", r"\1", s)
        s = s.replace("::", ":") if s.rstrip().endswith("::") else s
        out_lines.append(s)
        i += 1
    sections, cur = [], []
    for ln in out_lines:
        if ln == "\x00SECTION":
            if cur:
                sections.append(cur)
            cur = []
        else:
            cur.append(ln)
    if cur:
        sections.append(cur)
    return [_norm_ws("\n".join(s)) for s in sections]


def extract_techdoc() -> list[str]:
    cands = sorted(Path("/usr/share/doc").glob("python3.*/html/_sources"))
    cands = [c for c in cands if any(c.rglob("*.rst.txt"))]
    if not cands:
        sys.exit("build_corpus: no Python reST sources found under /usr/share/doc/python3.*/html/_sources")
    root = cands[-1]
    docs = []
    max_chars = 6000
    for f in sorted(root.rglob("*.rst.txt")):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(("whatsnew/changelog", "license", "copyright")):
            continue  # changelog is a long list of issue numbers; licence texts are legalese
        sections = _clean_rst(f.read_text(encoding="utf-8", errors="replace"))
        # merge tiny sections into their successor, cut huge ones at paragraph boundaries
        buf = ""
        for sec in sections:
            if not sec:
                continue
            buf = (buf + "\n\n" + sec).strip() if buf else sec
            if len(buf) < 300:
                continue
            while len(buf) > max_chars:
                cut = buf.rfind("\n\n", 0, max_chars)
                if cut < 1000:
                    cut = max_chars
                docs.append(buf[:cut].strip())
                buf = buf[cut:].strip()
            docs.append(buf)
            buf = ""
        if len(buf) >= 100:
            docs.append(buf)
    return [d for d in docs if len(d) >= 100]


_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def extract_dictionary() -> list[str]:
    root = Path("/usr/share/wordnet")
    entries = []
    for name in ["data.noun", "data.verb", "data.adj", "data.adv"]:
        for line in (root / name).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # licence header lines start with two spaces
            head, gloss = line.split("|", 1)
            f = head.split()
            ss_type, w_cnt = f[2], int(f[3], 16)
            words = [f[4 + 2 * k] for k in range(w_cnt)]
            words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in words]
            gloss = gloss.strip()
            entries.append(f"{', '.join(words)} ({_POS[ss_type]}): {gloss}")
    group = 8
    return ["\n".join(entries[i : i + group]) for i in range(0, len(entries), group)]


EXTRACTORS = {
    "scripture": extract_scripture,
    "fortunes": extract_fortunes,
    "jargon": extract_jargon,
    "techdoc": extract_techdoc,
    "dictionary": extract_dictionary,
}


# ---------------------------------------------------------------------------------------------


def dedup(docs: list[str], seen: set[str]) -> tuple[list[str], int]:
    out, dropped = [], 0
    for d in docs:
        key = hashlib.sha1(" ".join(d.lower().split()).encode()).hexdigest()
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        out.append(d)
    return out, dropped


def split_docs(docs: list[str], seed: int, genre: str) -> dict[str, list[int]]:
    idx = list(range(len(docs)))
    rng = random.Random(f"{seed}-{genre}")
    rng.shuffle(idx)
    n = len(idx)
    n_val = max(1, round(n * SPLIT_FRACTIONS["validation"]))
    n_test = max(1, round(n * SPLIT_FRACTIONS["test"]))
    return {
        "validation": sorted(idx[:n_val]),
        "test": sorted(idx[n_val : n_val + n_test]),
        "train": sorted(idx[n_val + n_test :]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Example: sudo .venv/bin/python scripts/build_corpus.py   (root only needed to apt-get install)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=REPO / "work-data" / "corpus",
                   help="output directory (default: work-data/corpus)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the document split (default 1234)")
    p.add_argument("--no-install", action="store_true",
                   help="never call apt-get; fail with the install command if packages are missing")
    args = p.parse_args(argv)

    t0 = time.time()
    ensure_packages(install=not args.no_install)
    args.out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    rows = {s: [] for s in SPLIT_FRACTIONS}
    card = {
        "name": "actlab five-genre demo corpus",
        "seed": args.seed,
        "split_fractions": SPLIT_FRACTIONS,
        "dedup": "exact duplicates after case and whitespace folding, across all genres",
        "genres": {},
    }
    for genre in GENRES:
        t = time.time()
        docs = EXTRACTORS[genre]()
        n_raw = len(docs)
        docs, dropped = dedup(docs, seen)
        parts = split_docs(docs, args.seed, genre)
        g = {
            "description": DESCRIPTIONS[genre],
            "packages": {pk: package_version(pk) for pk in PACKAGES[genre]},
            "licence": LICENCES[genre],
            "documents_raw": n_raw,
            "duplicates_dropped": dropped,
            "splits": {},
        }
        for split, ids in parts.items():
            for i in ids:
                rows[split].append({"id": f"{genre}-{i:06d}", "genre": genre, "text": docs[i]})
            chars = sum(len(docs[i]) for i in ids)
            nbytes = sum(len(docs[i].encode("utf-8")) for i in ids)
            g["splits"][split] = {"documents": len(ids), "characters": chars, "bytes": nbytes}
        g["total_bytes"] = sum(v["bytes"] for v in g["splits"].values())
        card["genres"][genre] = g
        log(f"{genre:<10} {len(docs):>6} docs ({dropped} duplicates dropped), "
            f"{g['total_bytes'] / 1e6:6.2f} MB  [{time.time() - t:.1f}s]")
    for split, rs in rows.items():
        rng = random.Random(f"{args.seed}-order-{split}")
        rng.shuffle(rs)
        path = args.out / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for r in rs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        log(f"wrote {path} ({len(rs)} documents)")
    card["total_bytes"] = sum(g["total_bytes"] for g in card["genres"].values())
    card["build_seconds"] = round(time.time() - t0, 1)
    (args.out / "data_card.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"total {card['total_bytes'] / 1e6:.1f} MB of text in {card['build_seconds']}s; "
        f"data card: {args.out / 'data_card.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
