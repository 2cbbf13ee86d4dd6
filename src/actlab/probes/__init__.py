"""Linear probes on any site (docs/probes.md): labelled data, logistic / mass-mean / k-sparse fits, honest
held-out scores (bootstrap intervals, majority baseline, control-task selectivity), probe files, the causal
check and the per-site sweep behind ``actlab probe``."""

from actlab.probes.causal import CausalConfig, steer_generation, steer_readout
from actlab.probes.data import TASKS, TOKEN_TASKS, LabelledSet, bundled_task, genre_task, read_labels, token_property
from actlab.probes.features import Features, from_model, from_store, from_tensors
from actlab.probes.files import load_probe, save_probe
from actlab.probes.fit import LinearProbe, fit_logistic, fit_massmean, fit_sparse, unit_scores
from actlab.probes.pipeline import probe_model
from actlab.probes.scores import binary_auc, control_labels, macro_auc, score_probe
from actlab.probes.sweep import ProbeConfig, SweepResult, sweep

__all__ = ["CausalConfig", "Features", "LabelledSet", "LinearProbe", "ProbeConfig", "SweepResult", "TASKS",
           "TOKEN_TASKS", "binary_auc", "bundled_task", "control_labels", "fit_logistic", "fit_massmean", "fit_sparse",
           "from_model", "from_store", "from_tensors", "genre_task", "load_probe", "macro_auc", "probe_model",
           "read_labels", "save_probe", "score_probe", "steer_generation", "steer_readout", "sweep", "token_property",
           "unit_scores"]
