"""SAEs from SAELens and sparsify, and ours written in SAELens's layout (issue #13).

Read so that our module computes exactly what the other library computes with the same file:
every difference of convention is folded into the weights (decoder-norm rescaling, a decoder
bias not subtracted from the input, SAELens 5's fine-tuning scaling factor), and a file that
needs what our module cannot do (a per-input normalisation, a gated or grouped activation) is
refused with an ActlabError rather than loaded as a different SAE. ``load_external`` tells the
layouts apart. Checked against the real libraries by ``benchmarks/sae_interop_check.py``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from actlab.errors import ActlabError
from actlab.files import brief, open_tensors, save_tensors, write_json
from actlab.sae.files import FORMAT, load_sae
from actlab.sae.foreign import ForeignFolder, TINY_THRESHOLD, assemble
from actlab.sae.model import SparseAutoencoder

__all__ = ["SAELENS_LAYOUT_VERSION", "export_saelens", "load_external", "load_saelens", "load_sparsify"]

SAELENS_WEIGHTS, SPARSIFY_WEIGHTS = "sae_weights.safetensors", "sae.safetensors"
SAELENS_LAYOUT_VERSION = "6.0.0"  # what export_saelens writes: SAELens reads a cfg as 6.x from this version on
_SAELENS_HINT = "save it again with SAELens (sae.save_model) or check that the folder came from SAELens"
_SPARSIFY_HINT = "save it again with sparsify (SparseCoder.save_to_disk) or check that the folder came from sparsify"
_TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")
_BATCHTOPK = ("batchtopk", "matryoshka_batchtopk")  # training checkpoints; SAELens itself saves them as jumprelu
_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
_ARCHITECTURES = ("standard", "jumprelu", *_TOPK_FAMILY, *_TRANSCODERS)
_NORMALIZE = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm", "covariance_whitening")
_DTYPES = tuple(p + d for p in ("", "torch.") for d in ("float32", "float64", "float16", "bfloat16"))
_EXPECTED = ("expected an actlab SAE file (*.safetensors, format actlab.sae), a SAELens folder (cfg.json + "
             f"{SAELENS_WEIGHTS}) or a sparsify folder (cfg.json + {SPARSIFY_WEIGHTS}, or one such subfolder per hook)")


# ====================================================================== SAELens
def load_saelens(directory: str | Path, *, norm_scaling_factor: float | None = None) -> tuple[SparseAutoencoder, dict]:
    """The SAE of a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``), in eval mode, and an info dict.

    ``norm_scaling_factor`` is for a cfg with ``normalize_activations: "expected_average_only_in"``
    whose factor is not in the folder (SAELens's pretrained directory lists it); a training
    checkpoint's ``activation_scaler.json`` is read when present. Weights are read as float32. An SAE
    on attention heads (``info["reshape_activations"] == "hook_z"``) reads heads flattened into one vector."""
    src = ForeignFolder("SAELens", directory, SAELENS_WEIGHTS, _SAELENS_HINT)
    spec = _saelens_spec(src, src.read_cfg())
    scale = _saelens_input_scale(src, spec, norm_scaling_factor)
    sae, folded, clamped = _saelens_module(src, spec, src.read_weights(), scale)
    info = {"format": "saelens", "architecture": spec["arch"], "hook_name": spec["hook_name"],
            "model_name": spec["model_name"], "d_in": spec["d_in"], "d_sae": spec["n"], "dtype": spec["dtype"],
            "sae_lens_version": spec["version"], "normalize_activations": spec["normalize"], "input_scale": scale,
            "reshape_activations": spec["reshape"], "folded": folded, "thresholds_clamped": clamped}
    if spec["transcoder"]:
        info.update(d_out=spec["d_out"], hook_name_out=spec["hook_name_out"])
    return sae, info


def _saelens_spec(src: ForeignFolder, cfg: dict) -> dict:
    """The cfg's meaning, read as SAELens reads it (its pre-6.0 defaults and renames included)."""
    meta = src.field(cfg, "metadata", dict, {})
    version = src.field(cfg, "sae_lens_version", (str, type(None)), None) or \
        src.field(meta, "sae_lens_version", (str, type(None)), None, "metadata")
    match = re.match(r"\s*v?(\d+)", version or "")
    if version and not match:
        raise src.bad(f"'sae_lens_version' {version!r} is not a version number")
    pre6 = not version or int(match.group(1)) < 6
    arch = src.field(cfg, "architecture", str, "standard")
    k = None
    if pre6:  # SAELens 5 kept TopK SAEs as "standard" with a topk activation function
        fn = src.field(cfg, "activation_fn", (str, type(None)), None) or \
            src.field(cfg, "activation_fn_str", (str, type(None)), None) or "relu"
        kwargs = src.field(cfg, "activation_fn_kwargs", (dict, type(None)), None) or {}
        if fn == "topk" and "k" in kwargs:
            arch, k = "topk", src.size(kwargs, "k", where="activation_fn_kwargs")
        elif fn != "relu" and arch != "jumprelu":
            raise src.bad(f"'activation_fn' is {fn!r}; actlab reads relu and topk (with activation_fn_kwargs.k)")
    if arch == "gated":
        raise src.bad("architecture 'gated' (separate gate and magnitude paths) has no equivalent in actlab's SAE")
    if arch not in _ARCHITECTURES:
        raise src.bad(f"architecture {arch!r} is not one actlab reads ({', '.join(_ARCHITECTURES)})")
    if arch == "topk" and k is None:
        k = src.size(cfg, "k", 100)  # TopKSAEConfig's default
    transcoder = arch in _TRANSCODERS
    spec = {"arch": arch, "k": k, "version": version, "transcoder": transcoder,
            "d_in": src.size(cfg, "d_in"), "n": src.size(cfg, "d_sae"),
            "apply_b_dec": src.field(cfg, "apply_b_dec_to_input", bool, True),
            "dtype": src.choice(cfg, "dtype", _DTYPES, "float32"),
            "reshape": src.choice(cfg, "reshape_activations", ("none", "hook_z"), "none"),
            "rescale": arch in _TOPK_FAMILY and src.field(cfg, "rescale_acts_by_decoder_norm", bool,
                                                          arch in _BATCHTOPK),  # the training config's default
            "finetuning": src.field(cfg, "finetuning_scaling_factor", bool, False)}
    spec["d_out"] = src.size(cfg, "d_out", 768) if transcoder else spec["d_in"]  # TranscoderConfig's default
    if spec["k"] is not None and spec["k"] > spec["n"]:
        raise src.bad(f"'k' ({spec['k']}) is larger than d_sae ({spec['n']})")
    if transcoder and spec["apply_b_dec"]:
        raise src.bad("a transcoder must have 'apply_b_dec_to_input': false (SAELens refuses it too)")
    normalize = src.field(cfg, "normalize_activations", (str, bool, type(None)), "none")
    normalize = {True: "expected_average_only_in", False: "none", None: "none"}.get(normalize, normalize)  # SAELens 5
    spec["normalize"] = src.choice({"normalize_activations": normalize}, "normalize_activations", _NORMALIZE)
    for key, where in (("model_name", meta), ("hook_name", meta), ("hook_name_out", meta)):
        fallback = src.field(cfg, key, (str, type(None)), None) if pre6 else None
        spec[key] = src.field(where, key, (str, type(None)), fallback, "metadata")
    if pre6 and spec["hook_name"] is None:
        spec["hook_name"] = src.field(cfg, "hook_point", (str, type(None)), None)
    if pre6 and "reshape_activations" not in cfg and "hook_z" in (spec["hook_name"] or ""):
        spec["reshape"] = "hook_z"  # SAELens 5 defaulted by the hook's name
    return spec


def _saelens_input_scale(src: ForeignFolder, spec: dict, given: float | None) -> float:
    """Our ``input_scale`` for the cfg's ``normalize_activations`` (refusing what no constant scale is)."""
    mode = spec["normalize"]
    if given is not None and mode != "expected_average_only_in":
        raise ActlabError(f"norm_scaling_factor is only for SAEs with normalize_activations "
                          f"'expected_average_only_in'; '{src.cfg_path}' has {mode!r}: leave it out")
    if mode == "none":
        return 1.0
    if mode == "covariance_whitening":
        raise src.bad("'normalize_activations' is 'covariance_whitening' (not folded into the weights): fold it "
                      "with SAELens (sae.fold_activation_whitening) and save again; actlab does not load it as it is")
    if mode != "expected_average_only_in" or spec["transcoder"]:
        raise src.bad(f"'normalize_activations' is {mode!r}" + (" on a transcoder" if spec["transcoder"]
                      else ": each input is normalised by its own statistics at run time") +
                      ", which actlab's SAE cannot represent exactly, so it is not loaded")
    if given is None:
        scaler = src.folder / "activation_scaler.json"
        if not scaler.is_file():
            raise src.bad("'normalize_activations' is 'expected_average_only_in' but the folder has no "
                          "activation_scaler.json with the factor: pass norm_scaling_factor= (SAELens's "
                          "pretrained_saes.yaml lists it as norm_scaling_factor)")
        given = src.read_json(scaler).get("scaling_factor")
        if given is None:
            raise src.bad("has no estimated 'scaling_factor': pass norm_scaling_factor=", scaler)
        if isinstance(given, bool) or not isinstance(given, (int, float)) or not math.isfinite(given) or given <= 0:
            raise src.bad(f"'scaling_factor' should be a positive finite number, not {brief(given)}", scaler)
    if isinstance(given, bool) or not isinstance(given, (int, float)) or not math.isfinite(given) or given <= 0:
        raise ActlabError(f"norm_scaling_factor should be a positive finite number, not {brief(given)}")
    return float(given)


def _saelens_module(src: ForeignFolder, spec: dict, tensors: dict, scale: float):
    """Our module from the checked tensors, with SAELens's conventions folded in; plus the folds and clamps made."""
    d_in, n, d_out, arch = spec["d_in"], spec["n"], spec["d_out"], spec["arch"]
    why = f"cfg.json has d_in {d_in}, d_sae {n}" + (f", d_out {d_out}" if spec["transcoder"] else "")
    W_enc, b_enc = src.tensor(tensors, "W_enc", [d_in, n], why), src.tensor(tensors, "b_enc", [n], why)
    W_dec, b_dec = src.tensor(tensors, "W_dec", [n, d_out], why), src.tensor(tensors, "b_dec", [d_out], why)
    used, folded, threshold, W_skip = {"W_enc", "b_enc", "W_dec", "b_dec"}, [], None, None
    if arch in ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"):
        threshold = src.tensor(tensors, "threshold", [n], why)
        used.add("threshold")
    elif arch in _BATCHTOPK:  # a training checkpoint: SAELens's inference form is JumpReLU at this one threshold
        threshold = src.tensor(tensors, "topk_threshold", [], "a scalar").expand(n).clone()
        used.add("topk_threshold")
    if arch in ("skip_transcoder", "jumprelu_skip_transcoder"):
        W_skip = src.tensor(tensors, "W_skip", [d_out, d_in], why).T.contiguous()
        used.add("W_skip")
    if "scaling_factor" in tensors:  # SAELens 5's fine-tuning scale, applied to the latents before decoding
        factor = src.tensor(tensors, "scaling_factor", [n], why)
        used.add("scaling_factor")
        if spec["finetuning"]:
            W_dec = W_dec * factor[:, None]
            folded.append("finetuning_scaling_factor")
        elif not torch.allclose(factor, torch.ones_like(factor)):
            raise src.bad("has a 'scaling_factor' that is not all ones but cfg.json's finetuning_scaling_factor "
                          "is false (SAELens refuses it too)", src.weights_path)
    src.no_others(tensors, used, arch)
    if not spec["apply_b_dec"] and not spec["transcoder"]:  # x W + b = (x - b_dec) W + (b + b_dec W)
        b_enc = b_enc + b_dec @ W_enc
        folded.append("apply_b_dec_to_input")
    if spec["rescale"]:  # pre-activations times decoder-row norms (clamped as SAELens does), latents divided by them
        norm = W_dec.norm(dim=1).clamp(min=1e-8)
        W_enc, b_enc, W_dec = W_enc * norm, b_enc * norm, W_dec / norm[:, None]
        folded.append("rescale_acts_by_decoder_norm")
    kind = "topk" if arch == "topk" else ("relu" if threshold is None else "jumprelu")
    clamped = int((threshold <= TINY_THRESHOLD).sum()) if threshold is not None else 0
    sae = assemble(kind, spec["k"], W_enc, b_enc, W_dec, b_dec, transcoder=spec["transcoder"], W_skip=W_skip,
                   threshold=threshold, input_scale=scale)
    return sae, folded, clamped


def export_saelens(sae: SparseAutoencoder, directory: str | Path, *, hook_name: str | None = None,
                   model_name: str | None = None) -> Path:
    """Write ``sae`` as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) that SAELens loads
    (``SAE.load_from_disk``) into the same function of the input.

    The input and output scales are folded into the weights (``W_enc·s``, ``W_dec/s``, ``b_dec/s``;
    the latents, hence the thresholds, do not change); BatchTopK is written as JumpReLU at its one
    inference threshold, which is its eval-mode rule. What SAELens has no architecture for is refused."""
    arch = _export_architecture(sae)
    for name, value in (("hook_name", hook_name), ("model_name", model_name)):
        if value is not None and not isinstance(value, str):
            raise ActlabError(f"{name} should be a string or None, not {brief(value)}")
    s_in, s_out = sae.input_scale.detach().float().cpu(), sae.target_scale.detach().float().cpu()
    with torch.no_grad():
        state = {"W_enc": sae.W_enc * s_in, "b_enc": sae.b_enc.clone(), "W_dec": sae.W_dec / s_out,
                 "b_dec": sae.b_dec / s_out}
        if sae.skip:
            state["W_skip"] = (sae.W_skip * (s_in / s_out)).T
        if sae.kind in ("jumprelu", "batchtopk"):
            state["threshold"] = sae.thresholds.expand(sae.n_latents)
        state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    for name, scale in (("input_scale", s_in), ("output_scale", s_out)):
        if not (math.isfinite(float(scale)) and float(scale) > 0):
            raise ActlabError(f"the SAE's {name} is {float(scale)}; export needs a positive finite scale")
    for name, t in state.items():
        if not bool(torch.isfinite(t).all()):
            raise ActlabError(f"the SAE's {name} (after folding the scales) has NaN or infinite values; "
                              "export refuses it: retrain or reload the SAE")
    metadata = {"sae_lens_version": SAELENS_LAYOUT_VERSION, "model_name": model_name, "hook_name": hook_name,
                "exported_by": "actlab"}
    cfg = {"architecture": arch, "d_in": sae.d_in, "d_sae": sae.n_latents, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": not sae.transcoder, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": metadata}
    if arch == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    if sae.transcoder:
        cfg["d_out"] = sae.d_out
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ActlabError(f"'{directory}' is a file; export_saelens writes a folder (cfg.json + {SAELENS_WEIGHTS})")
    save_tensors(directory / SAELENS_WEIGHTS, state, None, {})
    write_json(directory / "cfg.json", cfg)
    return directory


def _export_architecture(sae) -> str:
    """SAELens's architecture name for ``sae``, or an ActlabError saying why there is none."""
    if not isinstance(sae, SparseAutoencoder):
        raise ActlabError(f"export_saelens takes an actlab SparseAutoencoder, not {type(sae).__name__}")
    if sae.kind == "batchtopk" and float(sae.threshold_count) == 0:
        raise ActlabError("this BatchTopK SAE has no inference threshold yet (it was never trained); "
                          "train it before exporting, since SAELens gets it as JumpReLU at that threshold")
    if sae.transcoder:
        if sae.kind == "topk":
            raise ActlabError("SAELens has no TopK transcoder (its transcoders are ReLU or JumpReLU, with or "
                              "without a skip); train a JumpReLU or BatchTopK transcoder to export it")
        if sae.kind == "relu":
            return "skip_transcoder" if sae.skip else "transcoder"
        return "jumprelu_skip_transcoder" if sae.skip else "jumprelu_transcoder"  # the former: SAELens after 6.18
    if sae.skip:
        raise ActlabError("SAELens has no SAE with a skip connection (only transcoders have one); "
                          "this SAE cannot be written for it")
    return {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[sae.kind]


# ====================================================================== sparsify
def load_sparsify(directory: str | Path, *, hook: str | None = None) -> tuple[SparseAutoencoder, dict]:
    """The SAE (or transcoder) of a sparsify folder (``cfg.json`` + ``sae.safetensors``), in eval mode, and info.

    A training run's folder holds one subfolder per hook: name it with ``hook=`` (one alone is
    taken; several without ``hook=`` are an error that lists them)."""
    folder = _sparsify_folder(Path(directory), hook)
    src = ForeignFolder("sparsify", folder, SPARSIFY_WEIGHTS, _SPARSIFY_HINT)
    cfg = src.read_cfg()
    d_in = src.size(cfg, "d_in")  # SparseCoder.save_to_disk writes it beside the config's fields
    if src.choice(cfg, "activation", ("topk", "groupmax"), "topk") == "groupmax":
        raise src.bad("'activation' is 'groupmax' (the largest latent of each of k groups), which actlab's "
                      "SAE does not implement")
    if src.field(cfg, "signed", bool, False):
        raise src.bad("'signed' is true (latents of either sign), which actlab's SAE does not implement")
    n = src.size(cfg, "num_latents", 0, zero_ok=True) or d_in * src.size(cfg, "expansion_factor", 32)
    k = src.size(cfg, "k", 32)
    if n > 1 << 24 or k > n:
        raise src.bad(f"{n} latents with k = {k} is not a valid shape (k at most the latents, latents at most 2^24)")
    skip, transcode = src.field(cfg, "skip_connection", bool, False), src.field(cfg, "transcode", bool, False)
    multi_topk = src.field(cfg, "multi_topk", bool, False)
    src.field(cfg, "normalize_decoder", bool, True)  # a training setting: the saved decoder is used as it is
    tensors = src.read_weights()
    why = f"cfg.json has d_in {d_in} and {n} latents"
    W_enc = src.tensor(tensors, "encoder.weight", [n, d_in], why).T.contiguous()
    b_enc = src.tensor(tensors, "encoder.bias", [n], why)
    W_dec = src.tensor(tensors, "W_dec", [n, d_in], why)
    b_dec = src.tensor(tensors, "b_dec", [d_in], why)
    W_skip = src.tensor(tensors, "W_skip", [d_in, d_in], why).T.contiguous() if skip else None
    src.no_others(tensors, {"encoder.weight", "encoder.bias", "W_dec", "b_dec", *(["W_skip"] if skip else [])},
                  "sparsify " + ("transcoder" if transcode else "SAE"))
    sae = assemble("topk", k, W_enc, b_enc, W_dec, b_dec, transcoder=transcode, W_skip=W_skip)
    info = {"format": "sparsify", "hook": folder.name, "hook_name": folder.name, "model_name": _run_model(folder),
            "d_in": d_in, "num_latents": n, "k": k, "transcode": transcode, "skip_connection": skip,
            "multi_topk": multi_topk}
    return sae, info


def _sparsify_folder(path: Path, hook: str | None) -> Path:
    if hook is not None:
        if not isinstance(hook, str) or not hook.strip() or hook in (".", "..") or "/" in hook or "\\" in hook:
            raise ActlabError(f"hook should be the name of one hook subfolder, not {brief(hook)}")
        if path.is_dir() and not (path / hook).is_dir():
            hooks = _sparsify_hooks(path)
            raise ActlabError(f"'{path}' has no hook '{hook}' (its hooks: {', '.join(hooks[:20]) or 'none'})")
        return path / hook
    if not path.is_dir() or (path / "cfg.json").is_file() or (path / SPARSIFY_WEIGHTS).is_file():
        return path
    hooks = _sparsify_hooks(path)
    if len(hooks) > 1:
        shown = ", ".join(hooks[:20]) + (f", ... ({len(hooks)} in all)" if len(hooks) > 20 else "")
        raise ActlabError(f"'{path}' holds sparsify SAEs for {len(hooks)} hooks ({shown}): choose one with "
                          f"hook='{hooks[0]}' or give that subfolder")
    return path / hooks[0] if hooks else path


def _sparsify_hooks(path: Path) -> list[str]:
    """Subfolders holding a sparsify SAE, in natural order (layers.2 before layers.10)."""
    names = [p.name for p in path.iterdir() if p.is_dir() and (p / SPARSIFY_WEIGHTS).is_file()]
    return sorted(names, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])


def _run_model(folder: Path) -> str | None:
    """The model named by the training run's ``config.json`` beside the hook folders (optional metadata)."""
    try:
        run = json.loads((folder.parent / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return run.get("model") if isinstance(run, dict) and isinstance(run.get("model"), str) else None


# ====================================================================== any of them
_HOOKS = [  # TransformerLens hook names (SAELens) and module paths (sparsify) -> actlab sites
    (r"blocks\.(\d+)\.hook_resid_post", "resid.{0}"), (r"blocks\.(\d+)\.hook_mlp_out", "mlp.{0}"),
    (r"blocks\.(\d+)\.hook_attn_out", "attn.{0}"), (r"blocks\.(\d+)\.ln2\.hook_normalized", "mlp.in.{0}"),
    (r"blocks\.(\d+)\.mlp\.hook_(?:post|pre)", "mlp.hidden.{0}"),
    (r"(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)", "resid.{0}"),
    (r"(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)\.mlp", "mlp.{0}"),
]


def site_from_hook(hook: str | None) -> str | None:
    """The actlab site of another library's hook name (``blocks.2.hook_resid_post`` -> ``resid.2``,
    sparsify's ``layers.2`` -> ``resid.2``), or None when there is no sure translation. ``hook_resid_pre``
    of block i is ``resid.{i-1}`` (``embed`` for block 0)."""
    if not isinstance(hook, str):
        return None
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", hook)
    if match:
        layer = int(match.group(1))
        return "embed" if layer == 0 else f"resid.{layer - 1}"
    for pattern, site in _HOOKS:
        match = re.fullmatch(pattern, hook)
        if match:
            return site.format(match.group(1))
    return None


def _is_ours(path: Path) -> bool:
    """An actlab SAE file, whatever its name (sparsify's weights are also called sae.safetensors)."""
    try:
        with open_tensors(path) as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not safetensors at all: let the folder logic report it
        return False


def load_external(path: str | Path, *, hook: str | None = None,
                  norm_scaling_factor: float | None = None) -> tuple[SparseAutoencoder, dict]:
    """Load an SAE of any layout actlab reads: ours (a file), SAELens or sparsify (folders); ``info["format"]``
    says which. ``hook`` is for sparsify runs, ``norm_scaling_factor`` for SAELens (see their loaders)."""
    path = Path(path)
    if path.is_file() and path.name in ("cfg.json", SAELENS_WEIGHTS, SPARSIFY_WEIGHTS) and not _is_ours(path):
        path = path.parent
    if path.is_file():
        if hook is not None or norm_scaling_factor is not None:
            raise ActlabError("hook= and norm_scaling_factor= are for sparsify and SAELens folders, not actlab files")
        try:
            with open_tensors(path) as f:
                fmt = (f.metadata() or {}).get("format")
        except Exception as e:  # safetensors raises several types on garbage
            raise ActlabError(f"'{path}' is not a safetensors file ({brief(e)}); {_EXPECTED}") from None
        if fmt != FORMAT:
            raise ActlabError(f"'{path}' is not an actlab SAE file (format: {brief(fmt)}); {_EXPECTED}")
        sae, info = load_sae(path)
        return sae, {"format": FORMAT, **info}
    if not path.is_dir():
        raise ActlabError(f"'{path}' does not exist; {_EXPECTED}")
    layouts = [name for name, f in (("SAELens", SAELENS_WEIGHTS), ("sparsify", SPARSIFY_WEIGHTS))
               if (path / f).is_file()]
    if len(layouts) == 2:
        raise ActlabError(f"'{path}' holds both {SAELENS_WEIGHTS} (SAELens) and {SPARSIFY_WEIGHTS} (sparsify); "
                          "load it with load_saelens or load_sparsify")
    if layouts == ["SAELens"]:
        if hook is not None:
            raise ActlabError(f"'{path}' is a SAELens folder: hook= is for sparsify runs, leave it out")
        return load_saelens(path, norm_scaling_factor=norm_scaling_factor)
    if layouts == ["sparsify"] or hook is not None or _sparsify_hooks(path):
        if norm_scaling_factor is not None:
            raise ActlabError(f"'{path}' is a sparsify folder: norm_scaling_factor= is for SAELens, leave it out")
        return load_sparsify(path, hook=hook)
    raise ActlabError(f"'{path}' holds no SAE that actlab reads: {_EXPECTED}")
