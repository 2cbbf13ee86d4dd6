"""The site map: canonical site names -> module hook points, per architecture.

This is the only module in actlab that knows module paths such as
``model.layers.3.mlp.down_proj``. Everything else speaks in site names:

=================  ============================================================  ========
site               meaning                                                       width
=================  ============================================================  ========
``embed``          input of block 0 (embeddings, after scaling / position add)   d_model
``resid.{i}``      residual stream after block i (the block's output)            d_model
``attn.{i}``       attention sub-layer output, as added to the residual          d_model
``mlp.{i}``        MLP sub-layer output, as added to the residual                d_model
``mlp.in.{i}``     input of the MLP, after its norm (what a transcoder reads)    d_model
``mlp.hidden.{i}`` input of the MLP down projection ("neurons")                  d_mlp
``final``          output of the final norm, input of the LM head                d_model
=================  ============================================================  ========

Discovery is generic (find the block list, then the attention / MLP / down projection by
their usual child names) with a small table of per-architecture overrides for the models
whose sub-layer outputs are not what their child module returns (Gemma 2/3 post-norms,
OPT's inline MLP, BERT's post-LN sub-layers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal

from torch import nn

from actlab.engine.edits import default_input_site
from actlab.errors import ActlabError

HookMode = Literal["output", "input"]


@dataclass(frozen=True)
class HookPoint:
    """Where a site lives: the output of a module, or the first input of a module."""

    module_path: str
    mode: HookMode
    width: int


@dataclass(frozen=True)
class ArchOverride:
    """Block-relative module names for architectures the generic discovery gets wrong."""

    attn_out: str | None = None  # module whose output is the attention term added to the residual
    mlp_out: str | None = None  # module whose output is the MLP term added to the residual
    down_proj: str | None = None  # module whose input is the MLP hidden activation
    mlp_in: str | None = None  # module whose input is the (normed) MLP input; default: the MLP module
    sequential: bool = True  # resid.i == resid.{i-1} + attn.i + mlp.i holds


_GEMMA_POSTNORM = ArchOverride(attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")
_BERT = ArchOverride(
    attn_out="attention.output.dense", mlp_out="output.dense", down_proj="output.dense", mlp_in="intermediate",
    sequential=False,
)
_OVERRIDES: dict[str, ArchOverride] = {
    "gemma2": _GEMMA_POSTNORM,
    "gemma3": _GEMMA_POSTNORM,
    "gemma3_text": _GEMMA_POSTNORM,
    "opt": ArchOverride(mlp_out="fc2", down_proj="fc2", mlp_in="fc1"),
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
}

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "mixer")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_DOWN_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out", "dense", "proj_out")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm", "norm_f")
_BLOCK_LIST_NAMES = ("layers", "h", "layer", "blocks", "block")

SITE_KINDS = ("embed", "resid", "attn", "mlp", "mlp.in", "mlp.hidden", "final")


def middle_layer(n_layers: int) -> int:
    """The layer whose relative depth (i + 1) / n_layers is nearest one half (exact ties: the deeper one):
    where steering and Command-V act by default, since middle layers carry a text's register in every model
    we measured (docs/steering.md, docs/transfer.md)."""
    return min(range(n_layers), key=lambda k: (abs(2 * (k + 1) - n_layers), -k))


def _in_width(module: nn.Module) -> int | None:
    """Input width of a linear-like module (nn.Linear or GPT-2's transposed Conv1D)."""
    if hasattr(module, "in_features"):
        return int(module.in_features)
    weight = getattr(module, "weight", None)
    if weight is not None and type(module).__name__ == "Conv1D":
        return int(weight.shape[0])
    if weight is not None and weight.ndim == 2:
        return int(weight.shape[1])
    return None


def _text_config(config):
    return getattr(config, "text_config", None) or config


def model_type(hf_model: nn.Module) -> str:
    return str(getattr(_text_config(hf_model.config), "model_type", "") or "")


def d_model_of(hf_model: nn.Module) -> int:
    cfg = _text_config(hf_model.config)
    for attr in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int):
            return value
    raise ActlabError(f"cannot tell the residual width of {type(hf_model).__name__}: its config has no hidden_size")


def find_block_list(hf_model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: the longest list of identical blocks, preferring usual names."""
    cfg = _text_config(hf_model.config)
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    candidates: list[tuple[int, int, str, nn.ModuleList]] = []
    for name, module in hf_model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        leaf = name.rsplit(".", 1)[-1]
        score = (2 if n_layers == len(module) else 0) + (1 if leaf in _BLOCK_LIST_NAMES else 0)
        candidates.append((score, len(module), name, module))
    if not candidates:
        raise ActlabError(
            f"{type(hf_model).__name__}: no list of transformer blocks found; actlab supports models whose blocks "
            "are an nn.ModuleList (GPT-2, GPT-NeoX, Llama, Mistral, Qwen, Gemma, Phi-3, OPT, BERT and most others)"
        )
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    _, _, name, module = candidates[0]
    return name, module


def _first_child(block: nn.Module, names: Iterable[str]) -> str | None:
    for name in names:
        try:
            block.get_submodule(name)
        except AttributeError:
            continue
        return name
    return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


class SiteMap:
    """Canonical site names of one model, resolved to hook points, plus selector parsing."""

    def __init__(self, hf_model: nn.Module):
        self.model_class = type(hf_model).__name__
        self.model_type = model_type(hf_model)
        override = _OVERRIDES.get(self.model_type, ArchOverride())
        self.sequential = override.sequential
        self.blocks_path, blocks = find_block_list(hf_model)
        self.n_layers = len(blocks)
        self.d_model = d_model_of(hf_model)
        points: dict[str, HookPoint] = {"embed": HookPoint(_join(self.blocks_path, "0"), "input", self.d_model)}
        for i, block in enumerate(blocks):
            prefix = _join(self.blocks_path, str(i))
            points[f"resid.{i}"] = HookPoint(prefix, "output", self.d_model)
            attn = override.attn_out or _first_child(block, _ATTN_NAMES)
            if attn and _first_child(block, [attn]):
                points[f"attn.{i}"] = HookPoint(_join(prefix, attn), "output", self.d_model)
            mlp_name = _first_child(block, _MLP_NAMES)
            mlp_out = override.mlp_out or mlp_name
            if mlp_out and _first_child(block, [mlp_out]):
                points[f"mlp.{i}"] = HookPoint(_join(prefix, mlp_out), "output", self.d_model)
            down = override.down_proj
            if down is None and mlp_name:
                inner = _first_child(block.get_submodule(mlp_name), _DOWN_NAMES)
                down = _join(mlp_name, inner) if inner else None
            if down and _first_child(block, [down]):
                width = _in_width(block.get_submodule(down))
                if width:
                    points[f"mlp.hidden.{i}"] = HookPoint(_join(prefix, down), "input", width)
            mlp_in = override.mlp_in or mlp_name
            if mlp_in and _first_child(block, [mlp_in]):
                points[f"mlp.in.{i}"] = HookPoint(_join(prefix, mlp_in), "input", self.d_model)
        final = self._find_final_norm(hf_model)
        if final is not None:
            points["final"] = HookPoint(final, "output", self.d_model)
        self.points = points
        self.views: dict[str, object] = {}  # virtual sites (engine.hooks.SiteView), e.g. an SAE's latents

    def add_view(self, name: str, base: str, view, width: int) -> None:
        """Register the virtual site ``name``, computed by ``view`` at the hook point of ``base``."""
        point = self[base]
        if name in self.points and name not in self.views:
            raise ActlabError(f"'{name}' is already a site of {self.model_class}; choose another name")
        if not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z0-9_]+)+", name):
            raise ActlabError(f"a virtual site needs a dotted lower-case name such as 'sae.resid.2', not {name!r}")
        self.points[name] = HookPoint(point.module_path, point.mode, int(width))
        self.views[name] = view

    def remove_view(self, name: str) -> None:
        if self.views.pop(name, None) is not None:
            self.points.pop(name, None)

    def _find_final_norm(self, hf_model: nn.Module) -> str | None:
        parent = self.blocks_path.rsplit(".", 1)[0] if "." in self.blocks_path else ""
        parent_module = hf_model.get_submodule(parent) if parent else hf_model
        for name in _FINAL_NORM_NAMES:
            child = getattr(parent_module, name, None)
            if isinstance(child, nn.Module):
                return _join(parent, name)
        return None

    # ----------------------------------------------------------------- queries
    @property
    def widths(self) -> dict[str, int]:
        return {name: point.width for name, point in self.points.items()}

    @property
    def d_mlp(self) -> int | None:
        point = self.points.get("mlp.hidden.0")
        return point.width if point else None

    def __contains__(self, site: str) -> bool:
        return site in self.points

    def __getitem__(self, site: str) -> HookPoint:
        if site not in self.points:
            self.resolve([site])  # raises the helpful error
        return self.points[site]

    def input_site(self, site: str) -> str:
        """The site feeding ``site`` in the same pass: ``resid.{i-1}`` (``embed``) for ``resid.i``,
        ``mlp.in.i`` for ``mlp.i``; what ``Replace`` reads by default."""
        self[site]  # validates the name
        source = default_input_site(site)
        if source not in self.points:
            raise ActlabError(f"{self.model_class} has no site '{source}', the input of '{site}'; "
                              f"available sites: {self.describe()}")
        return source

    def layer_of(self, site: str) -> int | None:
        match = re.search(r"\.(\d+)$", site)
        return int(match.group(1)) if match else None

    def describe(self) -> str:
        kinds: dict[str, list[int]] = {}
        singles = []
        for name in self.points:
            layer = self.layer_of(name)
            if layer is None:
                singles.append(name)
            else:
                kinds.setdefault(name.rsplit(".", 1)[0], []).append(layer)
        parts = singles[:1] + [f"{k}.{{{min(v)}..{max(v)}}}" for k, v in kinds.items()] + singles[1:]
        return ", ".join(parts)

    # --------------------------------------------------------------- selectors
    def resolve(self, selectors: str | Iterable[str]) -> list[str]:
        """Expand selectors into site names, in model order, without duplicates.

        ``resid.*`` (all layers), ``mlp.hidden.1-3`` (inclusive range), ``resid.-1`` (last layer),
        ``resid.mid`` (the middle layer, ``middle_layer``), ``resid.0,attn.0`` (comma lists) and exact names
        are accepted.
        """
        if isinstance(selectors, str):
            selectors = [selectors]
        wanted: set[str] = set()
        for raw in selectors:
            for selector in (s.strip() for s in str(raw).split(",")):
                if selector:
                    wanted.update(self._expand(selector))
        if not wanted:
            raise ActlabError(f"no sites given; {self.model_class} has: {self.describe()}")
        return [name for name in self.points if name in wanted]

    def _expand(self, selector: str) -> list[str]:
        if selector in self.points:
            return [selector]
        if selector in ("*", "all"):
            return [name for name in self.points if name not in self.views]
        match = re.fullmatch(r"([a-z_.]+?)\.(\*|-?\d+|\d+-\d+|mid)", selector)
        if not match:
            self._unknown(selector)
        kind, index = match.group(1), match.group(2)
        if kind not in SITE_KINDS or kind in ("embed", "final"):
            self._unknown(selector)
        available = [i for i in range(self.n_layers) if f"{kind}.{i}" in self.points]
        if not available:
            raise ActlabError(
                f"{self.model_class} has no '{kind}' sites (actlab could not locate that sub-layer in this "
                f"architecture); available sites: {self.describe()}"
            )
        if index == "*":
            layers = available
        elif index == "mid":
            layers = [middle_layer(self.n_layers)]
        elif re.fullmatch(r"\d+-\d+", index):
            lo, hi = (int(x) for x in index.split("-"))
            if lo > hi:
                raise ActlabError(f"site range '{selector}' is empty: write the lower layer first, e.g. {kind}.{hi}-{lo}")
            layers = list(range(lo, hi + 1))
        else:
            i = int(index)
            layers = [i + self.n_layers if i < 0 else i]
        for layer in layers:
            if not 0 <= layer < self.n_layers:
                raise ActlabError(
                    f"site '{selector}': layer {layer} is out of range; {self.model_class} has {self.n_layers} layers "
                    f"(0..{self.n_layers - 1}, or -1 for the last)"
                )
        return [f"{kind}.{layer}" for layer in layers]

    def _unknown(self, selector: str):
        if selector.startswith("sae."):
            raise ActlabError(f"'{selector}' is the site of an attached SAE's latents, and no SAE is attached there: "
                              f"attach one first (actlab.sae.attach(model, sae, '{selector[4:]}'), or --sae FILE)")
        raise ActlabError(
            f"unknown site '{selector}' for {self.model_class}; available sites: {self.describe()} "
            "(selectors: resid.*, mlp.hidden.1-3, resid.-1, resid.mid)"
        )
