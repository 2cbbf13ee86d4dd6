"""Labelled data for probes: sequence labels (one per text) and token labels (character spans of a text).

A label is attached to characters, not to tokens, so one data set serves every tokenizer: a token gets
the label of the span its characters fall in (``token_labels``). The bundled tasks are the five genres
(sequence level, ``genres.heldout``) and three token properties cut from the bundled eval text
(``number``, ``capitalised``, ``code``). Users' own labels come as JSONL (``read_labels``):

    {"text": "The cat sat.", "label": "animal"}                       # sequence level
    {"text": "Call me at 5 pm", "spans": [[11, 12, "time"]], "other": "none"}   # token level

Token level: characters inside ``[start, end)`` of a span take its label; the rest take ``other``
(default ``"other"``). Every line of a file must be of the same level.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from actlab.errors import ActlabError

__all__ = ["LabelledSet", "TOKEN_TASKS", "TASKS", "bundled_task", "genre_task", "read_labels", "token_property",
           "python_lines", "Span"]

Span = tuple[int, int, str]
GENRE_TASK = "genre"


@dataclass
class LabelledSet:
    """Texts with labels. ``level="sequence"``: ``labels[i]`` names text i's class. ``level="token"``:
    ``spans[i]`` lists text i's labelled character spans and ``other`` labels the rest."""

    name: str
    level: str
    texts: list[str]
    labels: list[str] = field(default_factory=list)
    spans: list[list[Span]] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.level not in ("sequence", "token"):
            raise ActlabError(f"label level must be 'sequence' or 'token', not {self.level!r}")
        if not self.texts:
            raise ActlabError(f"labelled set {self.name!r} has no texts")
        n = len(self.texts)
        if self.level == "sequence" and len(self.labels) != n:
            raise ActlabError(f"labelled set {self.name!r}: {len(self.labels)} labels for {n} texts")
        if self.level == "token":
            self.other = self.other or ["other"] * n
            if len(self.spans) != n or len(self.other) != n:
                raise ActlabError(f"labelled set {self.name!r}: span lists for {len(self.spans)} of {n} texts")

    @property
    def classes(self) -> list[str]:
        """The class names, sorted (so the class order is the same for every run on the same data)."""
        if self.level == "sequence":
            return sorted(set(self.labels))
        return sorted({s[2] for spans in self.spans for s in spans} | set(self.other))

    def subset(self, index: Sequence[int]) -> "LabelledSet":
        """The texts at ``index`` (in that order), with their labels."""
        pick = list(index)
        return LabelledSet(self.name, self.level, [self.texts[i] for i in pick],
                           [self.labels[i] for i in pick] if self.labels else [],
                           [self.spans[i] for i in pick] if self.spans else [],
                           [self.other[i] for i in pick] if self.other else [])

    def char_label(self, i: int, start: int, end: int) -> str:
        """The label of characters ``[start, end)`` of text i: the first span they overlap, else ``other``."""
        for s, e, label in self.spans[i]:
            if start < e and s < end:
                return label
        return self.other[i]


# ------------------------------------------------------------------ bundled tasks
def genre_task(per_genre: int | None = None) -> LabelledSet:
    """The five genres at sequence level: the bundled held-out passages (300 × 40 tokens per genre)."""
    from actlab.datasets import genres

    texts, labels = [], []
    for g in genres.GENRES:
        rows = genres.heldout(g)[:per_genre]
        texts += [r["text"] for r in rows]
        labels += [g] * len(rows)
    return LabelledSet(GENRE_TASK, "sequence", texts, labels)


_PY_LINE = re.compile(
    r"^\s*(>>>|\.\.\.\s|def \w+\s*\(|class \w+\s*[:(]|return\b|import \w|from [\w.]+ import |"
    r"(el)?if\b.*:\s*(#.*)?$|else\s*:|for \w.* in .*:\s*(#.*)?$|while\b.*:\s*(#.*)?$|with\b.*:\s*(#.*)?$|try\s*:|"
    r"except\b.*:|finally\s*:|raise \w|yield\b|print\(|@\w|assert \w|"
    r"[A-Za-z_][\w.]*(\[[^\]]*\])?\s*([+\-*/|&]?=)\s*[^=\s])")


def python_lines(text: str) -> list[Span]:
    """Spans of the lines that read as Python: a keyword-led statement, an assignment, a ``>>>`` prompt.
    A heuristic for a bundled task, documented as such; tables (``|`` lines) never count."""
    spans, start = [], 0
    for line in text.split("\n"):
        if line.strip() and "|" not in line and _PY_LINE.match(line):
            spans.append((start, start + len(line), "code"))
        start += len(line) + 1
    return spans


def _numbers(text: str) -> list[Span]:
    return [(m.start(), m.end(), "number") for m in re.finditer(r"\d+", text)]


def _capitalised(text: str) -> list[Span]:
    return [(m.start(), m.end(), "capitalised") for m in re.finditer(r"(?<![A-Za-z])[A-Z][a-z]+", text)]


TOKEN_TASKS: dict[str, Callable[[str], list[Span]]] = {
    "number": _numbers,  # digits
    "capitalised": _capitalised,  # a word of a capital then lower-case letters
    "code": python_lines,  # a line that reads as Python
}
TASKS = (GENRE_TASK, *TOKEN_TASKS)


def token_property(name: str, texts: Sequence[str] | None = None, docs: int = 200) -> LabelledSet:
    """A bundled token property on ``texts`` (default: the first ``docs // 5`` documents of each genre of
    the bundled eval text, which the demo models never trained on)."""
    if name not in TOKEN_TASKS:
        raise ActlabError(f"unknown token property {name!r}; the bundled ones are {', '.join(TOKEN_TASKS)}")
    if texts is None:
        from actlab.datasets import genres, training_text

        texts = [t for g in genres.GENRES for t in training_text("eval", genre=g)[: max(1, docs // 5)]]
    texts = list(texts)
    return LabelledSet(name, "token", texts, spans=[TOKEN_TASKS[name](t) for t in texts], other=["other"] * len(texts))


def bundled_task(task: str, docs: int | None = None) -> LabelledSet:
    """``genre`` (``docs`` passages per genre, default all 300) or a token property (``docs`` documents)."""
    if task == GENRE_TASK:
        return genre_task(docs)
    if task in TOKEN_TASKS:
        return token_property(task, docs=docs or 200)
    raise ActlabError(f"unknown probe task {task!r}: use one of {', '.join(TASKS)} or a .jsonl file of labels "
                      "(docs/probes.md)")


# ------------------------------------------------------------------ users' JSONL
def _span(value, where: str, n_chars: int) -> Span:
    ok = (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                             for v in value[:2]) and isinstance(value[2], str))
    if not ok or not 0 <= value[0] < value[1] <= n_chars:
        raise ActlabError(f"{where}: each span must be [start, end, \"label\"] with 0 <= start < end <= "
                          f"{n_chars} (the text's length), not {value!r}")
    return int(value[0]), int(value[1]), value[2]


def _row(row, where: str) -> tuple[str, str, object]:
    """(level, text, label or (spans, other)) of one JSONL line, every field checked."""
    if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
        raise ActlabError(f"{where}: expected a JSON object with a non-empty string 'text' and a 'label' "
                          "(sequence level) or 'spans' (token level)")
    if ("label" in row) == ("spans" in row):
        raise ActlabError(f"{where}: give exactly one of 'label' (sequence level) and 'spans' (token level)")
    if "label" in row:
        if not isinstance(row["label"], (str, int)) or isinstance(row["label"], bool):
            raise ActlabError(f"{where}: 'label' must be a string or an integer, not {type(row['label']).__name__}")
        return "sequence", row["text"], str(row["label"])
    if not isinstance(row["spans"], list):
        raise ActlabError(f"{where}: 'spans' must be a list of [start, end, \"label\"]")
    other = row.get("other", "other")
    if not isinstance(other, str):
        raise ActlabError(f"{where}: 'other' must be a string")
    return "token", row["text"], ([_span(s, where, len(row["text"])) for s in row["spans"]], other)


def read_labels(path: str | os.PathLike) -> LabelledSet:
    """A user's labelled JSONL file (format in this module's docstring and docs/probes.md)."""
    from pathlib import Path

    from actlab.io.formats import _iter_lines, _loads, check_file

    p = check_file(path)
    level, texts, labels, spans, others = None, [], [], [], []
    for line_no, text in _iter_lines(p):
        if not text.strip():
            continue
        where = f"{p} line {line_no}"
        kind, body, value = _row(_loads(text, where), where)
        if level is not None and kind != level:
            raise ActlabError(f"{where}: a {kind}-level line in a file of {level}-level labels; use one level per file")
        level = kind
        texts.append(body)
        if kind == "sequence":
            labels.append(value)
        else:
            spans.append(value[0])
            others.append(value[1])
    if level is None:
        raise ActlabError(f"{p} has no labelled lines (see docs/probes.md for the format)")
    return LabelledSet(Path(p).stem, level, texts, labels, spans, others)
