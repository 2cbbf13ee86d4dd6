"""Site map: every architecture hooks every site with the documented shape and the model's own values."""

import pytest
import torch
from torch import nn

import actlab
from actlab.errors import ActlabError
from actlab.models.sites import SiteMap
from tiny_models import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_match_hidden_states(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 90, (2, 7))
    with model.capture("*") as cap:
        out = model.hf(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == model.n_layers + 1
    for site, width in model.sites.items():
        assert cap[site].shape == (2, 7, width), site
    torch.testing.assert_close(cap["embed"], hidden[0], rtol=0, atol=1e-6)
    for i in range(model.n_layers - 1):
        torch.testing.assert_close(cap[f"resid.{i}"], hidden[i + 1], rtol=0, atol=1e-6)
    if "final" in model.sites:  # HF applies the final norm to the last hidden state
        torch.testing.assert_close(cap["final"], hidden[-1], rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(cap[f"resid.{model.n_layers - 1}"], hidden[-1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "bert"])
def test_sublayers_reconstruct_residual(arch):
    model = tiny_model(arch)
    assert model.sitemap.sequential
    assert {f"attn.{i}" for i in range(3)} <= set(model.sites) and {f"mlp.{i}" for i in range(3)} <= set(model.sites)
    with model.capture("*") as cap:
        model(torch.randint(3, 90, (2, 6)))
    previous = cap["embed"]
    for i in range(model.n_layers):
        rebuilt = previous + cap[f"attn.{i}"] + cap[f"mlp.{i}"]
        torch.testing.assert_close(rebuilt, cap[f"resid.{i}"], rtol=1e-5, atol=1e-5)
        previous = cap[f"resid.{i}"]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "phi3"])
def test_mlp_hidden_is_down_projection_input(arch):
    """Feeding the captured neurons through the down projection gives the MLP output (sequential archs)."""
    model = tiny_model(arch)
    with model.capture(["mlp.hidden.1", "mlp.1"]) as cap:
        model(torch.randint(3, 90, (1, 5)))
    down = model.hf.get_submodule(model.sitemap["mlp.hidden.1"].module_path)
    torch.testing.assert_close(down(cap["mlp.hidden.1"]), cap["mlp.1"], rtol=1e-5, atol=1e-6)


def test_widths_and_listing():
    model = tiny_model("llama")
    assert model.sites["embed"] == 32 and model.sites["mlp.hidden.0"] == 48 and model.sites["final"] == 32
    assert list(model.sites)[:2] == ["embed", "resid.0"]
    assert model.d_mlp == 48 and model.n_layers == 3


def test_selectors():
    model = tiny_model("gpt2")
    assert model.resolve("resid.*") == ["resid.0", "resid.1", "resid.2"]
    assert model.resolve("mlp.hidden.1-2") == ["mlp.hidden.1", "mlp.hidden.2"]
    assert model.resolve("resid.-1") == ["resid.2"]
    assert model.resolve("resid.mid") == ["resid.1"] and model.resolve("mlp.hidden.mid") == ["mlp.hidden.1"]  # 1/3, 2/3 tie
    assert model.resolve(["resid.0,attn.0", "embed"]) == ["embed", "resid.0", "attn.0"]


@pytest.mark.parametrize(
    "bad, fragment",
    [("resid.7", "out of range"), ("redis.1", "unknown site"), ("mlp.hidden.2-1", "empty"), ("resid.-9", "out of range")],
)
def test_bad_selectors_name_the_model_and_sites(bad, fragment):
    model = tiny_model("gpt2")
    with pytest.raises(ActlabError) as err:
        model.resolve(bad)
    assert fragment in str(err.value)
    if fragment == "unknown site":
        assert "GPT2LMHeadModel" in str(err.value) and "resid.{0..2}" in str(err.value)


class _Config:
    num_hidden_layers = 2
    hidden_size = 8
    model_type = "toy"


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Linear(8, 8)
        self.feed_forward = nn.Sequential()
        self.feed_forward.w1 = nn.Linear(8, 16)
        self.feed_forward.w2 = nn.Linear(16, 8)

    def forward(self, x):
        x = x + self.attention(x)
        return x + self.feed_forward.w2(torch.relu(self.feed_forward.w1(x)))


class _ToyDecoder(nn.Module):
    """An architecture actlab has never heard of: the fallback must still find its sites."""

    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList([_Block(), _Block()])
        self.backbone.norm_f = nn.LayerNorm(8)


def test_fallback_discovers_unknown_architecture():
    sitemap = SiteMap(_ToyDecoder())
    assert sitemap.blocks_path == "backbone.blocks"
    assert sitemap.widths["mlp.hidden.1"] == 16 and "attn.0" in sitemap.widths and "final" in sitemap.widths
    with pytest.raises(ActlabError, match="_ToyDecoder"):
        sitemap.resolve("nonsense.0")


def test_bert_has_no_final_site_and_says_so():
    model = tiny_model("bert")
    assert "final" not in model.sites
    with pytest.raises(ActlabError, match="BertModel"):
        model.resolve("final")
    assert not model.sitemap.sequential  # post-LN: resid is not a plain sum


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ActlabError, match="does not exist"):
        actlab.load(str(tmp_path / "nope"))
    with pytest.raises(ActlabError, match="config.json"):
        actlab.load(str(tmp_path))


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_in_is_what_the_mlp_receives(arch):
    """mlp.in.i equals the MLP input computed independently, and the MLP applied to it gives mlp.i."""
    from mlp_parts import bert_attention_output, block, mlp_norm, mlp_of

    model = tiny_model(arch)
    assert all(model.sites[f"mlp.in.{i}"] == model.d_model for i in range(model.n_layers))
    ids = torch.randint(3, 90, (2, 6))
    with model.capture("*") as cap:
        model(ids)
    for i in range(model.n_layers):
        got = cap[f"mlp.in.{i}"]
        before = cap["embed"] if i == 0 else cap[f"resid.{i - 1}"]
        if arch == "bert":  # post-LN: the intermediate reads the attention sub-layer's normed output
            want = bert_attention_output(model, ids, i)
        elif arch == "gpt_neox" and block(model, i).use_parallel_residual:  # parallel: the norm of the block input
            want = mlp_norm(model, arch, i)(before)
        else:  # sequential pre-norm: the MLP's norm of the residual after attention
            want = mlp_norm(model, arch, i)(before + cap[f"attn.{i}"])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(mlp_of(model, arch, i)(got), cap[f"mlp.{i}"], rtol=1e-5, atol=1e-5)


def test_input_site_rule():
    model = tiny_model("llama")
    assert model.sitemap.input_site("resid.0") == "embed"
    assert model.sitemap.input_site("resid.2") == "resid.1"
    assert model.sitemap.input_site("mlp.1") == "mlp.in.1"
    assert model.resolve("mlp.in.*") == ["mlp.in.0", "mlp.in.1", "mlp.in.2"]
    assert model.resolve("mlp.in.-1") == ["mlp.in.2"]
    with pytest.raises(ActlabError, match="input_site"):
        model.sitemap.input_site("attn.1")


def test_the_middle_layer_is_nearest_half_depth():
    from actlab.models.sites import middle_layer

    # (i + 1) / n nearest 1/2, exact ties to the deeper: demo-llama (4 layers) 1, demo-gpt2 (6) 2
    assert [middle_layer(n) for n in (1, 2, 3, 4, 5, 6, 32)] == [0, 0, 1, 1, 2, 2, 15]
