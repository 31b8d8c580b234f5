"""How a method looks in every figure: one colour and one marker per method spec, fixed for a set of runs.

Colours follow the registry (:data:`problems.methods.METHODS`): a method keeps its colour in every panel and
every figure (``adam-con`` is red wherever it appears). A spec with options (``penalty:rho=1e4``) takes its
method's colour when it is the only spec of that method among the runs, else the next free colour. Each spec
also has its own marker, drawn at staggered points, and a z-order that puts constrained methods above
unconstrained ones, so curves that coincide (Adam(con) and Adam(unc) before the constraints bite) stay visible.
Line style is the batch mode: solid for full batch, dashed for mini-batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import matplotlib

__all__ = ["BATCH_LINESTYLE", "Style", "method_label", "method_styles"]

_TAB10 = matplotlib.colormaps["tab10"].colors
_BASE_COLORS = {  # one colour per registered method, none of them the grey of the truth in prediction figures
    "sqp-adam": _TAB10[0],  # blue
    "sqp-hb": _TAB10[2],  # green
    "adam-unc": _TAB10[1],  # orange
    "adam-con": _TAB10[3],  # red
    "penalty": _TAB10[4],  # purple
    "primal-dual": _TAB10[5],  # brown
    "sqp": _TAB10[6],  # pink
    "sqp-adaptive": _TAB10[8],  # olive
    "sqp-adam-scaled": _TAB10[9],  # cyan
    "sqp-adam-standard": "#1f3a93",  # navy
    "sqp-adam-scaled-standard": "#7fb3d5",  # light blue
    "soft": "#a6761d",  # tan
    "hardnet": "#1b9e77",  # teal
    "enforce": "black",
    "hardnet-pp": "#e7298a",  # magenta
    "kkt-hardnet": "#7570b3",  # slate blue
}
_SPARE = ["#999900", "#00bfff", "#ff1493", "#8b0000", "#006400", "#4b0082", "#ff8c00", "#2f4f4f", "#bc8f8f"]
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
_UNCONSTRAINED = ("adam-unc", "penalty", "soft")

BATCH_LINESTYLE = {"full": "-", "mini": "--"}


@dataclass(frozen=True)
class Style:
    color: Any
    marker: str
    zorder: float
    offset: int
    """Index of the spec: markers are drawn at points staggered by it, so they never sit on one another."""

    def line(self, n_points: int) -> dict[str, Any]:
        """Keyword arguments for ``Axes.plot`` of a curve with ``n_points`` points."""
        every = max(1, n_points // 8)
        return {
            "color": self.color,
            "marker": self.marker,
            "markevery": (min(self.offset * max(1, every // 6), max(n_points - 1, 0)), every),
            "markersize": 4.5,
            "zorder": self.zorder,
        }


def method_styles(specs: Iterable[str]) -> dict[str, Style]:
    """One :class:`Style` per method spec, in the order given (see the module docstring)."""
    specs = list(dict.fromkeys(specs))
    base = [s.split(":")[0] for s in specs]
    spare = iter(_SPARE * (1 + len(specs) // len(_SPARE)))
    used: set[str] = set()
    styles = {}
    for i, (spec, name) in enumerate(zip(specs, base)):
        alone = base.count(name) == 1
        color = _BASE_COLORS.get(name) if (alone or spec == name) and name not in used else None
        if color is None:
            color = next(spare)
        else:
            used.add(name)
        zorder = 2.0 if name in _UNCONSTRAINED else 3.0 + 0.01 * i
        styles[spec] = Style(color, _MARKERS[i % len(_MARKERS)], zorder, i)
    return styles


def method_label(run: dict[str, Any]) -> str:
    """The paper label of a run's method with its options, and its divergence if it diverged."""
    cfg = run["config"]
    opts = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cfg["options"].items())
    label = cfg["method_label"] + (f" ({opts})" if opts else "")
    return label + (f" [diverged at {run['diverged_at']}]" if run.get("status") == "diverged" else "")
