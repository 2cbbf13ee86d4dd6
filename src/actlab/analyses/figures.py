"""The few figure helpers every analysis plots with: Agg-bound figures (no pyplot state), layer axes, legends."""

from __future__ import annotations

from typing import Literal


def new_figure(width: float = 6.4, height: float = 3.6, layout: Literal["constrained", "tight"] = "constrained"):
    """A matplotlib Figure bound to an Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def new_axes(width: float = 6.4, height: float = 3.6, layout: Literal["constrained", "tight"] = "constrained"):
    """``(figure, axes)``: a ``new_figure`` holding one plot."""
    fig = new_figure(width, height, layout)
    return fig, fig.add_subplot()


def integer_xaxis(ax) -> None:
    """Whole-number ticks on the x axis (layers)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def layer_colors(n: int):
    """``i -> colour`` spreading ``n`` layers over the viridis colour map."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return lambda i: cmap(i / max(n - 1, 1))


def legend(ax, n: int) -> None:
    """A small legend, in two columns when it has many entries."""
    ax.legend(fontsize="small", ncol=1 if n <= 8 else 2)


def drawn(*makers) -> list:
    """The figures of ``makers`` (each a no-argument function), leaving out those that return None."""
    return [fig for fig in (make() for make in makers) if fig is not None]


def finite(values) -> list[float]:
    """The finite numbers among ``values`` (axis limits ignore NaN, inf and None)."""
    import math

    return [v for v in values if v is not None and math.isfinite(v)]


__all__ = ["drawn", "finite", "integer_xaxis", "layer_colors", "legend", "new_axes", "new_figure"]
