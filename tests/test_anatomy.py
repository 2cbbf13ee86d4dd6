"""The anatomy: MLP parts rebuild the MLP, decoding reproduces the logits, block structure, on every architecture."""

import pytest
import torch
import transformers as T

import actlab
from actlab.errors import ActlabError
from actlab.models.anatomy import Anatomy, MLPParts
from tiny_models import ARCHS, VOCAB, ByteTokenizer, tiny_config, tiny_model

TEXTS = ["the quick brown fox jumps over the lazy dog", "colorless green ideas", "To be, or not to be"]
CAUSAL = [a for a in ARCHS if a != "bert"]
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"}
# block-relative module whose first input is the MLP input (after its norm), read straight from the model
MLP_INPUT_MODULE = {"opt": "fc1", "bert": "intermediate"}
ACT_NAMES = {"gpt2": "relu", "gpt_neox": "gelu", "opt": "relu", "bert": "gelu", "gemma": "gelu_pytorch_tanh",
             "gemma2": "gelu_pytorch_tanh", "gemma3": "gelu_pytorch_tanh"}


def anatomy_of(model) -> Anatomy:
    return getattr(model, "anatomy", None) or Anatomy(model)


def run_with_mlp_hooks(model, layer: int):
    """Run TEXTS; return (MLP input, down-projection output) of ``layer`` from torch hooks, and the capture."""
    hf, block = model.hf, f"{model.sitemap.blocks_path}.{layer}"
    seen = {}
    inp = hf.get_submodule(f"{block}.{MLP_INPUT_MODULE.get(model.sitemap.model_type, 'mlp')}")
    down = hf.get_submodule(model.sitemap[f"mlp.hidden.{layer}"].module_path)
    handles = [inp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
               down.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))]
    extra = [f"mlp.in.{layer}"] if f"mlp.in.{layer}" in model.sites else []
    try:
        with model.capture([f"mlp.hidden.{layer}", f"mlp.{layer}"] + extra) as cap:
            model(TEXTS)
    finally:
        for h in handles:
            h.remove()
    shape = (*cap.mask.shape, -1)  # OPT runs its MLP on [batch * length, d] rows
    return seen["x"].reshape(shape), seen["out"].reshape(shape), cap


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_parts_rebuild_the_mlp(arch):
    model = tiny_model(arch)
    anatomy = anatomy_of(model)
    for layer in range(model.n_layers):
        parts = anatomy.mlp_parts(layer)
        assert isinstance(parts, MLPParts) and parts.layer == layer
        assert parts.gated == (arch in GATED)
        assert parts.up.shape == (model.d_mlp, model.d_model) and parts.down.shape == (model.d_model, model.d_mlp)
        assert parts.gate is None or parts.gate.shape == parts.up.shape
        assert parts.act_name == ACT_NAMES.get(arch, "silu")
        x, out, cap = run_with_mlp_hooks(model, layer)
        with torch.no_grad():
            hidden, rebuilt = parts.hidden(x), parts(x)
        mask = cap.mask.bool()
        torch.testing.assert_close(hidden[mask], cap.flat(f"mlp.hidden.{layer}"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rebuilt, out, rtol=1e-5, atol=1e-5)
        if arch not in ("gemma2", "gemma3"):  # their mlp.i is the post-feedforward norm of the down output
            torch.testing.assert_close(rebuilt[mask], cap.flat(f"mlp.{layer}"), rtol=1e-5, atol=1e-5)
        if f"mlp.in.{layer}" in model.sites:
            torch.testing.assert_close(cap.flat(f"mlp.in.{layer}"), x[mask], rtol=0, atol=0)


def test_mlp_parts_on_random_input_match_the_module_forward():
    """Rebuilt MLPs equal the HF MLP module's own forward, including GPT-2's transposed Conv1D and Phi-3's fused
    gate_up_proj."""
    gen = torch.Generator().manual_seed(0)
    for arch in ("gpt2", "gpt_neox", "llama", "gemma2", "phi3"):
        model = tiny_model(arch)
        x = torch.randn(7, model.d_model, generator=gen)
        module = model.hf.get_submodule(f"{model.sitemap.blocks_path}.2.mlp")
        with torch.no_grad():
            torch.testing.assert_close(anatomy_of(model).mlp_parts(-1)(x), module(x), rtol=1e-5, atol=1e-5)


def test_mlp_parts_errors():
    anatomy = anatomy_of(tiny_model("llama"))
    with pytest.raises(ActlabError, match="layer 7"):
        anatomy.mlp_parts(7)


@pytest.mark.parametrize("arch", CAUSAL)
def test_decode_reproduces_the_model_logits(arch):
    model = tiny_model(arch)
    anatomy = anatomy_of(model)
    last = f"resid.{model.n_layers - 1}"
    with model.capture([last, "final"]) as cap:
        out = model(TEXTS)
    mask = cap.mask.bool()
    logits = out.logits[mask].float()
    with torch.no_grad():
        torch.testing.assert_close(anatomy.decode(cap.flat(last)), logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(anatomy.unembed(cap.flat("final")), logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(anatomy.normed(cap.flat(last)), cap.flat("final"), rtol=1e-5, atol=1e-5)
    assert anatomy.vocab_size == VOCAB


def test_gemma2_softcapping():
    config = tiny_config("gemma2")
    config.final_logit_softcapping = 0.05  # below the largest raw logits: the cap bites
    torch.manual_seed(0)
    model = actlab.load(T.AutoModelForCausalLM.from_config(config).eval(), tokenizer=ByteTokenizer())
    anatomy = anatomy_of(model)
    assert anatomy.softcap == 0.05
    with model.capture("final") as cap:
        out = model(TEXTS)
    h = cap.flat("final")
    with torch.no_grad():
        logits = anatomy.unembed(h)
        raw = anatomy.lm_head(h).float()
    torch.testing.assert_close(logits, out.logits[cap.mask.bool()].float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, 0.05 * torch.tanh(raw / 0.05))
    assert float(logits.abs().max()) < 0.05 < float(raw.abs().max())
    assert anatomy_of(tiny_model("llama")).softcap is None


def test_opt_project_out():
    config = tiny_config("opt")
    config.word_embed_proj_dim = 16  # != hidden_size: project_in / project_out exist
    torch.manual_seed(0)
    model = actlab.load(T.AutoModelForCausalLM.from_config(config).eval(), tokenizer=ByteTokenizer())
    anatomy = anatomy_of(model)
    assert anatomy.project_out is not None and anatomy.project_out.weight.shape == (16, model.d_model)
    last = f"resid.{model.n_layers - 1}"
    with model.capture([last, "final"]) as cap:
        out = model(TEXTS)
    logits = out.logits[cap.mask.bool()].float()
    with torch.no_grad():
        torch.testing.assert_close(anatomy.decode(cap.flat(last)), logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(anatomy.unembed(cap.flat("final")), logits, rtol=1e-4, atol=1e-4)
    assert anatomy_of(tiny_model("opt")).project_out is None  # word_embed_proj_dim == hidden_size


def test_block_structure_and_post_ln_norm():
    expected = {"gpt2": "sequential", "llama": "sequential", "gemma2": "sequential", "gpt_neox": "parallel",
                "bert": "post-ln"}
    for arch, structure in expected.items():
        anatomy = anatomy_of(tiny_model(arch))
        assert anatomy.structure == structure
        assert anatomy.parallel_residual == (structure == "parallel")
    bert = tiny_model("bert")
    norm = anatomy_of(bert).post_attn_norm(1)
    assert norm is bert.hf.get_submodule("encoder.layer.1.attention.output.LayerNorm")
    assert anatomy_of(tiny_model("llama")).post_attn_norm(1) is None


def test_encoder_has_no_unembedding():
    anatomy = anatomy_of(tiny_model("bert"))
    assert anatomy.lm_head is None and anatomy.final_norm is None
    with pytest.raises(ActlabError, match="no LM head"):
        anatomy.decode(torch.zeros(1, 32))
