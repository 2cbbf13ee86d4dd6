"""Models split over devices (actlab.load(..., device_map=...)) behave exactly like the model on one device.

This machine has no second device, so the CPU tests split a tiny model between CPU memory and disk offload:
accelerate's hooks stream the offloaded blocks' weights from the offload folder at every forward (the
module's parameters sit on the meta device in between), which is the same machinery as a split over GPUs
with the same kernels, so outputs, captures, edits, statistics, SAE splices and generations must equal the
single-device model's bit for bit. The checks that move activations between real devices run where CUDA
has them (two GPUs; one GPU plus the CPU) and are skipped here.
"""

import copy
import json
import re

import pytest
import torch

import actlab
from actlab.engine.edits import Replace, SetChannels
from actlab.errors import ActlabError
from actlab.interventions import AffineMap, SteeringVector
from actlab.models.loading import zoo_models
from actlab.sae.model import SparseAutoencoder
from actlab.sae.splice import attach, latent_site, reconstruction
from actlab.stats.sink import StatsSink
from tiny_models import ByteTokenizer, tiny_hf_model

TEXTS = ["hello world, a split model", "abc", "the third text is a little longer than the others"]
LLAMA_MAP = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def reference():
    return actlab.load(copy.deepcopy(tiny_hf_model("llama")), tokenizer=ByteTokenizer())


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    return actlab.load(copy.deepcopy(tiny_hf_model("llama")), tokenizer=ByteTokenizer(), device_map=LLAMA_MAP,
                       offload_folder=folder)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    a, b = a.detach().cpu(), b.detach().cpu()
    return torch.equal(a, b) if atol == 0 else a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=0)


def _edits(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d, width = model.d_model, model.sites["mlp.hidden.2"]
    return [
        SteeringVector(site="resid.1", vector=torch.randn(d, generator=g), coef=2.0),
        AffineMap(site="mlp.1", bias=torch.randn(d, generator=g) * 0.1, diag=torch.randn(d, generator=g) * 0.1,
                  U=torch.randn(d, 2, generator=g) * 0.1, V=torch.randn(d, 2, generator=g) * 0.1),
        SetChannels("mlp.hidden.2", channels=torch.tensor([1, 5, width - 1]), values=0.5),
        Replace("resid.1", lambda x: 0.5 * x + 0.1),  # input resid.0 and output resid.1: two blocks, two devices
    ]


def check_same_behaviour(model, ref, atol: float = 0.0) -> None:
    """Everything a user does through the hooks gives on ``model`` what it gives on ``ref``."""
    sites = ref.resolve("embed,resid.*,attn.*,mlp.*,mlp.in.*,mlp.hidden.*,final")
    with ref.capture(sites) as a:
        want = ref(TEXTS).logits
    with model.capture(sites) as b:
        got = model(TEXTS).logits
    assert _close(got, want, atol)
    for site in sites:
        assert b[site].device.type == "cpu" and _close(b[site], a[site], atol), site
    # edits: each one alone, then all of them together, change the output the same way on both models
    for i, _ in enumerate(_edits(ref)):
        with ref.edit(_edits(ref)[i]):
            edited = ref(TEXTS).logits
        with model.edit(_edits(model)[i]):
            assert _close(model(TEXTS).logits, edited, atol), i
        assert not torch.allclose(edited, want)  # the edit does something
    with ref.edit(_edits(ref)), ref.capture("resid.2") as a:
        want_all = ref(TEXTS).logits
    with model.edit(_edits(model)), model.capture("resid.2") as b:
        assert _close(model(TEXTS).logits, want_all, atol)
    assert _close(b["resid.2"], a["resid.2"], atol)


def check_generation(model, ref) -> None:
    """Greedy generations with a steering vector on generated tokens only, with and without the KV cache."""
    vector = SteeringVector(site="resid.1", vector=torch.randn(ref.d_model, generator=torch.Generator().manual_seed(1)),
                            coef=3.0, positions="generated")
    for use_cache in (True, False):
        plain = ref.generate(TEXTS[:2], max_new_tokens=6, return_ids=True, use_cache=use_cache)
        assert torch.equal(model.generate(TEXTS[:2], max_new_tokens=6, return_ids=True, use_cache=use_cache), plain)
        with ref.edit(vector):
            steered = ref.generate(TEXTS[:2], max_new_tokens=6, return_ids=True, use_cache=use_cache)
        with model.edit(vector):
            assert torch.equal(model.generate(TEXTS[:2], max_new_tokens=6, return_ids=True, use_cache=use_cache),
                               steered)
        assert not torch.equal(steered, plain)


def check_streaming(model, ref, atol: float = 0.0) -> None:
    """collect / run with sinks: activations land where the caller asks, statistics equal the reference's."""
    sites = ["resid.0", "resid.2", "mlp.hidden.1"]
    want = ref.collect(TEXTS, sites, positions="all", batch_size=2)
    here = model.collect(TEXTS, sites, positions="all", batch_size=2, device=None)  # left where each site computed
    for site in sites:
        assert here.acts[site].device == model.site_device(site)
        assert _close(here.acts[site], want.acts[site], atol)
    assert torch.equal(here.token_ids, want.token_ids) and torch.equal(here.positions, want.positions)
    a, b = StatsSink(), StatsSink()
    ref.run(TEXTS, sites, [a], batch_size=2)
    model.run(TEXTS, sites, [b], batch_size=2)
    for site in sites:
        assert b[site].count == a[site].count > 0
        assert _close(b[site].mean, a[site].mean, atol) and _close(b[site].var, a[site].var, atol)


def check_sae(model, ref, atol: float = 0.0) -> None:
    """An SAE attached to a site of the split model: its latents and its spliced reconstruction."""
    sae = SparseAutoencoder(ref.d_model, 64, "topk", k=8, seed=3).eval().to(ref.site_device("resid.1"))
    placed = copy.deepcopy(sae).to(model.site_device("resid.1"))  # an SAE computes on its site's device
    with attach(ref, sae, "resid.1"), ref.capture(latent_site("resid.1")) as a:
        ref(TEXTS)
    with attach(model, placed, "resid.1"), model.capture(latent_site("resid.1")) as b:
        model(TEXTS)
    assert _close(b[latent_site("resid.1")], a[latent_site("resid.1")], atol)
    with ref.edit(reconstruction(sae, "resid.1")):
        want = ref(TEXTS).logits
    with model.edit(reconstruction(placed, "resid.1")):
        assert _close(model(TEXTS).logits, want, atol)


# ------------------------------------------------------------------------------------------ CPU + disk
def test_the_split_is_real(split):
    assert split.device_map == LLAMA_MAP
    offloaded = [n for n, p in split.hf.named_parameters() if p.device.type == "meta"]
    assert any(n.startswith("model.layers.1.") for n in offloaded) and "model.embed_tokens.weight" in offloaded
    assert not any(n.startswith("model.layers.0.") for n in offloaded)
    assert split.device == torch.device("cpu")  # inputs go to the embedding's execution device, not to meta
    assert split.devices == [torch.device("cpu")] and split.site_device("resid.2") == torch.device("cpu")


def test_known_answer_copies_refuse_a_split_model(split):
    from actlab.errors import ActlabError
    from actlab.experiments.known_pairs import finetuned_copy, rotated_copy

    with pytest.raises(ActlabError, match="split across devices"):
        rotated_copy(split)
    with pytest.raises(ActlabError, match="split across devices"):
        finetuned_copy(split, ["some text to fine-tune on"])


def test_split_model_outputs_captures_and_edits_equal_one_device(split, reference):
    check_same_behaviour(split, reference)


def test_split_model_generates_the_same_tokens(split, reference):
    check_generation(split, reference)


def test_split_model_streams_the_same_activations_and_statistics(split, reference):
    check_streaming(split, reference)


def test_sae_on_a_split_model(split, reference):
    check_sae(split, reference)


def test_identity_does_not_depend_on_placement(split, reference):
    assert split.weights_hash == reference.weights_hash  # offloaded weights are read back for the fingerprint
    vector = SteeringVector(site="resid.1", vector=torch.ones(reference.d_model), model=reference.identity())
    vector.check_model(split)
    from actlab.engine.likelihood import mean_nll

    pairs = [([5, 6, 7], [8, 9, 10, 11]), ([12, 13], [14, 15])]
    assert mean_nll(split, pairs, batch_size=2, prompt_length_known=True) == \
        mean_nll(reference, pairs, batch_size=2, prompt_length_known=True)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(folder)
    return folder


def test_checkpoint_loaded_straight_into_a_split(saved_llama, tmp_path):
    """From a folder: the map is checked on an empty meta-device model, then the weights load into place."""
    ref = actlab.load(saved_llama, tokenizer=ByteTokenizer())
    model = actlab.load(saved_llama, tokenizer=ByteTokenizer(), device_map=LLAMA_MAP, offload_folder=tmp_path)
    assert model.device_map == LLAMA_MAP
    check_same_behaviour(model, ref)


def test_auto_map_within_a_memory_budget(saved_llama, tmp_path):
    """'auto' with a CPU budget smaller than the model: accelerate keeps whole blocks on the CPU and sends the
    rest to disk; the model still computes the same thing."""
    ref = actlab.load(saved_llama, tokenizer=ByteTokenizer())
    model = actlab.load(saved_llama, tokenizer=ByteTokenizer(), device_map="auto", max_memory={"cpu": "60KB"},
                        offload_folder=tmp_path)
    placed = set(model.device_map.values())
    assert placed == {"cpu", "disk"}, model.device_map
    assert not any(re.match(r"model\.layers\.\d+\.", k) for k in model.device_map)  # blocks are never cut
    check_same_behaviour(model, ref)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "opt", "gemma2", "phi3"])
def test_other_architectures_split_auto(arch, tmp_path):
    """Other block layouts (GPT-2's Conv1D and tied head, OPT's flat MLP, Gemma 2's post-norms, Phi-3's fused MLP)
    split by an 'auto' map in a small CPU budget: every site and the logits equal the one-device model's."""
    ref = actlab.load(copy.deepcopy(tiny_hf_model(arch)), tokenizer=ByteTokenizer())
    size = sum(p.numel() * p.element_size() for p in ref.hf.parameters())
    model = actlab.load(copy.deepcopy(tiny_hf_model(arch)), tokenizer=ByteTokenizer(), device_map="auto",
                        max_memory={"cpu": size // 2}, offload_folder=tmp_path)
    assert set(model.device_map.values()) == {"cpu", "disk"}, model.device_map
    sites = list(ref.sites)
    with ref.capture(sites) as a:
        want = ref(TEXTS).logits
    with model.capture(sites) as b, model.edit(SteeringVector(site="resid.1", vector=torch.zeros(ref.d_model))):
        assert torch.equal(model(TEXTS).logits, want)
    assert all(torch.equal(a[s], b[s]) for s in sites)


@pytest.mark.skipif("demo-llama" not in zoo_models(), reason="demo models are not in the zoo yet")
def test_demo_model_with_tied_embeddings_split_auto(tmp_path):
    """demo-llama ties its LM head to the embedding: the auto map keeps the tied pair on one device."""
    ref = actlab.load("demo-llama")
    model = actlab.load("demo-llama", device_map="auto", max_memory={"cpu": "6MB"}, offload_folder=tmp_path)
    dm = model.device_map
    assert dm["lm_head"] == dm["model.embed_tokens"] and "disk" in dm.values()
    texts = ["The split model reads this.", "And this."]
    with ref.capture("resid.*") as a:
        want = ref(texts).logits
    with model.capture("resid.*") as b:
        assert torch.equal(model(texts).logits, want)
    assert all(torch.equal(a[s], b[s]) for s in a.keys())
    assert model.generate("Once upon", max_new_tokens=5) == ref.generate("Once upon", max_new_tokens=5)


# ---------------------------------------------------------------------------------------------- errors
def _hf():
    return copy.deepcopy(tiny_hf_model("llama"))


@pytest.mark.parametrize("bad_map, message", [
    ({**LLAMA_MAP, "model.layer.1": "cpu"}, "not a module of LlamaForCausalLM (did you mean model.layers.1"),
    ({k: v for k, v in LLAMA_MAP.items() if k != "model.layers.2"}, "leaves 9 weight(s) without a device, in model.layers.2"),
    ({**LLAMA_MAP, "model.layers.1.mlp": "cpu"}, "contains it"),
    ({**LLAMA_MAP, "lm_head": "meta"}, "'meta'"),
    ({**LLAMA_MAP, "lm_head": "tpu"}, "unknown device"),
    ({**LLAMA_MAP, "lm_head": True}, "a device is 'cpu', 'disk'"),
    ({}, "non-empty dict"),
    ("everywhere", "not a strategy"),
])
def test_bad_maps_are_refused_with_the_reason(bad_map, message, tmp_path):
    with pytest.raises(ActlabError) as err:
        actlab.load(_hf(), tokenizer=ByteTokenizer(), device_map=bad_map, offload_folder=tmp_path)
    assert message in str(err.value), str(err.value)


@pytest.mark.skipif(torch.cuda.device_count() >= 8, reason="this machine has the GPUs the map names")
def test_a_device_that_does_not_exist_is_refused(tmp_path):
    for device in ("cuda:7", 7):
        with pytest.raises(ActlabError, match="not available on this machine|does not exist"):
            actlab.load(_hf(), tokenizer=ByteTokenizer(), device_map={**LLAMA_MAP, "model.layers.2": device},
                        offload_folder=tmp_path)
    with pytest.raises(ActlabError, match="max_memory"):
        actlab.load(_hf(), tokenizer=ByteTokenizer(), device_map="auto", max_memory={7: "1GiB"})


def test_tied_weights_on_two_devices_are_refused(tmp_path):
    gpt2 = copy.deepcopy(tiny_hf_model("gpt2"))  # its LM head is the token embedding
    layout = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h": "cpu", "transformer.ln_f": "cpu",
              "lm_head": "disk"}
    with pytest.raises(ActlabError, match="one tied weight"):
        actlab.load(gpt2, tokenizer=ByteTokenizer(), device_map=layout, offload_folder=tmp_path)


def test_a_budget_smaller_than_any_block_puts_the_whole_model_on_disk(reference, tmp_path):
    model = actlab.load(_hf(), tokenizer=ByteTokenizer(), device_map="auto", max_memory={"cpu": 1000},
                        offload_folder=tmp_path)
    assert set(model.device_map.values()) == {"disk"} and model.device == torch.device("cpu")
    assert all(p.device.type == "meta" for p in model.hf.parameters())
    assert torch.equal(model(TEXTS).logits, reference(TEXTS).logits)


def test_option_mistakes_are_refused(tmp_path, split):
    with pytest.raises(ActlabError, match="offload_folder"):
        actlab.load(_hf(), tokenizer=ByteTokenizer(), device_map=LLAMA_MAP)
    with pytest.raises(ActlabError, match="not both"):
        actlab.load(_hf(), tokenizer=ByteTokenizer(), device="cpu", device_map="auto")
    with pytest.raises(ActlabError, match="go with device_map"):
        actlab.load(_hf(), tokenizer=ByteTokenizer(), max_memory={"cpu": "1GiB"})
    with pytest.raises(ActlabError, match="explicit map"):
        actlab.load(_hf(), tokenizer=ByteTokenizer(), device_map=LLAMA_MAP, max_memory={"cpu": "1GiB"},
                    offload_folder=tmp_path)
    with pytest.raises(ActlabError, match="such as '2GiB'"):
        actlab.load(_hf(), tokenizer=ByteTokenizer(), device_map="auto", max_memory={"cpu": "lots"})
    with pytest.raises(ActlabError, match="already dispatched"):
        actlab.load(split.hf, tokenizer=ByteTokenizer(), device_map="auto")
    again = actlab.load(split.hf, tokenizer=ByteTokenizer())  # a dispatched model is used as it is
    assert again.device_map == LLAMA_MAP


def test_bad_map_for_a_folder_fails_before_loading(saved_llama):
    with pytest.raises(ActlabError, match="not a module"):
        actlab.load(saved_llama, tokenizer=ByteTokenizer(), device_map={"model.layerz": "cpu"})


@pytest.mark.skipif("demo-llama" not in zoo_models(), reason="demo models are not in the zoo yet")
def test_cli_takes_a_device_map(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from actlab.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["sites", "demo-llama", "--device-map", "auto"], catch_exceptions=False)
    assert ok.exit_code == 0 and "resid.3" in ok.output
    loaded = []
    real_load = actlab.load
    monkeypatch.setattr(actlab, "load", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    small = runner.invoke(app, ["--max-memory", "cpu=6MB", "--offload-folder", str(tmp_path / "off"), "generate",
                                "demo-llama", "Once upon", "--device-map", "auto", "--max-new-tokens", "4"],
                          catch_exceptions=False)
    assert small.exit_code == 0, small.output
    assert "disk" in loaded[-1].device_map.values()  # the budget sent blocks to disk; generation ran through them
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model": "cpu", "lm_hed": "cpu"}))
    bad = runner.invoke(app, ["sites", "demo-llama", "--device-map", str(path)], catch_exceptions=False)
    assert bad.exit_code == 2 and "lm_hed" in bad.output and "did you mean lm_head" in bad.output
    worse = runner.invoke(app, ["--max-memory", "cpu=1GiB", "sites", "demo-llama"], catch_exceptions=False)
    assert worse.exit_code == 2 and "--device-map" in worse.output


# --------------------------------------------------------------------------------- real devices (CUDA)
def _gpu_reference(device: str):
    return actlab.load(copy.deepcopy(tiny_hf_model("llama")), tokenizer=ByteTokenizer(), device=device)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_split():
    """Blocks 0-1 on cuda:0, block 2 and the head on cuda:1: sites live on both, activations cross over."""
    layout = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
              "model.layers.2": 1, "model.norm": 1, "lm_head": 1}
    model = actlab.load(copy.deepcopy(tiny_hf_model("llama")), tokenizer=ByteTokenizer(), device_map=layout)
    assert model.devices == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert model.site_device("resid.0") == torch.device("cuda:0")
    assert model.site_device("resid.2") == torch.device("cuda:1")
    assert model.site_device("mlp.hidden.2") == torch.device("cuda:1")
    ref = _gpu_reference("cuda:0")
    check_same_behaviour(model, ref, atol=1e-5)
    check_generation(model, ref)
    check_streaming(model, ref, atol=1e-5)
    check_sae(model, ref, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_and_cpu_split():
    """The first blocks compute on the CPU, the rest on the GPU (accelerate with main_device='cpu')."""
    from accelerate import dispatch_model

    hf = copy.deepcopy(tiny_hf_model("llama"))
    layout = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": 0, "model.layers.2": 0, "model.norm": 0, "lm_head": 0}
    model = actlab.load(dispatch_model(hf, layout, main_device="cpu"), tokenizer=ByteTokenizer())
    assert set(model.devices) == {torch.device("cpu"), torch.device("cuda:0")}
    assert model.site_device("resid.0").type == "cpu" and model.site_device("resid.1").type == "cuda"
    ref = _gpu_reference("cpu")
    check_same_behaviour(model, ref, atol=1e-4)
    check_streaming(model, ref, atol=1e-4)
    check_sae(model, ref, atol=1e-4)
