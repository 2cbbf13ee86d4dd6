"""An exact change of basis of the residual stream of a Llama-family HF model: h' = h Q.

Why: a recipient that computes exactly the donor's function in a rotated basis is a model pair
whose correct Command-V answer is known (a donor edit v must paste as v Q). The HF-specific work
(which Linear reads or writes the residual stream) lives here, in ``models/``, where the rest of
actlab is allowed to know HF module names.

The recipe: fold every RMSNorm gain into the linear layers that read its output (so each norm is
``x / rms(x)``, which commutes with an orthonormal Q), then every weight that reads the residual
becomes ``W Q`` (embedding rows, q/k/v, gate/up, the unembedding) and every weight that writes it
``Qᵀ W`` (o_proj, down_proj, and their biases ``b Q``). Tied embeddings are untied first: after
folding the final norm the unembedding no longer equals the embedding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from actlab.errors import ActlabError
from actlab.models.sites import model_type

# decoder blocks with exactly Llama's layout: pre-RMSNorm (gain `weight`, no offset), attention q/k/v/o and a
# gated MLP gate/up/down, a final RMSNorm and an untied-able lm_head (per-head q/k norms, as Qwen3 has, do not
# touch the residual stream)
ROTATABLE_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def random_orthonormal(d: int, seed: int = 0) -> torch.Tensor:
    """A seeded random orthonormal [d, d] matrix (float64): QR of a Gaussian matrix with the signs fixed."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs


def check_rotatable(hf_model: nn.Module) -> None:
    """Raise unless ``hf_model`` is a causal LM with Llama's block layout."""
    kind = model_type(hf_model)
    if kind not in ROTATABLE_TYPES or not hasattr(hf_model, "lm_head"):
        raise ActlabError(f"a residual-stream rotation needs a Llama-family causal LM ({', '.join(ROTATABLE_TYPES)}),"
                          f" not {kind or type(hf_model).__name__}: other blocks (LayerNorm offsets, post-norms, "
                          "parallel attention) do not commute with a change of basis by this recipe")


def _read(linear: nn.Linear, q: torch.Tensor, gain: torch.Tensor | None = None) -> None:
    """A Linear reading the (normalised) residual: weight [out, d] ← (weight · gain) Q."""
    w = linear.weight.double()
    if gain is not None:
        w = w * gain.double()
    linear.weight.copy_((w @ q).to(linear.weight.dtype))


def _write(linear: nn.Linear, q: torch.Tensor) -> None:
    """A Linear writing the residual: weight [d, in] ← Qᵀ weight, bias ← bias Q."""
    linear.weight.copy_((q.T @ linear.weight.double()).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.double() @ q).to(linear.bias.dtype))


def _rotate_blocks(body: nn.Module, q: torch.Tensor) -> None:
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            _read(lin, q, layer.input_layernorm.weight)
        for lin in (mlp.gate_proj, mlp.up_proj):
            _read(lin, q, layer.post_attention_layernorm.weight)
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
        _write(attn.o_proj, q)
        _write(mlp.down_proj, q)


def rotate_residual(hf_model: nn.Module, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``(rotated deep copy, Q)``: the same function with residual stream h Q (module docstring); the
    input model is not modified. Q is float32, [d_model, d_model], orthonormal."""
    check_rotatable(hf_model)
    out = copy.deepcopy(hf_model)
    body, head = out.model, out.lm_head
    q = random_orthonormal(out.config.hidden_size, seed)
    with torch.no_grad():
        emb = body.embed_tokens.weight
        unembed = (head.weight.double() * body.norm.weight.double()) @ q
        head.weight = nn.Parameter(unembed.to(head.weight.dtype), requires_grad=head.weight.requires_grad)
        out.config.tie_word_embeddings = False  # the folded unembedding is its own matrix now
        emb.copy_((emb.double() @ q).to(emb.dtype))
        body.norm.weight.fill_(1.0)
        _rotate_blocks(body, q)
    return out, q.float()
