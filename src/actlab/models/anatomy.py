"""The anatomy of a loaded model: every structural fact the rest of actlab asks for, by role.

The site map (``sites.py``) says *where* to hook; the anatomy says *what the parts are*: the final
norm and the unembedding (OPT's ``project_out``, Gemma's final-logit softcapping), whether a block
is sequential, parallel (attention and MLP read the same residual) or post-LN (BERT), the
LayerNorm a post-LN block applies after attention, and each MLP's weights in one orientation with
its activation function. Analyses, sparse-inference kernels and transcoders ask here, so a new
architecture is taught in ``models/`` once and nothing outside it reads an HF attribute by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Literal

import torch
from torch import nn
from torch.nn import functional as F

from actlab.errors import ActlabError

BlockStructure = Literal["sequential", "parallel", "post-ln"]

# model types whose blocks read attention and MLP from the same input (no config flag says so)
_PARALLEL_TYPES = {"phi", "gptj", "codegen", "cohere", "cohere2"}
# config flags that make a block parallel (GPT-NeoX, Falcon; Falcon-40B's new decoder architecture)
_PARALLEL_FLAGS = ("use_parallel_residual", "parallel_attn", "new_decoder_architecture")
# MLP input projections, relative to the down projection's parent or to the block
_FUSED_NAMES = ("gate_up_proj",)  # Phi-3: one Linear whose output is [gate | up]
_GATE_NAMES = ("gate_proj",)
_UP_NAMES = ("up_proj", "c_fc", "dense_h_to_4h", "fc1", "fc_in", "intermediate.dense")
# the activation: an attribute of the module that holds the input projection
_ACT_ATTRS = ("act_fn", "act", "activation_fn", "intermediate_act_fn", "activation")
_ACT_CONFIG_KEYS = ("hidden_activation", "hidden_act", "activation_function")
# the LayerNorm a post-LN block applies to (input + attention output), next to the attention output dense
_POST_LN_NAMES = ("LayerNorm", "layer_norm", "layernorm", "ln", "norm")
# attention projections under the attention module (BERT: q/k/v under ``.self``, the output under ``.output``)
_ATTN_MODULE_NAMES = ("self_attn", "attn", "attention", "self_attention")
_QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
_FUSED_QKV_NAMES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv")
_O_NAMES = ("o_proj", "out_proj", "c_proj", "dense")


@dataclass(frozen=True)
class MLPParts:
    """One block's MLP as plain tensors: ``down(act(gate(x)) * up(x))`` when gated, else ``down(act(up(x)))``.

    Weights are ``[out_features, in_features]`` like ``nn.Linear`` (GPT-2's transposed Conv1D is
    turned to match; Phi-3's fused ``gate_up_proj`` is split), detached views of the model's
    parameters: no copy, and in-place edits of the model show through.
    """

    layer: int
    up: torch.Tensor  # [d_mlp, d_model]
    down: torch.Tensor  # [d_model, d_mlp]
    act: Callable[[torch.Tensor], torch.Tensor]
    act_name: str  # the activation's name in transformers' ACT2FN (e.g. "silu", "gelu_pytorch_tanh")
    gate: torch.Tensor | None = None  # [d_mlp, d_model], gated MLPs only
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The neurons (``mlp.hidden.{layer}``) for MLP inputs ``x`` [..., d_model]."""
        up = F.linear(x, self.up, self.up_bias)
        if self.gate is None:
            return self.act(up)
        return self.act(F.linear(x, self.gate, self.gate_bias)) * up

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output (the down projection's) for inputs ``x`` [..., d_model]."""
        return F.linear(self.hidden(x), self.down, self.down_bias)


@dataclass(frozen=True)
class Projection:
    """One linear map of a block: ``weight`` [out, in] and ``bias`` as ``_linear`` gives them, and its module
    (to override with ``Anatomy.override_projection``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    module: nn.Module


@dataclass(frozen=True)
class AttnParts:
    """One block's attention projections by the input they read: ``qkv`` (q, k, v, or one fused projection:
    all read the attention's input, the normed residual) and ``o`` (reads the heads' concatenated outputs)."""

    layer: int
    qkv: tuple[Projection, ...]
    o: Projection


def _linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias) of an nn.Linear or of GPT-2's Conv1D (whose weight is [in, out])."""
    weight = module.weight.detach()
    if type(module).__name__ == "Conv1D":
        weight = weight.T
    bias = getattr(module, "bias", None)
    return weight, (bias.detach() if isinstance(bias, torch.Tensor) else None)


def _child(root: nn.Module, prefix: str, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The first of ``names`` that exists under ``root.<prefix>``, as (full path, module)."""
    for name in names:
        path = f"{prefix}.{name}" if prefix else name
        try:
            return path, root.get_submodule(path)
        except AttributeError:
            continue
    return None


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


class Anatomy:
    """Structural questions about one ``actlab.Model``, answered without the caller knowing HF names.

    Build it once per model (``model.anatomy``); modules are looked up on first use.
    """

    def __init__(self, model):
        self.model = model
        self._hf = model.hf
        self._sitemap = model.sitemap
        config = model.hf.config
        self._config = getattr(config, "text_config", None) or config

    def __repr__(self) -> str:
        return f"Anatomy({self._sitemap.model_class}, {self.structure}, softcap={self.softcap})"

    # --------------------------------------------------------------- blocks
    @property
    def parallel_residual(self) -> bool:
        """True when attention and MLP of a block both read the block input (GPT-NeoX, Phi-1/2, GPT-J, Falcon)."""
        if any(getattr(self._config, flag, False) for flag in _PARALLEL_FLAGS):
            return True
        return self._sitemap.model_type in _PARALLEL_TYPES

    @property
    def structure(self) -> BlockStructure:
        """'post-ln' (BERT family), 'parallel' or 'sequential' (pre-LN: resid.i = resid.{i-1} + attn.i + mlp.i)."""
        if not self._sitemap.sequential:
            return "post-ln"
        return "parallel" if self.parallel_residual else "sequential"

    def post_attn_norm(self, layer: int) -> nn.Module | None:
        """The LayerNorm a post-LN block applies to (input + attention output), e.g. BERT's
        ``attention.output.LayerNorm``; None when the block has none (every pre-LN architecture)."""
        site = f"attn.{layer}"
        if self.structure != "post-ln" or site not in self._sitemap:
            return None
        found = _child(self._hf, _parent(self._sitemap[site].module_path), _POST_LN_NAMES)
        return found[1] if found else None

    # ------------------------------------------------------------ unembedding
    @cached_property
    def final_norm(self) -> nn.Module | None:
        """The final norm (the ``final`` site's module); None for models without one (BERT)."""
        if "final" not in self._sitemap:
            return None
        return self._hf.get_submodule(self._sitemap["final"].module_path)

    @cached_property
    def project_out(self) -> nn.Module | None:
        """OPT's projection from d_model to the embedding width, between the final norm and the LM head."""
        if "final" not in self._sitemap:
            return None
        project = getattr(self._hf.get_submodule(_parent(self._sitemap["final"].module_path)), "project_out", None)
        return project if isinstance(project, nn.Module) else None

    @cached_property
    def lm_head(self) -> nn.Module | None:
        """The output embeddings (unembedding); None for encoders."""
        get = getattr(self._hf, "get_output_embeddings", None)
        return get() if get is not None else None

    @property
    def softcap(self) -> float | None:
        """Gemma 2/3's final-logit softcapping: ``logits = cap · tanh(logits / cap)``; None when off."""
        cap = getattr(self._config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    @property
    def vocab_size(self) -> int:
        return int(self._head().weight.shape[0])

    def _head(self) -> nn.Module:
        if self.lm_head is None:
            raise ActlabError(f"{self._sitemap.model_class} has no LM head (an encoder); "
                              "there is nothing to decode with")
        return self.lm_head

    def _as_model_input(self, h: torch.Tensor) -> torch.Tensor:
        return h.to(self.model.device, self.model.dtype)

    def normed(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm applied to residual vectors ``h`` [..., d_model]: what the ``final`` site holds."""
        h = self._as_model_input(h)
        return h if self.final_norm is None else self.final_norm(h)

    def unembed(self, h_normed: torch.Tensor) -> torch.Tensor:
        """Logits (float32, on the model's device) of final-norm outputs: ``project_out`` (OPT), the
        LM head, then Gemma's softcapping. ``unembed`` of the ``final`` site is the model's logits."""
        head = self._head()
        h = self._as_model_input(h_normed)
        if self.project_out is not None:
            h = self.project_out(h)
        logits = head(h).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of residual vectors (final norm → project_out → LM head → softcap): the logit lens.
        ``decode`` of the last block's output is the model's logits. Gradients flow; wrap in no_grad."""
        return self.unembed(self.normed(h))

    # ------------------------------------------------------------------- MLP
    def mlp_parts(self, layer: int) -> MLPParts:
        """The MLP of block ``layer`` (negative counts from the end): weights ([out, in]), biases, activation."""
        if isinstance(layer, int) and layer < 0:
            layer += self._sitemap.n_layers
        site = f"mlp.hidden.{layer}"
        if not isinstance(layer, int) or site not in self._sitemap:
            raise ActlabError(
                f"{self._sitemap.model_class} has no MLP down projection at layer {layer!r} (no '{site}' site); "
                f"layers are 0..{self._sitemap.n_layers - 1}"
            )
        down_path = self._sitemap[site].module_path
        down, down_bias = _linear(self._hf.get_submodule(down_path))
        for prefix in dict.fromkeys((_parent(down_path), self._block_path(layer))):  # MLP module, then block
            fused = _child(self._hf, prefix, _FUSED_NAMES)
            if fused is not None:
                weight, bias = _linear(fused[1])
                gate, up = weight.chunk(2, dim=0)
                gate_bias, up_bias = bias.chunk(2) if bias is not None else (None, None)
                act, name = self._activation(_parent(fused[0]))
                return MLPParts(layer, up, down, act, name, gate, up_bias, down_bias, gate_bias)
            up_found = _child(self._hf, prefix, _UP_NAMES)
            if up_found is not None:
                up, up_bias = _linear(up_found[1])
                gate_found = _child(self._hf, prefix, _GATE_NAMES)
                gate, gate_bias = _linear(gate_found[1]) if gate_found else (None, None)
                act, name = self._activation(_parent(up_found[0]))
                return MLPParts(layer, up, down, act, name, gate, up_bias, down_bias, gate_bias)
        raise ActlabError(f"{self._sitemap.model_class}: no MLP input projection found in block {layer} "
                          f"(looked for {', '.join(_FUSED_NAMES + _GATE_NAMES + _UP_NAMES)})")

    def post_mlp_norm(self, layer: int) -> nn.Module | None:
        """The norm a block applies to its MLP's output before adding it to the residual (Gemma 2/3's
        post-feedforward norm): ``mlp.{layer}`` holds this norm of ``mlp_parts(layer)(mlp.in.{layer})``.
        None where ``mlp.{layer}`` is the MLP's own output (every other architecture)."""
        site, hidden = f"mlp.{layer}", f"mlp.hidden.{layer}"
        if site not in self._sitemap or hidden not in self._sitemap:
            return None
        path, down = self._sitemap[site].module_path, self._sitemap[hidden].module_path
        return None if path in (down, _parent(down)) else self._hf.get_submodule(path)

    def mlp_module(self, layer: int) -> nn.Module | None:
        """The one module that computes block ``layer``'s whole MLP: its input is ``mlp.in.{layer}`` and it holds
        the down projection (Llama family, GPT-2, GPT-NeoX, Phi-3, Gemma). None where the MLP is spread over the
        block (OPT's fc1 / fc2, BERT's intermediate / output)."""
        site, hidden = f"mlp.in.{layer}", f"mlp.hidden.{layer}"
        if site not in self._sitemap or hidden not in self._sitemap:
            return None
        path = self._sitemap[site].module_path
        if path != _parent(self._sitemap[hidden].module_path) or self._sitemap[site].mode != "input":
            return None
        return self._hf.get_submodule(path)

    def override_mlp(self, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Run ``fn(mlp input) -> MLP output`` instead of block ``layer``'s MLP module's own computation until the
        returned handle is removed; hooks on the module (``mlp.in``, ``mlp.{layer}`` where it is the module's
        output) still run, the module's children (``mlp.hidden``) do not. None where ``mlp_module`` is None.
        What a faster implementation of the same MLP (actlab.sparse) needs: the dense one is not computed."""
        from actlab.engine.hooks import Handle

        module = self.mlp_module(layer)
        if module is None:
            return None
        if "forward" in module.__dict__:
            raise ActlabError(f"the MLP of block {layer} is already overridden; remove the other override first")
        module.forward = lambda x, *args, **kwargs: fn(x)
        return Handle(lambda: module.__dict__.pop("forward", None))

    # ------------------------------------------------------------- attention
    def attn_parts(self, layer: int) -> AttnParts:
        """The attention projections of block ``layer``: fused (GPT-2's transposed Conv1D ``c_attn``, GPT-NeoX,
        Phi-3) or separate q / k / v, and the output projection."""
        block = self._block_path(layer)
        attn = _child(self._hf, block, _ATTN_MODULE_NAMES) if 0 <= layer < self._sitemap.n_layers else None
        if attn is None:
            raise ActlabError(f"{self._sitemap.model_class} has no attention module in block {layer!r} "
                              f"(looked for {', '.join(_ATTN_MODULE_NAMES)}); layers are 0..{self._sitemap.n_layers - 1}")
        proj = (lambda found: Projection(*_linear(found[1]), found[1]))  # noqa: E731
        qkv = None
        for prefix in (attn[0], f"{attn[0]}.self"):
            fused = _child(self._hf, prefix, _FUSED_QKV_NAMES)
            found = next((f for f in ([_child(self._hf, prefix, (n,)) for n in names] for names in _QKV_NAMES)
                          if all(f)), None)
            qkv = (proj(fused),) if fused else tuple(proj(f) for f in found) if found else None
            if qkv:
                break
        o = _child(self._hf, attn[0], _O_NAMES) or _child(self._hf, f"{attn[0]}.output", _O_NAMES)
        if not qkv or o is None:
            raise ActlabError(f"{self._sitemap.model_class}: no q/k/v or output projection found in '{attn[0]}'")
        return AttnParts(layer, qkv, proj(o))

    def override_projection(self, projection: Projection, fn: Callable):
        """Run ``fn(x, dense) -> output`` instead of ``projection``'s module (``dense``: the module's own forward,
        for a dense fallback) until the returned handle is removed; the module's hooks still run."""
        from actlab.engine.hooks import Handle

        module = projection.module
        if "forward" in module.__dict__:
            raise ActlabError(f"the projection {type(module).__name__} is already overridden; remove that first")
        dense = type(module).forward.__get__(module)
        module.forward = lambda x, *args, **kwargs: fn(x, dense)
        return Handle(lambda: module.__dict__.pop("forward", None))

    def set_mlp_activation(self, layer: int, act: nn.Module) -> None:
        """Replace block ``layer``'s MLP activation module (the one ``mlp_parts(layer).act`` is) with ``act``, in
        place: what ReLU-fication (actlab.sparse.relufy) does before fine-tuning."""
        old = self.mlp_parts(layer).act
        for module in self._hf.get_submodule(self._block_path(layer)).modules():
            name = next((a for a in _ACT_ATTRS if getattr(module, a, None) is old), None)
            if name is not None:
                setattr(module, name, act)
                return
        raise ActlabError(f"{self._sitemap.model_class}: the MLP activation of block {layer} is not a module attribute "
                          "that can be replaced")

    def _block_path(self, layer: int) -> str:
        return f"{self._sitemap.blocks_path}.{layer}" if self._sitemap.blocks_path else str(layer)

    def _activation(self, holder_path: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
        """The activation module the MLP's forward calls, and its ACT2FN name from the config."""
        holder = self._hf.get_submodule(holder_path) if holder_path else self._hf
        act = next((getattr(holder, a) for a in _ACT_ATTRS if callable(getattr(holder, a, None))), None)
        if act is None:
            raise ActlabError(f"{self._sitemap.model_class}: no activation function found on '{holder_path}' "
                              f"(looked for {', '.join(_ACT_ATTRS)})")
        return act, self._activation_name(act)

    def _activation_name(self, act) -> str:
        from transformers.activations import ACT2FN

        for key in _ACT_CONFIG_KEYS:
            name = getattr(self._config, key, None)
            if isinstance(name, str) and name in ACT2FN and type(ACT2FN[name]) is type(act):
                return name
        return type(act).__name__


__all__ = ["Anatomy", "AttnParts", "BlockStructure", "MLPParts", "Projection"]
