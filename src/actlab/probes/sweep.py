"""The per-site sweep: split documents three ways, fit one probe per site, score it on the test documents
against the majority baseline and a control task.

Splits are by document (``Features.groups``): the *fit* documents train the probe, the *tune* documents
choose λ (and k for sparse probes), the *test* documents are scored once. Nothing the test split sees
chose anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from actlab.engine.config import Config, check_fields
from actlab.errors import ActlabError
from actlab.linalg import split_indices
from actlab.probes.features import Features
from actlab.probes.fit import KS, LAMBDAS, METHODS, LinearProbe, fit_logistic, fit_massmean, fit_sparse
from actlab.probes.scores import accuracy, control_labels, score_probe

__all__ = ["ProbeConfig", "SiteResult", "SweepResult", "split_groups", "fit_probe", "sweep"]


@dataclass
class ProbeConfig(Config):
    """How probes are fitted and scored (saved into every probe file and result table)."""

    method: str = "logistic"
    pooling: str = "mean"  # sequence labels: mean over the text's tokens, or the last token
    lambdas: tuple[float, ...] = LAMBDAS
    ks: tuple[int, ...] = KS
    tune_fraction: float = 0.2
    test_fraction: float = 0.2
    n_boot: int = 200
    control: bool = True
    seed: int = 0

    def validate(self) -> None:
        check_fields(self, positive_ints=("n_boot",), fractions=("tune_fraction", "test_fraction"),
                     choices={"method": METHODS, "pooling": ("mean", "last")})
        self.lambdas, self.ks = tuple(float(v) for v in self.lambdas), tuple(self.ks)
        if not self.lambdas or any(not v > 0 for v in self.lambdas):
            raise ActlabError(f"lambdas must be positive numbers, not {list(self.lambdas)}")
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise ActlabError(f"ks must be positive integers, not {list(self.ks)}")
        if not (self.tune_fraction > 0 and self.test_fraction > 0 and self.tune_fraction + self.test_fraction < 0.9):
            raise ActlabError("tune_fraction and test_fraction must be > 0 and leave at least 10% of the documents "
                              f"to fit on; got {self.tune_fraction} and {self.test_fraction}")


@dataclass
class SiteResult:
    """One probe's held-out record (``k`` for sparse probes; ``chosen`` marks the k the tune split picked)."""

    site: str
    method: str
    k: int | None
    lam: float | None
    tune_accuracy: float
    score: dict
    control_accuracy: float | None = None
    chosen: bool = True

    @property
    def selectivity(self) -> float | None:
        return None if self.control_accuracy is None else self.score["accuracy"] - self.control_accuracy

    def to_dict(self) -> dict:
        return {"site": self.site, "method": self.method, "k": self.k, "lambda": self.lam,
                "tune_accuracy": self.tune_accuracy, **self.score, "control_accuracy": self.control_accuracy,
                "selectivity": self.selectivity, "chosen": self.chosen}


@dataclass
class SweepResult:
    name: str
    level: str
    classes: list[str]
    config: ProbeConfig
    rows: list[SiteResult] = field(default_factory=list)
    probes: dict[str, LinearProbe] = field(default_factory=dict)
    counts: dict = field(default_factory=dict)  # rows and documents per split

    def chosen(self) -> list[SiteResult]:
        return [r for r in self.rows if r.chosen]

    def to_dict(self) -> dict:
        return {"task": self.name, "level": self.level, "classes": self.classes, "config": self.config.to_dict(),
                "splits": self.counts, "rows": [r.to_dict() for r in self.rows]}


def split_groups(groups: torch.Tensor, config: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row masks ``(fit, tune, test)``: a seeded three-way split of the documents."""
    uniq = torch.unique(groups)
    n = len(uniq)
    n_test, n_tune = max(1, round(n * config.test_fraction)), max(1, round(n * config.tune_fraction))
    if n - n_test - n_tune < 2:
        raise ActlabError(f"only {n} labelled documents: a probe needs at least 4 (fit, tune and test documents)")
    _, perm = split_indices(n, n, config.seed, sort=False)
    test_g, tune_g = uniq[perm[:n_test]], uniq[perm[n_test:n_test + n_tune]]
    test, tune = torch.isin(groups, test_g), torch.isin(groups, tune_g)
    return ~(test | tune), tune, test


def fit_probe(method: str, x, y, classes, x_tune, y_tune, config: ProbeConfig, k: int | None = None) -> LinearProbe:
    """One probe of ``method`` (λ, and the class means' calibration, from the tuning rows)."""
    if method == "logistic":
        return fit_logistic(x, y, classes, x_tune=x_tune, y_tune=y_tune, lambdas=config.lambdas)
    if method == "massmean":
        return fit_massmean(x, y, classes, x_tune=x_tune, y_tune=y_tune)
    if method == "sparse":
        return fit_sparse(x, y, classes, x_tune=x_tune, y_tune=y_tune, k=k, lambdas=config.lambdas)
    raise ActlabError(f"unknown probe method {method!r}; use one of {', '.join(METHODS)}")


def _site(features: Features, site: str, masks, y_control, config: ProbeConfig) -> tuple[list[SiteResult], LinearProbe]:
    fit, tune, test = masks
    x, y, classes = features.x[site], features.y, features.classes
    ks = sorted({min(k, x.shape[1]) for k in config.ks}) if config.method == "sparse" else [None]
    rows, probes = [], []
    for k in ks:
        probe = fit_probe(config.method, x[fit], y[fit], classes, x[tune], y[tune], config, k)
        tune_acc = probe.info["tune_accuracy"]  # from the fit on the fitting rows alone
        score = score_probe(probe, x[test], y[test], features.groups[test], y[fit | tune], n_boot=config.n_boot,
                            seed=config.seed)
        rows.append(SiteResult(site, config.method, k, probe.info.get("lambda"), tune_acc, score.to_dict()))
        probes.append(probe)
    # sparse: the k with the best tuning accuracy (ties: the smaller k) is the one saved and controlled
    best = max(range(len(rows)), key=lambda i: (rows[i].tune_accuracy, -i))
    for i, r in enumerate(rows):
        r.chosen = i == best
    if y_control is not None:
        control = fit_probe(config.method, x[fit], y_control[fit], classes, x[tune], y_control[tune], config,
                            ks[best])
        rows[best].control_accuracy = accuracy(control.predict(x[test]), y_control[test])
    chosen = probes[best]
    chosen.info.update(test=rows[best].score, tune_accuracy=rows[best].tune_accuracy,
                       control_accuracy=rows[best].control_accuracy)
    return rows, chosen


def sweep(features: Features, config: ProbeConfig | None = None, *, progress: bool = False,
          **overrides) -> SweepResult:
    """Fit and score one probe per site of ``features`` (per k for sparse probes)."""
    from actlab.engine.progress import progress_bar

    config = ProbeConfig.with_overrides(config, overrides)
    masks = split_groups(features.groups, config)
    y_control = control_labels(features.y, features.token_ids, config.seed) if config.control else None
    counts = {name: {"rows": int(m.sum()), "documents": int(torch.unique(features.groups[m]).numel())}
              for name, m in zip(("fit", "tune", "test"), masks)}
    result = SweepResult(features.name, features.level, features.classes, config, counts=counts)
    with progress_bar(f"probing {features.name}", len(features.sites), unit="sites", enabled=progress) as bar:
        for site in features.sites:
            rows, probe = _site(features, site, masks, y_control, config)
            probe.info.update(site=site, pooling=features.pooling, level=features.level, task=features.name)
            result.rows += rows
            result.probes[site] = probe
            bar.advance()
    return result
