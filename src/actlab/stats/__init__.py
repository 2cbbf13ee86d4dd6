"""Streaming, mergeable per-site / per-channel activation statistics (see docs/stats.md)."""

from actlab.stats.binning import SymlogBinning, sparsity_edges
from actlab.stats.channel import DEFAULT_CONFIG, STATE_FIELDS, ChannelStats
from actlab.stats.sink import FORMAT, FORMAT_VERSION, StatsSink

__all__ = [
    "ChannelStats",
    "StatsSink",
    "SymlogBinning",
    "sparsity_edges",
    "DEFAULT_CONFIG",
    "STATE_FIELDS",
    "FORMAT",
    "FORMAT_VERSION",
]
