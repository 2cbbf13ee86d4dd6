"""Per-architecture knowledge the site tests check actlab against, written out independently of actlab."""

from __future__ import annotations

import torch

#: the norm applied to the MLP's input, per architecture (pre-norm archs)
MLP_NORM = {"gpt2": "ln_2", "opt": "final_layer_norm", "gemma2": "pre_feedforward_layernorm",
            "gemma3": "pre_feedforward_layernorm", "gpt_neox": "post_attention_layernorm"}


def block(model, layer: int):
    return model.hf.get_submodule(model.sitemap[f"resid.{layer}"].module_path)


def mlp_norm(model, arch: str, layer: int):
    return getattr(block(model, layer), MLP_NORM.get(arch, "post_attention_layernorm"))


def mlp_of(model, arch: str, layer: int):
    """The function the architecture applies to the MLP input to get its residual term ``mlp.{layer}``."""
    b = block(model, layer)
    if arch == "opt":
        return lambda x: b.fc2(b.activation_fn(b.fc1(x)))
    if arch == "bert":
        return lambda x: b.output.dense(b.intermediate(x))
    if arch in ("gemma2", "gemma3"):
        return lambda x: b.post_feedforward_layernorm(b.mlp(x))
    return b.mlp


def bert_attention_output(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """What BERT's attention sub-layer hands the intermediate module, read with a plain torch hook."""
    seen = {}

    def keep(module, args, out) -> None:
        seen["h"] = out[0] if isinstance(out, tuple) else out

    handle = block(model, layer).attention.register_forward_hook(keep)
    try:
        with torch.no_grad():
            model.hf(input_ids=ids)
    finally:
        handle.remove()
    return seen["h"]
