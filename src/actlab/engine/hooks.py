"""One hook per (module, mode) that runs the edits, then the readers, of every site living there.

Readers and edits are registered by site name and removed through handles, so captures, stores,
statistics and interventions all share one mechanism and can be stacked in any combination.
Edits run before readers: what is read is what the model actually propagates.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch
from torch import nn


@dataclass
class ForwardState:
    """What the hooks need to know about the forward pass in flight.

    ``offset`` is the number of tokens already in the KV cache, so ``columns`` are absolute
    positions in the (padded) sequence and edits behave identically with and without a cache.
    ``prompt_length`` is set through ``HookManager.prompt_length`` (by generate and the likelihood
    loop): columns at or after it are generated tokens.
    """

    batch_size: int = 0
    length: int = 0
    offset: int = 0
    attention_mask: torch.Tensor | None = None
    prompt_length: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def columns(self) -> torch.Tensor:
        return torch.arange(self.offset, self.offset + self.length)

    def token_mask(self) -> torch.Tensor:
        """[batch, length] bool: True for real (non-padding) tokens of this call."""
        if self.attention_mask is None:
            return torch.ones(self.batch_size, self.length, dtype=torch.bool)
        mask = self.attention_mask[:, self.offset : self.offset + self.length]
        return mask.to(torch.bool).cpu()


class HookPointLike(Protocol):
    """Where a site lives: ``module_path`` of the module, ``mode`` "output" or "input"."""

    module_path: str
    mode: str


class SiteLookup(Protocol):
    """Site name -> hook point (``actlab.models.sites.SiteMap`` is one); raises on an unknown name."""

    def __getitem__(self, site: str) -> HookPointLike: ...


class Edit(Protocol):
    """Anything that changes the activation of one site: returns the new activation."""

    site: str

    def __call__(self, h: torch.Tensor, state: ForwardState) -> torch.Tensor: ...


Reader = Callable[[str, torch.Tensor, ForwardState], None]


class StopForward(Exception):
    """Raised by a reader once every requested site is read, to skip the rest of the model."""


class Handle:
    """Removes what it was returned for; usable as a context manager."""

    def __init__(self, remove: Callable[[], None]):
        self._remove = remove
        self.removed = False

    def remove(self) -> None:
        if not self.removed:
            self._remove()
            self.removed = True

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _first_tensor(value):
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, new):
    return (new,) + tuple(value[1:]) if isinstance(value, tuple) else new


class HookManager:
    """Owns every torch hook actlab puts on one model."""

    def __init__(self, hf_model: nn.Module, sitemap: SiteLookup):
        self.hf_model = hf_model
        self.sitemap = sitemap
        self.state = ForwardState()
        self._ids = itertools.count()
        self._edits: dict[str, dict[int, Edit]] = {}
        self._readers: dict[str, dict[int, Reader]] = {}
        self._torch_handles: dict[tuple[str, str], object] = {}
        self._hooked_sites: dict[tuple[str, str], list[str]] = {}  # which sites each installed hook serves
        self._state_handle = None
        self._inside = False  # True while edits and readers run: modules they call run unhooked

    # ------------------------------------------------------------ registration
    def add_reader(self, site: str, reader: Reader) -> Handle:
        return self._add(self._readers, site, reader)

    def add_edit(self, edit: Edit) -> Handle:
        return self._add(self._edits, edit.site, edit)

    def _add(self, table: dict, site: str, item) -> Handle:
        self.sitemap[site]  # validates the name
        key = next(self._ids)
        table.setdefault(site, {})[key] = item
        self._sync()

        def remove() -> None:
            table.get(site, {}).pop(key, None)
            if site in table and not table[site]:
                del table[site]
            self._sync()

        return Handle(remove)

    @contextmanager
    def prompt_length(self, n: int | None) -> Iterator[None]:
        """Tell the edits where the prompt ends (columns >= ``n`` are generated) for the forwards inside;
        the previous value comes back afterwards. ``None``: every token counts as prompt."""
        saved = self.state.prompt_length
        self.state.prompt_length = None if n is None else int(n)
        try:
            yield
        finally:
            self.state.prompt_length = saved

    @property
    def active(self) -> bool:
        return bool(self._edits or self._readers)

    def _sync(self) -> None:
        """Install torch hooks for sites that need one, drop the ones no longer used."""
        needed: dict[tuple[str, str], list[str]] = {}
        for site in list(self._edits) + list(self._readers):
            point = self.sitemap[site]
            sites = needed.setdefault((point.module_path, point.mode), [])
            if site not in sites:
                sites.append(site)
        for key in list(self._torch_handles):
            if key not in needed:
                self._torch_handles.pop(key).remove()
                self._hooked_sites.pop(key, None)
        for key, sites in needed.items():
            if self._hooked_sites.get(key) == sites:
                continue  # already installed for exactly these sites
            if key in self._torch_handles:
                self._torch_handles[key].remove()
            module = self.hf_model.get_submodule(key[0])
            if key[1] == "output":
                hook = module.register_forward_hook(self._make_output_hook(sites))
            else:
                hook = module.register_forward_pre_hook(self._make_input_hook(sites), with_kwargs=True)
            self._torch_handles[key] = hook
            self._hooked_sites[key] = sites
        if needed and self._state_handle is None:
            self._state_handle = self.hf_model.register_forward_pre_hook(self._update_state, with_kwargs=True)
        elif not needed and self._state_handle is not None:
            self._state_handle.remove()
            self._state_handle = None

    # ------------------------------------------------------------------ hooks
    def _update_state(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        cache = kwargs.get("past_key_values")
        offset = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            offset = int(cache.get_seq_length())
        self.state.batch_size = int(ids.shape[0])
        self.state.length = int(ids.shape[1])
        self.state.offset = offset
        self.state.attention_mask = kwargs.get("attention_mask")

    def _apply(self, sites: list[str], h: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Run the edits then the readers of ``sites``. A module an edit calls (``Replace`` by the MLP
        itself) runs unhooked, so it computes its own function instead of recursing into this hook."""
        self._inside = True
        try:
            return self._apply_inside(sites, h)
        finally:
            self._inside = False

    def _apply_inside(self, sites: list[str], h: torch.Tensor) -> tuple[torch.Tensor, bool]:
        flat_shape = None
        if h.ndim == 2 and h.shape[0] == self.state.batch_size * self.state.length:
            flat_shape = h.shape  # some models (OPT) run their MLP on [batch*seq, width]
            h = h.view(self.state.batch_size, self.state.length, -1)
        changed = False
        for site in sites:
            for edit in list(self._edits.get(site, {}).values()):
                h = edit(h, self.state)
                changed = True
            for reader in list(self._readers.get(site, {}).values()):
                reader(site, h, self.state)
        if flat_shape is not None:
            h = h.reshape(flat_shape)
        return h, changed

    def _make_output_hook(self, sites: list[str]):
        def hook(module, args, output):
            if self._inside:
                return None
            h, changed = self._apply(sites, _first_tensor(output))
            return _replace_first(output, h) if changed else None

        return hook

    def _make_input_hook(self, sites: list[str]):
        def hook(module, args, kwargs):
            if self._inside:
                return None
            if args:
                h, changed = self._apply(sites, args[0])
                return ((h,) + tuple(args[1:]), kwargs) if changed else None
            h, changed = self._apply(sites, kwargs["hidden_states"])
            if changed:
                kwargs = dict(kwargs, hidden_states=h)
                return args, kwargs
            return None

        return hook
