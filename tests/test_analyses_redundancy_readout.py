"""Module redundancy (He et al. 2024) and the neuron readout through the unembedding."""

import copy
import json
import math

import numpy as np
import pytest
import torch

import actlab
from actlab.analyses.base import Skipped, log_perplexity
from actlab.analyses.readout import ReadoutResult, neuron_output_vectors, neuron_readout
from actlab.analyses.redundancy import RedundancyResult, drop_attention, mean_cosine, module_redundancy
from test_analyses_linear_lens import TextTokenizer, make_model, profile, random_texts
from tiny_models import tiny_hf_model


def cos_rows(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


# ----------------------------------------------------------------------------------------- redundancy

@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox", "bert"])
def test_redundancy_cosine_equals_direct_computation(arch):
    model = make_model(arch)
    texts = random_texts(12)
    n = model.n_layers
    sites = ["embed"] + [f"{k}.{i}" for k in ("resid", "attn", "mlp") for i in range(n)]
    mlp_inputs = {}
    handles = []
    if arch == "bert":  # the MLP input of a post-LN block, read straight from the model
        for i in range(n):
            module = model.hf.get_submodule(f"encoder.layer.{i}.intermediate")
            handles.append(module.register_forward_hook(lambda m, a, o, i=i: mlp_inputs.__setitem__(i, a[0])))
    try:
        with model.capture(sites) as cap:
            model(texts)
    finally:
        for h in handles:
            h.remove()
    flat = {s: cap.flat(s) for s in sites}
    result = module_redundancy(model, profile(model, texts))
    assert isinstance(result, RedundancyResult) and result.drops == []
    expected_structure = {"llama": "sequential", "gemma2": "sequential", "gpt_neox": "parallel", "bert": "post-ln"}
    assert result.structure == model.anatomy.structure == expected_structure[arch]
    for i in range(n):
        x = flat["embed"] if i == 0 else flat[f"resid.{i - 1}"]
        attn_out = x + flat[f"attn.{i}"]
        if arch == "bert":
            mid = mlp_inputs[i][cap.mask.bool()]
            mlp = (mid, mid + flat[f"mlp.{i}"])
        elif arch == "gpt_neox":
            mlp = (x, x + flat[f"mlp.{i}"])
        else:
            mlp = (attn_out, flat[f"resid.{i}"])
        assert result.attn_cos[i] == pytest.approx(cos_rows(x, attn_out), abs=1e-5)
        assert result.mlp_cos[i] == pytest.approx(cos_rows(*mlp), abs=1e-5)
    assert sorted(result.ranking) == list(range(n))
    assert result.attn_cos[result.ranking[0]] == max(result.attn_cos)
    assert mean_cosine(flat["embed"], 3 * flat["embed"]) == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dropping_attention_equals_zeroing_its_output_projection(arch):
    model = make_model(arch)
    eval_texts = random_texts(6, seed=3)
    layers = [0, 2]
    with model.edit(drop_attention(layers)):
        with model.capture("attn.*") as cap:
            edited = model(eval_texts[:2]).logits
        edited_ppl = log_perplexity(model, eval_texts)
    assert all(float(cap[f"attn.{i}"].abs().max()) == 0 for i in layers)
    manual = copy.deepcopy(tiny_hf_model(arch))  # the attention output projection set to zero by hand
    for i in layers:
        proj = manual.model.layers[i].self_attn.o_proj if arch == "llama" else manual.transformer.h[i].attn.c_proj
        with torch.no_grad():
            proj.weight.zero_()
            if proj.bias is not None:
                proj.bias.zero_()
    manual_model = actlab.load(manual, tokenizer=TextTokenizer())
    torch.testing.assert_close(edited, manual_model(eval_texts[:2]).logits, rtol=1e-5, atol=1e-5)
    assert edited_ppl == pytest.approx(log_perplexity(manual_model, eval_texts), rel=1e-6)
    assert float((edited - model(eval_texts[:2]).logits).abs().max()) > 1e-4  # the edit did something


def test_redundancy_drop_experiment_and_report_members():
    model = make_model("llama")
    data = profile(model, random_texts(20), eval_texts=random_texts(6, seed=3))
    result = module_redundancy(model, data, ks=(1, 2, 5))
    assert sorted({d["k"] for d in result.drops}) == [1, 2]  # k must be smaller than the number of layers
    most2 = result.drop(2, "most")
    assert most2["layers"] == sorted(result.ranking[:2])
    assert result.drop(1, "least")["layers"] == [result.ranking[-1]]
    with model.edit(drop_attention(most2["layers"])):
        assert most2["perplexity"] == pytest.approx(math.exp(log_perplexity(model, data.eval_texts)), rel=1e-6)
    assert result.base_perplexity == pytest.approx(math.exp(log_perplexity(model, data.eval_texts)), rel=1e-6)
    # the random baseline: distinct draws (every subset when there are few), each reproducible, and their mean
    n = model.n_layers
    for k in (1, 2):
        rand = result.drop(k, "random")
        subsets = [tuple(r["layers"]) for r in rand["draws"]]
        assert len(set(subsets)) == len(subsets) == min(5, math.comb(n, k)) and all(len(s) == k for s in subsets)
        values = [r["perplexity"] for r in rand["draws"]]
        assert rand["perplexity"] == pytest.approx(np.mean(values)) and rand["perplexity_std"] == pytest.approx(np.std(values))
        with model.edit(drop_attention(rand["draws"][0]["layers"])):
            assert values[0] == pytest.approx(math.exp(log_perplexity(model, data.eval_texts)), rel=1e-6)
        most = result.drop(k, "most")["perplexity"]
        assert ("lower than all" in rand["most_vs_random"]) == (most < min(values))
        assert ("not lower" in rand["most_vs_random"]) == (most >= np.mean(values))
    assert not model.hooks.active
    payload = json.loads(json.dumps(result.to_dict()))
    assert len(payload["drops"]) == 6 and payload["structure"] == "sequential"
    assert len(result.figures()) == 2 and len(result.table()[1]) == 6
    assert "He et al." in result.explanation and "drop 2" in result.headline()


def test_redundancy_on_encoder_runs_without_dropping():
    model = make_model("bert")
    result = module_redundancy(model, profile(model, random_texts(12)), eval_texts=["abc def"])
    assert result.base_perplexity is None and "no LM head" in result.note
    assert all(-1 <= c <= 1 for c in result.attn_cos + result.mlp_cos)


# ------------------------------------------------------------------------------------------- readout

@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "gemma2"])
def test_readout_ranks_planted_token_first(arch):
    hf = copy.deepcopy(tiny_hf_model(arch))
    model = actlab.load(hf, tokenizer=TextTokenizer())
    layer, neuron, token = 1, 7, 42
    unembed = hf.get_output_embeddings().weight.detach()
    module = hf.get_submodule(model.sitemap[f"mlp.hidden.{layer}"].module_path)
    with torch.no_grad():
        if type(module).__name__ == "Conv1D":  # GPT-2 stores [d_mlp, d_model]
            module.weight[neuron, :] = unembed[token]
        else:
            module.weight[:, neuron] = unembed[token]
    torch.testing.assert_close(neuron_output_vectors(model, layer)[neuron], unembed[token])
    result = neuron_readout(model, top_tokens=5)
    assert isinstance(result, ReadoutResult)
    row = int(((result.layer == layer) & (result.neuron == neuron)).nonzero())
    assert int(result.top_ids[row, 0]) == token
    assert result.layer.numel() == model.n_layers * model.d_mlp
    assert result.top_ids.shape == (result.layer.numel(), 5)
    raw = neuron_readout(model, top_tokens=3, normed=False)
    assert int(raw.top_ids[row, 0]) == token


def test_readout_table_dict_and_encoder_skip():
    model = make_model("llama")
    result = neuron_readout(model, top_tokens=4)
    payload = json.loads(json.dumps(result.to_dict()))
    rows = payload["neurons"]["rows"]
    assert len(rows) == model.n_layers * model.d_mlp
    assert payload["neurons"]["columns"] == ["layer", "neuron", "top_token_ids", "top_tokens", "score", "entropy"]
    layer, neuron, ids, strings, score, entropy = rows[0]
    assert len(ids) == len(strings) == 4 and 0 < score <= 1 and entropy >= 0
    cols, top = result.table()
    assert len(top) == 20 and [r[0] for r in top] == list(range(1, 21))
    scores = [r[3] for r in top]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(float(result.score.max()), abs=1e-4)
    assert len(result.figures()) == 1 and "L" in result.headline()
    bert = make_model("bert")
    skipped = neuron_readout(bert)
    assert isinstance(skipped, Skipped) and "LM head" in skipped.reason
