"""actlab's SAELens / sparsify interop against the real libraries (issue #13).

    PYTHONPATH=src .bench-venv/bin/python benchmarks/sae_interop_check.py

Needs ``sae-lens`` and ``eai-sparsify`` in ``.bench-venv`` (see docs/benchmarks.md); the unit tests
(tests/test_sae_interop.py) write the layouts by hand and do not need them. Each check builds a
small SAE with random weights in one library, saves it with that library's own save function,
loads it with ``actlab.sae.interop`` and compares latents and outputs with the library's own
forward on random inputs; then SAEs of ours are exported with ``export_saelens`` and loaded with
SAELens's ``SAE.load_from_disk``. One PASS/FAIL line per check with the largest absolute
differences; PASS needs both within 1e-5 · max(1, |reference|) (float32 sums of ~256 terms).
"""

from __future__ import annotations

import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

torch.set_num_threads(1)

import sae_lens  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

from actlab.sae import SparseAutoencoder  # noqa: E402
from actlab.sae.interop import export_saelens, load_saelens, load_sparsify  # noqa: E402

D, N, K, B = 64, 256, 16, 128
GEN = torch.Generator().manual_seed(0)
RESULTS: list[bool] = []


def randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=GEN) * scale


def report(name: str, ours: tuple, ref: tuple) -> None:
    diffs = [float((a - b).abs().max()) for a, b in zip(ours, ref)]
    limits = [1e-5 * max(1.0, float(b.abs().max())) for b in ref]
    ok = all(d <= lim for d, lim in zip(diffs, limits)) and bool((ref[0] != 0).any())
    RESULTS.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name:<90} latents max|d| {diffs[0]:.2e}  output max|d| {diffs[1]:.2e}")


def ours_forward(sae: SparseAutoencoder, x: torch.Tensor) -> tuple:
    with torch.no_grad():
        z = sae.encode(x)
        return z, sae.decode(z, x)


def randomize(module: torch.nn.Module, *, positive: tuple[str, ...] = ("threshold",)) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(randn(*p.shape, scale=0.3 if name.startswith("b") else D ** -0.5))
            if name in positive:
                p.abs_().mul_(0.5)


# ---------------------------------------------------------------- SAELens -> actlab
def saelens_forward(sae, x):
    with torch.no_grad():
        if hasattr(sae, "forward_with_activations"):
            out, z = sae.forward_with_activations(x)
            return z, out
        z = sae.encode(x)
        return z, sae.decode(z)


def check_saelens_inference(tmp: Path, x: torch.Tensor) -> None:
    meta = {"hook_name": "blocks.0.hook_resid_post", "model_name": "check"}
    builds = [
        ("StandardSAE", sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
        ("StandardSAE apply_b_dec_to_input=False", sae_lens.StandardSAE, sae_lens.StandardSAEConfig,
         {"apply_b_dec_to_input": False}),
        ("TopKSAE", sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": K}),
        ("TopKSAE rescale_acts_by_decoder_norm", sae_lens.TopKSAE, sae_lens.TopKSAEConfig,
         {"k": K, "rescale_acts_by_decoder_norm": True}),
        ("JumpReLUSAE", sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
        ("Transcoder", sae_lens.Transcoder, sae_lens.TranscoderConfig, {"d_out": 48, "apply_b_dec_to_input": False}),
        ("SkipTranscoder", sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig,
         {"d_out": 48, "apply_b_dec_to_input": False}),
        ("JumpReLUTranscoder", sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig,
         {"d_out": 48, "apply_b_dec_to_input": False}),
        ("JumpReLUSkipTranscoder", sae_lens.JumpReLUSkipTranscoder, sae_lens.JumpReLUSkipTranscoderConfig,
         {"d_out": 48, "apply_b_dec_to_input": False}),
    ]
    for i, (name, cls, cfg_cls, fields) in enumerate(builds):
        sae = cls(cfg_cls(d_in=D, d_sae=N, **fields))
        randomize(sae)
        sae.cfg.metadata.hook_name, sae.cfg.metadata.model_name = meta["hook_name"], meta["model_name"]
        folder = tmp / f"saelens_{i}"
        sae.save_model(folder)
        ours, info = load_saelens(folder)
        assert info["hook_name"] == meta["hook_name"], info
        report(f"SAELens {name} save_model -> load_saelens", ours_forward(ours, x), saelens_forward(sae, x))


def check_saelens_training(tmp: Path, x: torch.Tensor) -> None:
    """TopK and BatchTopK training SAEs: the inference save (norms folded, BatchTopK as JumpReLU) and the raw
    training checkpoint, both read by us, against SAELens's own loaded inference SAE."""
    for name, cls, cfg_cls, k in [("TopKTrainingSAE", sae_lens.TopKTrainingSAE, sae_lens.TopKTrainingSAEConfig, K),
                                  ("BatchTopKTrainingSAE", sae_lens.BatchTopKTrainingSAE,
                                   sae_lens.BatchTopKTrainingSAEConfig, float(K))]:
        sae = cls(cfg_cls(d_in=D, d_sae=N, k=k, rescale_acts_by_decoder_norm=True))
        randomize(sae)
        with torch.no_grad():
            sae.W_dec.mul_(randn(N, 1).abs().add(0.3))  # rows of unequal norm, so the rescale matters
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold = torch.tensor(0.25, dtype=torch.double)
        sae.save_inference_model(tmp / f"{name}_inference")
        sae.save_model(tmp / f"{name}_checkpoint")
        theirs = SAE.load_from_disk(tmp / f"{name}_inference")
        ref = saelens_forward(theirs, x)
        for kind in ("inference", "checkpoint"):
            ours, _ = load_saelens(tmp / f"{name}_{kind}")
            report(f"SAELens {name} save_{'inference_model' if kind == 'inference' else 'model'} -> load_saelens "
                   f"({type(theirs).__name__})", ours_forward(ours, x), ref)


# ---------------------------------------------------------------- sparsify -> actlab
def check_sparsify(tmp: Path, x: torch.Tensor) -> None:
    for name, fields in [("SAE", {}), ("SAE skip_connection", {"skip_connection": True}),
                         ("transcoder skip_connection", {"transcode": True, "skip_connection": True})]:
        coder = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K, **fields))
        randomize(coder)
        folder = tmp / "sparsify_run" / f"layers.{len(fields)}"
        coder.save_to_disk(folder)
        ours, info = load_sparsify(folder)
        with torch.no_grad():
            out = coder(x)
        z = torch.zeros(B, N).scatter(1, out.latent_indices, out.latent_acts)
        report(f"sparsify SparseCoder {name} save_to_disk -> load_sparsify", ours_forward(ours, x), (z, out.sae_out))


# ---------------------------------------------------------------- actlab -> SAELens
def our_sae(kind: str, transcoder: bool = False, skip: bool = False) -> SparseAutoencoder:
    sae = SparseAutoencoder(D, N, kind, K if kind in ("topk", "batchtopk") else None,
                            d_out=48 if transcoder else None, skip=skip)
    randomize(sae, positive=())
    with torch.no_grad():
        if kind == "jumprelu":
            sae.log_threshold.copy_(randn(N, scale=0.5) - 1.5)
        if kind == "batchtopk":
            sae.threshold.fill_(0.3)
            sae.threshold_count.fill_(5)
        sae.input_scale.fill_(0.37)
        if transcoder:
            sae.output_scale.fill_(2.3)
    return sae.eval()


def check_export(tmp: Path, x: torch.Tensor) -> None:
    cases = [("topk", False, False), ("relu", False, False), ("jumprelu", False, False), ("batchtopk", False, False),
             ("relu", True, False), ("relu", True, True), ("jumprelu", True, False), ("jumprelu", True, True),
             ("batchtopk", True, False)]
    for kind, transcoder, skip in cases:
        ours = our_sae(kind, transcoder, skip)
        folder = export_saelens(ours, tmp / f"export_{kind}_{transcoder}_{skip}", hook_name="blocks.1.hook_resid_post")
        theirs = SAE.load_from_disk(folder)
        label = f"{kind}{' transcoder' if transcoder else ''}{' skip' if skip else ''} (scales folded)"
        report(f"actlab {label} export_saelens -> SAE.load_from_disk ({type(theirs).__name__})",
               ours_forward(ours, x), saelens_forward(theirs, x))


def main() -> int:
    print(f"sae-lens {sae_lens.__version__}, eai-sparsify {version('eai-sparsify')}, torch {torch.__version__}")
    x = randn(B, D)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        check_saelens_inference(tmp, x)
        check_saelens_training(tmp, x)
        check_sparsify(tmp, x)
        check_export(tmp, x)
    print(f"{sum(RESULTS)}/{len(RESULTS)} checks passed")
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
