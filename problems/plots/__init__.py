"""Figures from saved results (never from training inline): the SQP paper's figure types.

* ``objective``, ``violation``: log10 of the full-batch objective / of max |c| at the constraint points vs
  iterations, one panel per learning rate (:mod:`problems.plots.curves`);
* ``final_metrics``: final test MSE and max |c| per method and setting;
* ``overview``: objective and violation side by side at the largest learning rate (a quick look);
* ``prediction``: prediction vs truth for each method's best run, drawn by the problem's declared
  ``prediction_kind`` (:mod:`problems.plots.predictions`).

A method has one colour and marker in every panel and figure (:mod:`problems.plots.style`). Each figure is
written as PNG and PDF under ``<results>/<problem>/figures/``. Figures are ``matplotlib.figure.Figure`` objects
saved directly: no pyplot, no global backend switch (importing this inside a notebook leaves inline display
alone).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .. import problem_class, problem_names
from ..core.problem import PREDICTION_KINDS
from ..methods import METHODS
from ..runner.results import load_results, read_prediction
from .curves import curve_figure, final_figure, overview_figure
from .predictions import PREDICTION_FIGURES
from .style import method_label, method_styles

__all__ = ["best_runs", "make_figures", "plot_problem", "prediction_kind"]


def best_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The run with the lowest final objective for each method spec (diverged runs only where nothing else)."""
    best: dict[str, tuple[tuple[bool, float], dict[str, Any]]] = {}
    for r in runs:
        obj = r["final"]["objective"]
        key = (math.isnan(obj), obj)
        m = r["config"]["method"]
        if m not in best or key < best[m][0]:
            best[m] = (key, r)
    return {m: r for m, (_, r) in best.items()}


def prediction_kind(problem: str, runs: list[dict[str, Any]]) -> str:
    """The problem's declared ``prediction_kind``: from its class where it is registered, else as recorded."""
    if problem in problem_names():
        return problem_class(problem).prediction_kind
    recorded = {r["config"].get("problem_settings", {}).get("prediction_kind") for r in runs}
    recorded.discard(None)
    if len(recorded) != 1 or not recorded <= set(PREDICTION_KINDS):
        raise ValueError(f"cannot tell how to draw the predictions of {problem!r}: not a registered problem")
    return recorded.pop()


def _prediction(run: dict[str, Any]) -> dict[str, np.ndarray]:
    if "prediction" in run:  # embedded (compact exports, see paper_figures/)
        return {k: np.asarray(v) for k, v in run["prediction"].items()}
    return read_prediction(run)


def _order(run: dict[str, Any]) -> tuple:
    cfg = run["config"]
    names = list(METHODS)
    base = cfg["method"].split(":")[0]
    rank = names.index(base) if base in names else len(names)
    return (rank, cfg["method"], -cfg["lr"], cfg["batch"], cfg.get("seed", 0))


def make_figures(runs: list[dict[str, Any]], problem: str) -> dict[str, Figure]:
    """Every figure type for a list of finished runs (as :func:`problems.runner.load_results` returns them, or
    compact exports with embedded predictions)."""
    runs = sorted(runs, key=_order)  # legends and bars in the registry's order of methods
    styles = method_styles(r["config"]["method"] for r in runs)
    best = best_runs(runs)
    preds = {m: _prediction(r) for m, r in best.items()}
    labels = {m: method_label(r) for m, r in best.items()}
    draw_prediction = PREDICTION_FIGURES[prediction_kind(problem, runs)]
    return {
        "overview": overview_figure(runs, styles, problem),
        "objective": curve_figure(runs, styles, "objective", "log10 objective (full batch)", f"{problem}: objective"),
        "violation": curve_figure(runs, styles, "max_abs_c", "log10 max |c|", f"{problem}: constraint violation"),
        "final_metrics": final_figure(runs, styles, problem),
        "prediction": draw_prediction(preds, labels, styles, problem),
    }


def plot_problem(
    results_dir: str | Path, problem: str, out_dir: str | Path | None = None, formats: Sequence[str] = ("png", "pdf")
) -> list[Path]:
    """Write every figure for ``problem`` from its saved results; returns the files written."""
    runs = load_results(results_dir, problem)
    if not runs:
        raise FileNotFoundError(f"no finished runs of {problem!r} under {results_dir}")
    out = Path(out_dir) if out_dir else Path(results_dir) / problem / "figures"
    out.mkdir(parents=True, exist_ok=True)
    figures = make_figures(runs, problem)
    written = []
    for name, fig in figures.items():
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            fig.savefig(path, dpi=130)
            written.append(path)
    return written
