"""The feature browser (issue #14): a static site of what makes units fire (``actlab browse``, ``actlab serve``).

``build_browser(model, out, "mlp.hidden.2", "0-63")`` streams a corpus once (collect.py: per unit, the
top-k contexts, interval samples, histogram, density, all bounded in memory), computes the direct
logit effects without a pass (logits.py), and writes pages + data files (site.py); serve.py serves a
built folder on localhost. See docs/browse.md.
"""

from actlab.browse.build import build_browser, collect_units, parse_units
from actlab.browse.collect import BrowseConfig, UnitCollector, UnitData
from actlab.browse.logits import logit_table, output_directions
from actlab.browse.serve import make_server, serve

__all__ = ["build_browser", "collect_units", "parse_units", "BrowseConfig", "UnitCollector", "UnitData",
           "logit_table", "output_directions", "make_server", "serve"]
