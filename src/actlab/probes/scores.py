"""Honest probe scores: held-out accuracy and AUC with bootstrap intervals over documents, the majority-class
baseline, and control-task labels for selectivity.

AUC is the Mann–Whitney statistic (ties count half), one-vs-rest and macro-averaged over classes that
occur with both signs. Bootstrap intervals resample whole documents (``groups``): the tokens of one
document are not independent, and resampling tokens would make token-level intervals too narrow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actlab.errors import ActlabError
from actlab.linalg import as_generator

__all__ = ["Score", "accuracy", "binary_auc", "macro_auc", "majority_accuracy", "bootstrap", "control_labels",
           "score_probe"]


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).double().mean()) if len(y) else float("nan")


def binary_auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counted half; NaN with one class only."""
    score, positive = score.double(), positive.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(score, stable=True)
    s = score[order]
    ranks = torch.empty_like(s)
    # average ranks over runs of equal scores (1-based)
    _, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    ranks_sorted = (ends - (counts.double() - 1) / 2)[inverse]
    ranks[order] = ranks_sorted
    rank_sum = float(ranks[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def macro_auc(proba: torch.Tensor, y: torch.Tensor) -> float:
    """One-vs-rest AUC averaged over the classes present with both signs (two classes: the plain AUC)."""
    if proba.shape[1] == 2:
        return binary_auc(proba[:, 1], y == 1)
    values = [binary_auc(proba[:, c], y == c) for c in range(proba.shape[1])]
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def majority_accuracy(y_train: torch.Tensor, y_test: torch.Tensor, n_classes: int) -> float:
    """Accuracy of always answering the training rows' most frequent class."""
    top = int(torch.bincount(y_train, minlength=n_classes).argmax())
    return accuracy(torch.full_like(y_test, top), y_test)


def bootstrap(metric, proba: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, n_boot: int = 200,
              seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``metric(proba, y)`` over ``n_boot`` resamples of whole groups (documents)."""
    if n_boot < 1:
        return float("nan"), float("nan")
    uniq, inverse = torch.unique(groups, return_inverse=True)
    members = [torch.nonzero(inverse == g).flatten() for g in range(len(uniq))]
    gen = as_generator(seed)
    values = []
    for _ in range(n_boot):
        pick = torch.randint(len(uniq), (len(uniq),), generator=gen)
        rows = torch.cat([members[int(g)] for g in pick])
        v = metric(proba[rows], y[rows])
        if v == v:
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    t = torch.tensor(values, dtype=torch.float64)
    lo, hi = torch.quantile(t, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def control_labels(y: torch.Tensor, token_ids: torch.Tensor | None, seed: int = 0) -> torch.Tensor:
    """The control task: labels shuffled among rows of the same token type (token level), or among all rows
    (sequence level). A probe that only reads token identity scores the same on both; selectivity (real
    minus control accuracy) is what the probe reads beyond it."""
    gen = as_generator(seed)
    if token_ids is None:
        return y[torch.randperm(len(y), generator=gen)]
    out = y.clone()
    order = torch.argsort(token_ids, stable=True)
    _, counts = torch.unique_consecutive(token_ids[order], return_counts=True)
    start = 0
    for c in counts.tolist():
        rows = order[start:start + c]
        out[rows] = y[rows[torch.randperm(c, generator=gen)]]
        start += c
    return out


@dataclass
class Score:
    """Held-out scores of one probe (intervals: 95% bootstrap over documents)."""

    accuracy: float
    accuracy_ci: tuple[float, float]
    auc: float
    auc_ci: tuple[float, float]
    majority: float
    n: int

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "accuracy_ci": list(self.accuracy_ci), "auc": self.auc,
                "auc_ci": list(self.auc_ci), "majority": self.majority, "n": self.n}


def score_probe(probe, x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, y_train: torch.Tensor, *,
                n_boot: int = 200, seed: int = 0) -> Score:
    """Accuracy and macro AUC of ``probe`` on rows ``x`` with bootstrap intervals, and the majority baseline."""
    if len(y) == 0:
        raise ActlabError("no held-out rows to score the probe on: give more labelled texts")
    proba = probe.proba(x)

    def acc(p, t):
        return accuracy(p.argmax(1), t)

    return Score(acc(proba, y), bootstrap(acc, proba, y, groups, n_boot, seed),
                 macro_auc(proba, y), bootstrap(macro_auc, proba, y, groups, n_boot, seed + 1),
                 majority_accuracy(y_train, y, proba.shape[1]), int(len(y)))
