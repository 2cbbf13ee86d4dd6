"""One hook per (module, mode) that runs the edits, then the readers, of every site living there.

Readers and edits are registered by site name and removed through handles, so captures, stores,
statistics and interventions all share one mechanism and can be stacked in any combination.
Edits run before readers: what is read is what the model actually propagates.

Registrations belong to the thread that made them: the torch hooks are shared (installed once per
module, for every thread), but each call runs only the calling thread's edits and readers, with
that thread's ``ForwardState``. Several threads can capture, edit and generate on one model at once,
each seeing only its own forward passes (see "Concurrency" in docs/architecture.md).
"""

from __future__ import annotations

import itertools
import threading
import weakref
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


class SiteView(Protocol):
    """A virtual site computed from the tensor at its hook point (an attached SAE's latents).

    ``apply`` gets the hook's tensor and the site's edits and readers: it shows the readers its own
    view of the tensor, applies the edits in that view, and returns the new tensor and whether it
    changed. The site map lends views through ``views`` (site name -> view)."""

    def apply(self, h: torch.Tensor, state: ForwardState, edits: list, readers: list,
              site: str) -> tuple[torch.Tensor, bool]: ...


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


class _ThreadHooks:
    """What one thread registered (edits and readers by site), the sites it needs at each hook point,
    and its forward state. A site's table and ``at`` are replaced, never changed in place, so a hook
    reads them unlocked while another thread removes one of this thread's handles."""

    __slots__ = ("edits", "readers", "at", "state", "inside", "__weakref__")

    def __init__(self) -> None:
        self.edits: dict[str, dict[int, Edit]] = {}
        self.readers: dict[str, dict[int, Reader]] = {}
        self.at: dict[tuple[str, str], tuple[str, ...]] = {}  # (module path, mode) -> this thread's sites
        self.state = ForwardState()
        self.inside = False  # True while edits and readers run: modules they call run unhooked


class HookManager:
    """Owns every torch hook actlab puts on one model; keeps each thread's registrations apart."""

    def __init__(self, hf_model: nn.Module, sitemap: SiteLookup):
        self.hf_model = hf_model
        self.sitemap = sitemap
        self._local = threading.local()  # .hooks: the calling thread's _ThreadHooks
        self._threads: weakref.WeakSet[_ThreadHooks] = weakref.WeakSet()  # every live thread's
        self._lock = threading.RLock()  # registration and hook installation (never taken by a hook)
        self._ids = itertools.count()
        self._torch_handles: dict[tuple[str, str], object] = {}
        self._state_handle = None
        # module path -> where it computes, for a model split over devices (set by its owner): an input hook
        # moves the tensor there first, so edits and readers of a site always see it on one device
        self.input_device: Callable[[str], torch.device] | None = None
        self._targets: dict[tuple[str, str], torch.device] = {}

    def _mine(self) -> _ThreadHooks:
        mine = getattr(self._local, "hooks", None)
        if mine is None:
            mine = self._local.hooks = _ThreadHooks()
            with self._lock:
                self._threads.add(mine)
        return mine

    @property
    def state(self) -> ForwardState:
        """The calling thread's forward state."""
        return self._mine().state

    # ------------------------------------------------------------ registration
    def add_reader(self, site: str, reader: Reader) -> Handle:
        """Call ``reader(site, h, state)`` on the calling thread's forward passes until the handle is removed."""
        return self._add("readers", site, reader)

    def add_edit(self, edit: Edit) -> Handle:
        """Apply ``edit`` to the calling thread's forward passes until the handle is removed."""
        return self._add("edits", edit.site, edit)

    def _add(self, kind: str, site: str, item) -> Handle:
        self.sitemap[site]  # validates the name
        mine = self._mine()
        with self._lock:
            key = next(self._ids)
            table = getattr(mine, kind)
            table[site] = {**table.get(site, {}), key: item}
            self._refresh(mine)

        def remove() -> None:  # from any thread: it edits the registering thread's tables
            with self._lock:
                rest = {k: v for k, v in table.get(site, {}).items() if k != key}
                if rest:
                    table[site] = rest
                else:
                    table.pop(site, None)
                self._refresh(mine)

        return Handle(remove)

    @contextmanager
    def prompt_length(self, n: int | None) -> Iterator[None]:
        """Tell the calling thread's edits where the prompt ends (columns >= ``n`` are generated) for the
        forwards inside; the previous value comes back afterwards. ``None``: every token counts as prompt."""
        state = self.state
        saved = state.prompt_length
        state.prompt_length = None if n is None else int(n)
        try:
            yield
        finally:
            state.prompt_length = saved

    @property
    def active(self) -> bool:
        """Whether any thread has an edit or a reader registered."""
        with self._lock:
            return any(t.edits or t.readers for t in list(self._threads))

    def _refresh(self, mine: _ThreadHooks) -> None:
        """Recompute which sites ``mine`` needs at each hook point, then the torch hooks (lock held)."""
        at: dict[tuple[str, str], list[str]] = {}
        for site in list(mine.edits) + list(mine.readers):
            point = self.sitemap[site]
            sites = at.setdefault((point.module_path, point.mode), [])
            if site not in sites:
                sites.append(site)
        mine.at = {key: tuple(sites) for key, sites in at.items()}
        self._sync()

    def _sync(self) -> None:
        """Install a torch hook on every module some thread needs, drop those no thread needs (lock held).
        A hook stays in place while it is needed, so no thread's forward ever misses one."""
        needed = set()
        for thread in list(self._threads):
            needed.update(thread.at)
        for key in [k for k in self._torch_handles if k not in needed]:
            self._torch_handles.pop(key).remove()
        for key in needed - set(self._torch_handles):
            module = self.hf_model.get_submodule(key[0])
            if key[1] == "output":
                hook = module.register_forward_hook(self._make_output_hook(key))
            else:
                if self.input_device is not None:
                    self._targets[key] = self.input_device(key[0])
                hook = module.register_forward_pre_hook(self._make_input_hook(key), with_kwargs=True)
            self._torch_handles[key] = hook
        if needed and self._state_handle is None:
            self._state_handle = self.hf_model.register_forward_pre_hook(self._update_state, with_kwargs=True)
        elif not needed and self._state_handle is not None:
            self._state_handle.remove()
            self._state_handle = None

    # ------------------------------------------------------------------ hooks
    # Hooks take ``kwargs=None``: torch marks a pre-hook "with kwargs" just after adding it, so a
    # thread running while another installs one may call it once without; that thread has nothing
    # registered there (or the hook would be installed already) and the hook returns None.
    def _update_state(self, module, args, kwargs=None) -> None:
        mine = getattr(self._local, "hooks", None)
        if mine is None or not mine.at:
            return
        kwargs = kwargs or {}
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        cache = kwargs.get("past_key_values")
        offset = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            offset = int(cache.get_seq_length())
        state = mine.state
        state.batch_size = int(ids.shape[0])
        state.length = int(ids.shape[1])
        state.offset = offset
        state.attention_mask = kwargs.get("attention_mask")

    def _apply(self, mine: _ThreadHooks, sites: tuple[str, ...], h: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Run the calling thread's edits then readers of ``sites``. A module an edit calls (``Replace`` by
        the MLP itself) runs unhooked, so it computes its own function instead of recursing into this hook."""
        mine.inside = True
        try:
            return self._apply_inside(mine, sites, h)
        finally:
            mine.inside = False

    def _apply_inside(self, mine: _ThreadHooks, sites: tuple[str, ...], h: torch.Tensor) -> tuple[torch.Tensor, bool]:
        state = mine.state
        flat_shape = None
        if h.ndim == 2 and h.shape[0] == state.batch_size * state.length:
            flat_shape = h.shape  # some models (OPT) run their MLP on [batch*seq, width]
            h = h.view(state.batch_size, state.length, -1)
        changed = False
        edits, readers = mine.edits, mine.readers
        views = getattr(self.sitemap, "views", None)
        for site in sites:
            view = views.get(site) if views else None
            if view is not None:
                h, touched = view.apply(h, state, list(edits.get(site, {}).values()),
                                        list(readers.get(site, {}).values()), site)
                changed = changed or touched
                continue
            for edit in edits.get(site, {}).values():
                h = edit(h, state)
                changed = True
            for reader in readers.get(site, {}).values():
                reader(site, h, state)
        if flat_shape is not None:
            h = h.reshape(flat_shape)
        return h, changed

    # The hot path: one thread-local read and one dict lookup decide whether this thread has work here.
    def _make_output_hook(self, key: tuple[str, str]):
        local = self._local

        def hook(module, args, output):
            mine = getattr(local, "hooks", None)
            sites = None if mine is None or mine.inside else mine.at.get(key)
            if not sites:
                return None
            h, changed = self._apply(mine, sites, _first_tensor(output))
            return _replace_first(output, h) if changed else None

        return hook

    def _make_input_hook(self, key: tuple[str, str]):
        local = self._local

        def hook(module, args, kwargs=None):
            mine = getattr(local, "hooks", None)
            sites = None if mine is None or mine.inside or kwargs is None else mine.at.get(key)
            if not sites:
                return None
            h = args[0] if args else kwargs["hidden_states"]
            target = self._targets.get(key)
            moved = target is not None and h.device != target
            h, changed = self._apply(mine, sites, h.to(target) if moved else h)
            changed = changed or moved
            if args:
                return ((h,) + tuple(args[1:]), kwargs) if changed else None
            if changed:
                kwargs = dict(kwargs, hidden_states=h)
                return args, kwargs
            return None

        return hook


_RANDOM = threading.RLock()


@contextmanager
def process_random(needed: bool = True) -> Iterator[None]:
    """Hold torch's random generator, which is process-wide, for the block (when ``needed``).

    A seeded sampling generation holds it from ``manual_seed`` to its last token, so another thread's
    draws cannot fall in between; sampling in other threads waits its turn instead of mixing.
    """
    if not needed:
        yield
        return
    with _RANDOM:
        yield
