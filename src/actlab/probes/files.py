"""Probe files: the probe's tensors as safetensors; its classes, method, site, config and the model it reads
as JSON in the header (format ``actlab.probe``). A probe is refused on a model other than the one it was
fitted on: its direction means nothing in another model's space."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from actlab.errors import ActlabError
from actlab.files import HeaderFields, load_tensors, save_tensors, to_jsonable
from actlab.probes.fit import LinearProbe

__all__ = ["FORMAT", "save_probe", "load_probe"]

FORMAT = "actlab.probe"
_HINT = "fit the probe again with `actlab probe`"


def save_probe(path: str | Path, probe: LinearProbe, *, model: dict, site: str, config: dict | None = None) -> Path:
    """Write ``probe`` (read from ``site`` of the model whose ``identity()`` is ``model``)."""
    tensors = {"weight": probe.weight, "bias": probe.bias, "mean": probe.mean, "scale": probe.scale}
    if probe.units is not None:
        tensors["units"] = probe.units.long()
    metadata = {"model": json.dumps(model), "site": site, "classes": json.dumps(probe.classes),
                "method": probe.method, "width": str(probe.width), "info": json.dumps(to_jsonable(probe.info)),
                "config": json.dumps(to_jsonable(config or {}))}
    return save_tensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, FORMAT, metadata)


def _shapes_ok(t: dict[str, torch.Tensor], n_classes: int, width: int) -> bool:
    k = t["mean"].shape[0] if t.get("mean") is not None and t["mean"].ndim == 1 else -1
    units = t.get("units")
    return (all(t.get(n) is not None and t[n].is_floating_point() and bool(torch.isfinite(t[n]).all())
                for n in ("weight", "bias", "mean", "scale"))
            and tuple(t["weight"].shape) == (n_classes, k) and tuple(t["bias"].shape) == (n_classes,)
            and tuple(t["scale"].shape) == (k,)
            and (k == width if units is None else (tuple(units.shape) == (k,) and units.dtype == torch.long
                                                   and bool(((units >= 0) & (units < width)).all()))))


def load_probe(path: str | Path, model=None) -> tuple[LinearProbe, dict]:
    """The probe and its header (``model``, ``site``, ``config``); with ``model`` (a Model), a probe fitted on
    another model is refused."""
    from actlab.models.model import same_model

    tensors, meta = load_tensors(path, FORMAT, "probe", _HINT)
    fields = HeaderFields(path, "probe", meta, _HINT)
    made_for = fields.json("model", dict)
    classes = fields.json("classes", list)
    site, method = fields.text("site"), fields.text("method")
    width = fields.number("width", int)
    if len(classes) < 2 or not all(isinstance(c, str) for c in classes) or not _shapes_ok(tensors, len(classes), width):
        raise fields.damaged("its tensors do not match its classes and width")
    if model is not None:
        if not same_model(made_for, model.identity()):
            raise ActlabError(f"probe file '{path}' was fitted on {made_for.get('model_name', 'another model')}, "
                              f"not {model.name}: fit a probe for this model with `actlab probe {model.name} ...`")
        if model.sites.get(site) != width:
            raise ActlabError(f"probe file '{path}' reads {site} ({width} units), which {model.name} does not have")
    probe = LinearProbe(tensors["weight"].double(), tensors["bias"].double(), tensors["mean"].double(),
                        tensors["scale"].double(), classes, method, width, tensors.get("units"),
                        fields.json("info", dict, {}))
    return probe, {"model": made_for, "site": site, "config": fields.json("config", dict, {})}
