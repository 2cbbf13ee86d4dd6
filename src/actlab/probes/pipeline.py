"""What ``actlab probe`` calls: labelled data → activations (from the model or a store) → per-site probes →
probe files, a JSON table, the causal check and an HTML report.

Output folder: ``probes/<site>.safetensors`` (one probe per site; sparse: the k the tune split chose),
``probes.json`` (config, splits, every row, the causal check) and ``report.html``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from actlab.errors import ActlabError
from actlab.probes.causal import CausalConfig, steer_generation, steer_readout
from actlab.probes.data import GENRE_TASK, LabelledSet, bundled_task, read_labels
from actlab.probes.features import Features, from_model, from_store
from actlab.probes.files import save_probe
from actlab.probes.sweep import ProbeConfig, SweepResult, split_groups, sweep

__all__ = ["labelled_data", "probe_model", "causal_check", "RESULTS_FILE", "REPORT_FILE", "PROBE_DIR"]

RESULTS_FILE, REPORT_FILE, PROBE_DIR = "probes.json", "report.html", "probes"


def labelled_data(task: str | Path | LabelledSet, docs: int | None = None) -> LabelledSet:
    """A bundled task name, a labelled JSONL file, or a ``LabelledSet`` as it is."""
    if isinstance(task, LabelledSet):
        return task
    text = str(task)
    if text.endswith(".jsonl") or Path(text).is_file():
        data = read_labels(text)
        return data if docs is None else data.subset(range(min(docs, len(data.texts))))
    return bundled_task(text, docs)


def _positive(classes: list[str], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in classes:
            raise ActlabError(f"no class {wanted!r} among the labels ({', '.join(classes)})")
        return wanted
    return next((c for c in classes if c != "other"), classes[0])


def causal_check(model, result: SweepResult, data: LabelledSet, features: Features,
                 config: CausalConfig | None = None, cls: str | None = None) -> dict:
    """Steer at the site the tune split rates best (before the last site, for the read-out check): genre probes
    on a causal LM are read by the genre classifier on sampled continuations, anything else by the last site's
    probe on the test documents."""
    from actlab.datasets import default_prompts

    config = config or CausalConfig()
    chosen = result.chosen()
    generate = data.name == GENRE_TASK and model.is_causal
    candidates = chosen if generate else chosen[:-1]
    if not candidates:
        return {"skipped": "the read-out check needs two sites or more (it steers one and reads a later one)"}
    best = max(candidates, key=lambda r: (r.tune_accuracy, -chosen.index(r)))
    probe = result.probes[best.site]
    if generate:
        classes = None if cls is None else [_positive(probe.classes, cls)]
        return steer_generation(model, probe, best.site, default_prompts(), config, classes=classes)
    reader_site = chosen[-1].site
    _, _, test = split_groups(features.groups, result.config)
    test_docs = torch.unique(features.groups[test]).tolist()[: config.n_prompts]
    return steer_readout(model, probe, best.site, result.probes[reader_site], reader_site, data.subset(test_docs),
                         _positive(probe.classes, cls), config, pooling=result.config.pooling)


def probe_model(model, task: str | Path | LabelledSet, sites, out: str | Path, config: ProbeConfig | None = None, *,
                docs: int | None = None, store=None, causal: CausalConfig | None | bool = True,
                causal_class: str | None = None, progress: bool = False, **overrides) -> dict:
    """The whole ``actlab probe`` run; returns what ``probes.json`` holds."""
    from actlab.files import write_json
    from actlab.probes.report import CausalSection, SweepSection
    from actlab.report.html import write_report

    config = ProbeConfig.with_overrides(config, overrides)
    out = Path(out)
    data = labelled_data(task, docs)
    if store is not None:
        features = from_store(store, model, data, sites, pooling=config.pooling)
    else:
        features = from_model(model, data, sites, pooling=config.pooling, progress=progress)
    result = sweep(features, config, progress=progress)
    for site, probe in result.probes.items():
        save_probe(out / PROBE_DIR / f"{site}.safetensors", probe, model=model.identity(), site=site,
                   config=config.to_dict())
    record = {"model": model.identity(), **result.to_dict()}
    sections = [SweepSection(result)]
    if causal:
        cfg = causal if isinstance(causal, CausalConfig) else None
        record["causal"] = causal_check(model, result, data, features, cfg, causal_class)
        if "skipped" not in record["causal"]:
            sections.append(CausalSection(record["causal"]))
    write_json(out / RESULTS_FILE, record)
    write_report(out / REPORT_FILE, f"Probes: {data.name} on {model.name}",
                 f"method {config.method}, pooling {config.pooling if data.level == 'sequence' else 'none (tokens)'}",
                 sections)
    return record
