"""StatsSink: per-site ChannelStats fed by TokenBatches, saved as one safetensors file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from actlab.errors import ActlabError
from actlab.files import CHECKSUM_KEY, check_checksum, content_sha256, open_tensors, save_tensors
from actlab.stats.channel import STATE_FIELDS, ChannelStats

if TYPE_CHECKING:  # no runtime import: the engine may import this module
    from actlab.engine.batch import TokenBatch

__all__ = ["StatsSink", "FORMAT", "FORMAT_VERSION", "HEADER_KEY"]

FORMAT = "actlab.stats"
FORMAT_VERSION = 1
HEADER_KEY = "actlab"  # safetensors metadata key holding the JSON header
_CONFIG_KEYS = ("eps", "hist_range", "bins_per_octave", "sparsity_bins", "topk")


def _actlab_version() -> str:
    import actlab

    return str(getattr(actlab, "__version__", "unknown"))


class StatsSink:
    """Streaming statistics of several sites; a ``Sink`` for the engine.

    Args:
        sites_widths: ``{site name: width}``. ``None`` learns the sites and widths from the
            first batch.
        **cfg: ChannelStats options shared by every site (``eps``, ``hist_range``,
            ``bins_per_octave``, ``sparsity_bins``, ``topk``).

    Sites present in a batch but not configured are ignored; a configured site missing from a
    batch is an error.
    """

    def __init__(self, sites_widths: dict[str, int] | None = None, **cfg):
        unknown = set(cfg) - set(_CONFIG_KEYS)
        if unknown:
            raise ActlabError(
                f"unknown stats option(s) {sorted(unknown)}; valid options are {list(_CONFIG_KEYS)}"
            )
        self.cfg = dict(cfg)
        self.stats: dict[str, ChannelStats] = {}
        self.metadata: dict[str, Any] = {}  # the caller's metadata of a loaded file
        self.file_header: dict[str, Any] | None = None  # whole header of a loaded file
        if sites_widths is not None:
            if not isinstance(sites_widths, dict) or not sites_widths:
                raise ActlabError(
                    "sites_widths must be a non-empty dict {site name: width}, "
                    f"got {sites_widths!r}"
                )
            for site, width in sites_widths.items():
                self._add_site(site, width)
        # validate cfg now even when sites come later
        self._template = ChannelStats(1, **self.cfg)

    def _add_site(self, site: str, width: int) -> None:
        if not isinstance(site, str) or not site:
            raise ActlabError(f"site names must be non-empty strings, got {site!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ActlabError(f"site {site!r}: width must be a positive integer, got {width!r}")
        self.stats[site] = ChannelStats(width, **self.cfg)

    @property
    def sites(self) -> list[str]:
        return list(self.stats)

    @property
    def widths(self) -> dict[str, int]:
        return {s: st.width for s, st in self.stats.items()}

    def __getitem__(self, site: str) -> ChannelStats:
        try:
            return self.stats[site]
        except KeyError:
            raise ActlabError(f"no stats for site {site!r}; available sites: {self.sites}") from None

    def __contains__(self, site: str) -> bool:
        return site in self.stats

    # ------------------------------------------------------------------ streaming
    def consume(self, batch: TokenBatch) -> None:
        """Update every configured site with the batch's activations."""
        if not self.stats:
            for site, x in batch.acts.items():
                self._add_site(site, int(math.prod(x.shape[1:])))
        for site, st in self.stats.items():
            x = batch.acts.get(site)
            if x is None:
                raise ActlabError(
                    f"the batch has no activations for site {site!r} (it has {sorted(batch.acts)}); "
                    "record that site or leave it out of the stats sites"
                )
            st.update(x, batch.doc_ids, batch.positions, batch.token_ids)

    def merge(self, other: "StatsSink") -> "StatsSink":
        """Fold another sink with the same sites and config into this one; returns ``self``."""
        if not isinstance(other, StatsSink):
            raise ActlabError(f"can only merge StatsSink with StatsSink, got {type(other).__name__}")
        if other.widths != self.widths:
            raise ActlabError(
                f"cannot merge stats of different sites: {self.widths} vs {other.widths}"
            )
        for site, st in self.stats.items():
            st.merge(other.stats[site])
        return self

    def all_reduce(self) -> "StatsSink":
        """Combine this sink with its twins on the other ranks of a ``torch.distributed`` job: afterwards
        every rank holds the statistics of all the ranks' tokens, folded in rank order (see
        ``actlab.stats.distributed``). A no-op in one process. Returns ``self``."""
        from actlab.stats.distributed import all_reduce_stats

        self.stats = all_reduce_stats(self.stats)
        return self

    @property
    def n_tokens(self) -> int:
        return max((st.count for st in self.stats.values()), default=0)

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{site: {tokens, width, mean, std, rms, min, max, absmax, absmax_channel,
        absmax_over_median, zero_frac, small_frac, dead_channels, dead_frac, nonfinite}}``."""
        return {site: st.summary() for site, st in self.stats.items()}

    # ------------------------------------------------------------------ files
    def config(self) -> dict[str, Any]:
        """The shared ChannelStats config (JSON-able, width excluded)."""
        c = self._template.config()
        c.pop("width")
        return c

    def header(self, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "actlab_version": _actlab_version(),
            "sites": self.widths,
            "config": self.config(),
            "metadata": dict(metadata or {}),
        }

    def save(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write one safetensors file: tensors ``"<site>/<field>"`` plus a JSON header (format,
        version, actlab version, site widths, config and ``metadata``, e.g. model name and
        config hash) in the safetensors metadata under ``"actlab"``. Written atomically."""
        if not self.stats:
            raise ActlabError("no sites to save: the stats sink has not seen any batch")
        if metadata is not None and not isinstance(metadata, dict):
            raise ActlabError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            header_fields = self.header(metadata)
            header = json.dumps(header_fields, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ActlabError(
                f"stats metadata must be JSON-serialisable (strings, numbers, lists, dicts): {e}"
            ) from None
        tensors = {
            f"{site}/{name}": t for site, st in self.stats.items() for name, t in st.state_dict().items()
        }
        path = Path(path)
        if path.parent and not path.parent.exists():
            raise ActlabError(f"cannot write {path}: directory {path.parent} does not exist")
        try:
            # the checksum lives inside the one JSON header, so the file keeps a single metadata key
            header_fields[CHECKSUM_KEY] = content_sha256(tensors, {HEADER_KEY: header})
            save_tensors(path, tensors, None, {HEADER_KEY: json.dumps(header_fields, sort_keys=True, allow_nan=False)})
        except OSError as e:
            raise ActlabError(f"cannot write stats file {path}: {e}") from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StatsSink":
        """Read a file written by ``save``; ActlabError if it is missing, corrupt or foreign.
        The caller's metadata is in ``.metadata``, the whole header in ``.file_header``."""
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not a stats file" if path.is_dir() else "not found"
            raise ActlabError(f"stats file {path} {what}")
        bad = f"{path} is not a valid actlab stats file"
        tensors: dict[str, torch.Tensor] = {}
        try:
            with open_tensors(path) as f:
                meta = f.metadata() or {}
                raw_header = meta.get(HEADER_KEY)
                if raw_header is None:
                    raise ActlabError(
                        f"{bad}: it is a safetensors file without an actlab header "
                        "(was it written by `StatsSink.save` / `actlab stats`?)"
                    )
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except ActlabError:
            raise
        except Exception as e:  # safetensors raises several types on truncated/garbage files
            raise ActlabError(
                f"{bad}: cannot read it as safetensors ({type(e).__name__}: {e}); "
                "the file is truncated or corrupt, re-run the stats computation"
            ) from None
        try:
            header = json.loads(raw_header)
        except (ValueError, RecursionError) as e:
            raise ActlabError(f"{bad}: its header is not valid JSON ({e})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            fmt = header.get("format") if isinstance(header, dict) else None
            raise ActlabError(f"{bad}: header format is {fmt!r}, expected {FORMAT!r}")
        version = header.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise ActlabError(f"{bad}: bad format_version {version!r}")
        if version > FORMAT_VERSION:
            raise ActlabError(
                f"{path} uses stats format version {version}, newer than this actlab "
                f"({_actlab_version()}) understands ({FORMAT_VERSION}); upgrade actlab"
            )
        _check_stats_checksum(path, tensors, header)
        sites, config = header.get("sites"), header.get("config")
        if not isinstance(sites, dict) or not sites or not isinstance(config, dict):
            raise ActlabError(f"{bad}: header lacks the 'sites' / 'config' objects")
        expected = {f"{s}/{name}" for s in sites for name in STATE_FIELDS}
        extra = sorted(set(tensors) - expected)
        if extra:
            raise ActlabError(f"{bad}: unexpected tensors {extra[:5]}")
        metadata = header.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ActlabError(f"{bad}: its 'metadata' should be an object, not {type(metadata).__name__}")
        sink = cls.__new__(cls)
        sink.cfg = {k: config[k] for k in _CONFIG_KEYS if k in config}
        sink.stats = _load_sites(path, bad, sites, config, tensors)
        sink._template = next(iter(sink.stats.values()))
        sink.metadata = metadata
        sink.file_header = header
        return sink

    def __repr__(self) -> str:
        return f"StatsSink(sites={self.widths}, tokens={self.n_tokens})"


def _load_sites(path: Path, bad: str, sites: dict, config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, ChannelStats]:
    """Each site's ChannelStats; a width is checked against the file's tensors before anything of
    that width is allocated (so a header number never sizes memory)."""
    stats = {}
    for site, width in sites.items():
        mean = tensors.get(f"{site}/mean")
        if isinstance(width, bool) or not isinstance(width, int) or mean is None or tuple(mean.shape) != (width,):
            found = "no mean tensor" if mean is None else f"a mean of shape {list(mean.shape)}"
            raise ActlabError(f"{bad}: site {site!r} has width {str(width)[:20]} in the header but {found}")
        state = {name: tensors[f"{site}/{name}"] for name in STATE_FIELDS if f"{site}/{name}" in tensors}
        try:
            stats[site] = ChannelStats.from_state_dict(state, {**config, "width": width}, where=f"{path} site {site!r}")
        except (TypeError, ValueError, OverflowError) as e:
            raise ActlabError(f"{bad}: site {site!r} has a bad stats config ({type(e).__name__}: {str(e)[:100]})") from None
    return stats


def _check_stats_checksum(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> None:
    """The checksum sits inside the JSON header; it covers the tensors and the rest of the header as
    ``save`` serialised it. Files written before the checksum existed have none and pass."""
    if CHECKSUM_KEY not in header:
        return
    stored = header.pop(CHECKSUM_KEY)
    try:
        rest = json.dumps(header, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):  # a header save could never have written
        rest = ""
    check_checksum(path, tensors, {HEADER_KEY: rest, CHECKSUM_KEY: stored}, "stats", "; re-run the stats computation")

