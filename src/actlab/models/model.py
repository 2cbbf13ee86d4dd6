"""actlab's model handle: an HF model + tokenizer + site map + the hook engine."""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Iterable, Sequence

import torch
from torch import nn

from actlab.engine import runner
from actlab.engine.batch import TokenBatch
from actlab.engine.batching import position_ids_from_mask
from actlab.engine.capture import Capture, OpenCaptures
from actlab.engine.hooks import Handle, HookManager, process_random
from actlab.errors import ActlabError
from actlab.models import inputs as model_inputs
from actlab.models import placement
from actlab.models.sites import SiteMap

_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "use_cache",
    "_attn_implementation", "_attn_implementation_autoset", "output_hidden_states", "return_dict",
    "_commit_hash", "tie_word_embeddings",
}


def config_hash(config) -> str:
    """A short hash of the architecture-defining config fields (not dtype, paths or versions)."""
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def same_model(a: dict, b: dict) -> bool:
    """Whether two ``Model.identity()`` records name the same model: the same class and config, and the
    same name or the same weights fingerprint (so ``./path`` and ``demo-llama`` are one model, while
    two fine-tunes that share a config are not). Records older than the fingerprint compare by name."""
    if a.get("model_class") != b.get("model_class") or a.get("config_hash") != b.get("config_hash"):
        return False
    same_weights = a.get("weights_hash") is not None and a.get("weights_hash") == b.get("weights_hash")
    return same_weights or a.get("model_name") == b.get("model_name")


def context_length(config, tokenizer=None) -> int:
    """Context length: the config's positions limit (2048 when it has none), capped by the tokenizer's."""
    cfg = getattr(config, "text_config", None) or config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < limit:
        limit = tok_limit
    return int(limit)


def check_edit(edit) -> None:
    """What ``Model.edit`` takes: an Intervention (with ``edits()``) or an engine edit, a callable
    ``(h, state) -> h`` naming its ``site``; anything else (a string, a path, a tensor) is refused."""
    if isinstance(getattr(edit, "site", None), str) and callable(edit):
        return
    hint = " (load a file first: actlab.interventions.load_interventions(path, model))" if isinstance(edit, str) else ""
    raise ActlabError(f"model.edit takes interventions or engine edits (objects with a site that are called on "
                      f"activations), not {type(edit).__name__}{hint}")


class Model:
    """A transformer with named sites. Build it with ``actlab.load``."""

    def __init__(self, hf_model: nn.Module, tokenizer, name: str | None = None):
        self.hf = hf_model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(hf_model.config, "_name_or_path", None) or type(hf_model).__name__
        self.sitemap = SiteMap(hf_model)
        self.hooks = HookManager(hf_model, self.sitemap)
        self._split = placement.is_dispatched(hf_model)
        if self._split:  # a site's tensor lives where its module computes, inputs included (docs/devices.md)
            self.hooks.input_device = lambda path: placement.execution_device(hf_model, path)
            self._input_device = self.module_device(self._input_module())
        self._captures = OpenCaptures()  # per thread: a call stamps its ids on its own thread's captures
        self._anatomy = None
        self._accepts = set(inspect.signature(hf_model.forward).parameters)
        if tokenizer is not None and tokenizer.pad_token_id is None:
            fallback = tokenizer.eos_token or tokenizer.unk_token
            if fallback is not None:
                tokenizer.pad_token = fallback

    # ------------------------------------------------------------- properties
    def __repr__(self) -> str:
        return (
            f"actlab.Model({self.name!r}, {self.sitemap.model_class}, layers={self.n_layers}, "
            f"d_model={self.d_model}, d_mlp={self.d_mlp})"
        )

    @property
    def sites(self) -> dict[str, int]:
        """Every site of this model and its width."""
        return self.sitemap.widths

    @property
    def n_layers(self) -> int:
        return self.sitemap.n_layers

    @property
    def d_model(self) -> int:
        return self.sitemap.d_model

    @property
    def d_mlp(self) -> int | None:
        return self.sitemap.d_mlp

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (for a model split over devices, its first)."""
        return self._input_device if self._split else next(self.hf.parameters()).device

    @property
    def devices(self) -> list[torch.device]:
        """Every device the model computes on (one unless it was loaded with a device map)."""
        return placement.devices(self.hf) if self._split else [self.device]

    @property
    def device_map(self) -> dict[str, str] | None:
        """Module name -> device of a model split by accelerate (``hf_device_map``), else None."""
        placed = getattr(self.hf, "hf_device_map", None)
        return {k: str(v) for k, v in placed.items()} if self._split and placed else None

    def module_device(self, path: str) -> torch.device:
        """Where module ``path`` computes (offloaded modules compute on their execution device)."""
        return placement.execution_device(self.hf, path) if self._split else self.device

    def site_device(self, site: str) -> torch.device:
        """The device a site's activation is on when hooks see it: put an SAE or an edit's tensors there."""
        return self.module_device(self.sitemap[site].module_path)

    def _input_module(self) -> str:
        emb = self.hf.get_input_embeddings() if hasattr(self.hf, "get_input_embeddings") else None
        return next((name for name, module in self.hf.named_modules() if module is emb), "")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def config_hash(self) -> str:
        return config_hash(self.hf.config)

    @property
    def weights_hash(self) -> str:
        """A short fingerprint of the weights (the first 64 values of every tensor, rounded to bfloat16 so
        the same checkpoint loaded in another dtype, or split over devices, matches): tells the same model
        under two names (``./path`` and ``demo-llama``) from two fine-tunes that share a config. Computed on
        each call (milliseconds, and only when a file is written or checked; a disk-offloaded model reads its
        offloaded tensors back), so weights edited in place count."""
        h = hashlib.sha256()
        for name, tensor in sorted(placement.state_tensors(self.hf) if self._split else self.hf.state_dict().items()):
            if tensor.is_floating_point() and tensor.device.type != "meta":
                head = tensor.detach().flatten()[:64].to("cpu", torch.bfloat16).view(torch.int16)
                h.update(name.encode() + head.numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def has_lm_head(self) -> bool:
        return self.hf.get_output_embeddings() is not None if hasattr(self.hf, "get_output_embeddings") else False

    @property
    def is_causal(self) -> bool:
        return self.has_lm_head and bool(getattr(self.hf, "can_generate", lambda: False)())

    @property
    def max_length(self) -> int:
        """Context length: the model's positions limit, or 2048 for models without one."""
        return context_length(self.hf.config, self.tokenizer)

    @property
    def vocab_size(self) -> int | None:
        """How many token ids the model takes: the config's count, else the input embedding's rows."""
        cfg = getattr(self.hf.config, "text_config", None) or self.hf.config
        if isinstance(getattr(cfg, "vocab_size", None), int):
            return int(cfg.vocab_size)
        emb = self.hf.get_input_embeddings() if hasattr(self.hf, "get_input_embeddings") else None
        weight = getattr(emb, "weight", None)
        return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None

    @property
    def n_params(self) -> int:
        """Number of weights (tied tensors counted once)."""
        return sum(p.numel() for p in self.hf.parameters())

    @property
    def anatomy(self):
        """The structural facts of this model (final norm, unembedding, MLP parts): see ``actlab.models.anatomy``."""
        if self._anatomy is None:
            from actlab.models.anatomy import Anatomy

            self._anatomy = Anatomy(self)
        return self._anatomy

    @property
    def pad_token_id(self) -> int:
        pid = getattr(self.tokenizer, "pad_token_id", None)
        return int(pid) if pid is not None else 0

    def identity(self) -> dict:
        """What files made for this model record, so a mismatch is caught at load time."""
        return {
            "model_name": self.name,
            "model_class": self.sitemap.model_class,
            "config_hash": self.config_hash,
            "weights_hash": self.weights_hash,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
        }

    def resolve(self, selectors: str | Iterable[str]) -> list[str]:
        """Expand site selectors (``resid.*``, ``mlp.hidden.1-3``, ``resid.-1``) into site names."""
        if not isinstance(selectors, str):
            items = list(selectors) if hasattr(selectors, "__iter__") and not torch.is_tensor(selectors) else None
            if items is None or not all(isinstance(s, str) for s in items):
                raise ActlabError(f"sites must be a selector string such as 'resid.*' or a list of them, not {selectors!r}")
            selectors = items
        return self.sitemap.resolve(selectors)

    # ----------------------------------------------------------------- inputs
    def tokenize(
        self, texts: str | Sequence[str], *, padding_side: str = "right", max_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask for a batch of texts; long texts lose their end, with a warning."""
        return model_inputs.tokenize(self, texts, padding_side=padding_side, max_length=max_length)

    def forward_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """Keyword arguments for the HF forward, with position ids that ignore padding."""
        device = self.device
        kwargs = {"input_ids": input_ids.to(device)}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(device)
            if "position_ids" in self._accepts and self.sitemap.model_type not in ("opt",):
                kwargs["position_ids"] = position_ids_from_mask(attention_mask).to(device)
        if "use_cache" in self._accepts:
            kwargs["use_cache"] = False
        return kwargs

    def _as_inputs(self, values, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        return model_inputs.as_inputs(self, values, attention_mask)

    # -------------------------------------------------------------- running
    def __call__(self, inputs, attention_mask: torch.Tensor | None = None, **kwargs):
        """Run the model on texts or token ids (under no_grad); returns the HF output."""
        ids, mask = self._as_inputs(inputs, attention_mask)
        for cap in self._captures:
            cap.input_ids = ids
        with torch.no_grad():
            return self.hf(**self.forward_inputs(ids, mask), **kwargs)

    def capture(self, sites: str | Iterable[str]) -> Capture:
        """Context manager that records ``sites`` for every forward pass the calling thread runs inside it."""
        return Capture(self, sites)

    def add_view(self, name: str, base: str, view, width: int) -> Handle:
        """Add the virtual site ``name`` (an ``engine.hooks.SiteView`` at the hook point of ``base``) until the
        handle is removed: captured, recorded and edited like any site (``actlab.sae.attach`` uses it)."""
        self.sitemap.add_view(name, base, view, width)
        return Handle(lambda: self.sitemap.remove_view(name))

    def edit(self, *edits) -> Handle:
        """Apply edits (Interventions or engine edits) to the calling thread's forward passes until the handle
        is removed or the block exits (other threads sharing the model are not affected)."""
        flat = []
        for e in (x for item in edits for x in (item if isinstance(item, (list, tuple)) else [item])):
            flat.extend(e.edits() if hasattr(e, "edits") else [e])
        for e in flat:
            check_edit(e)
            if hasattr(e, "check_model"):
                e.check_model(self)
            self.sitemap[e.site]
        handles = [self.hooks.add_edit(e) for e in flat]

        def remove() -> None:
            for h in handles:
                h.remove()

        return Handle(remove)

    def run(self, docs, sites="resid.*", sinks=(), **kwargs):
        """Stream activations of ``sites`` over documents into sinks (see ``actlab.engine.runner.run``:
        ``rows=``, ``options=`` or keywords such as ``positions``, ``select``, ``grad``, ``device``)."""
        return runner.run(self, docs, sites, sinks, **kwargs)

    def collect(self, docs, sites="resid.*", *, positions="last", batch_size: int = 8, **kwargs) -> TokenBatch:
        """Activations of ``sites`` at ``positions`` for every document (or ``rows=``), gathered in memory.

        Takes the runner's options too: ``select=`` for a custom token selection, ``grad=True`` to keep
        the graph, ``device=None`` to leave the tensors on the model's device."""
        parts: list[TokenBatch] = []

        class _Gather:
            def consume(self, batch: TokenBatch) -> None:
                parts.append(batch)

        runner.run(self, docs, sites, [_Gather()], positions=positions, batch_size=batch_size, **kwargs)
        return TokenBatch(
            acts={s: torch.cat([p.acts[s] for p in parts]) for s in parts[0].acts},
            token_ids=torch.cat([p.token_ids for p in parts]),
            doc_ids=torch.cat([p.doc_ids for p in parts]),
            positions=torch.cat([p.positions for p in parts]),
        )

    def generate(
        self,
        prompts: str | Sequence[str] | torch.Tensor,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        return_ids: bool = False,
        use_cache: bool = True,
        streamer=None,
    ):
        """Generate continuations with any active edits and captures; returns the new text per prompt.

        Prompts are left-padded; edits are told where the prompt ends (``hooks.prompt_length``) so
        "prompt"/"generated" position modes work with and without the KV cache.
        """
        if not self.is_causal:
            raise ActlabError(f"{self.sitemap.model_class} cannot generate text (it has no causal LM head)")
        model_inputs.check_generation(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                      top_p=top_p, seed=seed)
        single = isinstance(prompts, str)
        ids, mask = model_inputs.prompt_inputs(self, prompts, max_new_tokens)  # a long prompt keeps its end
        for cap in self._captures:
            cap.input_ids = ids
        # torch's random generator is process-wide: a sampling thread holds it from the seed to the last token
        with process_random(do_sample or seed is not None), self.hooks.prompt_length(ids.shape[1]), torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            gen_kwargs = dict(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=self.pad_token_id,
                use_cache=use_cache,
                streamer=streamer,
                logits_processor=model_inputs.usable_scores(),  # NaN / inf / flat scores: a clear error
            )
            if do_sample:
                gen_kwargs.update(temperature=temperature, top_p=top_p)
            else:
                gen_kwargs.update(temperature=None, top_p=None, top_k=None)
            out = self.hf.generate(**gen_kwargs)
        new = out[:, ids.shape[1]:].cpu()
        if return_ids:
            return new
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return texts[0] if single else texts
