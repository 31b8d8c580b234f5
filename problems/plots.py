"""Figures from saved results (never from training inline): the SQP paper's figure types.

* ``objective``: log10 of the full-batch objective vs iterations, one panel per learning rate; full-batch runs as
  lines, mini-batch runs as the mean ± std of log10 over their seeds.
* ``violation``: log10 max |c| at the constraint points vs iterations, same layout.
* ``final_metrics``: final test MSE and max |c| per method and learning rate (mean ± std over seeds for
  mini-batch runs).
* ``overview``: objective and violation side by side at the largest learning rate (a quick look).
* ``prediction``: prediction vs truth for each method (its best run): curves for the spring and the reaction
  network, fields for Burgers and Darcy, the manifold for the toy problem.

Each figure is written as PNG and PDF under ``<results>/<problem>/figures/``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .runner import load_results

__all__ = ["best_runs", "make_figures", "plot_problem"]

# Figures are built as matplotlib.figure.Figure objects and saved directly: no pyplot, no global backend switch
# (importing this module inside a notebook leaves inline display alone).
_COLORS = matplotlib.colormaps["tab10"].colors


def _label(run: dict[str, Any]) -> str:
    cfg = run["config"]
    opts = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cfg["options"].items())
    label = cfg["method_label"] + (f" ({opts})" if opts else "")
    return label + (f" [diverged at {run['diverged_at']}]" if run.get("status") == "diverged" else "")


def _groups(runs: list[dict[str, Any]]) -> dict[tuple[str, float, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        cfg = r["config"]
        groups[(cfg["method"], cfg["lr"], cfg["batch"])].append(r)
    return groups


def _log10(values: Sequence[float]) -> np.ndarray:
    a = np.abs(np.asarray(values, dtype=float))
    return np.log10(np.maximum(a, 1e-300))


def _padded(values: np.ndarray, length: int) -> np.ndarray:
    """A diverged run's curve stops early: pad with NaN (not drawn) to the group's length."""
    return np.concatenate([values, np.full(length - len(values), np.nan)])


def _curve_figure(runs, key: str, ylabel: str, title: str):
    groups = _groups(runs)
    lrs = sorted({lr for _, lr, _ in groups}, reverse=True)
    methods = list(dict.fromkeys(m for m, _, _ in groups))
    fig = Figure(figsize=(5.5 * len(lrs) + 3.0, 4.2))  # + the legend, outside the axes
    axes = fig.subplots(1, len(lrs), squeeze=False, sharey=True)
    for ax, lr in zip(axes[0], lrs):
        for i, method in enumerate(methods):
            color = _COLORS[i % len(_COLORS)]
            for batch, style in (("full", "-"), ("mini", "--")):
                group = groups.get((method, lr, batch))
                if not group:
                    continue
                it = np.asarray(max((r["curves"]["iteration"] for r in group), key=len))
                ys = np.stack([_padded(_log10(r["curves"][key]), len(it)) for r in group])
                label = f"{_label(group[0])}, {batch}" + (f" ({len(group)} seeds)" if len(group) > 1 else "")
                mean, std = np.nanmean(ys, 0), np.nanstd(ys, 0)
                ax.plot(it, mean, style, color=color, label=label, lw=1.6)
                if len(group) > 1:
                    ax.fill_between(it, mean - std, mean + std, color=color, alpha=0.2)
        ax.set_title(f"lr = {lr:g}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(ylabel)
    # one legend for all panels: a panel may lack some runs (e.g. mini-batch seeds at one learning rate only)
    entries: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    axes[0, -1].legend(
        list(entries.values()),
        list(entries),
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
    )
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _overview_figure(runs, problem: str):
    """Objective and violation side by side at the first learning rate: the figure for a quick look."""
    lr = max(r["config"]["lr"] for r in runs)
    runs = [r for r in runs if r["config"]["lr"] == lr]
    fig = Figure(figsize=(11.0, 4.2))
    axes = fig.subplots(1, 2)
    groups = _groups(runs)
    for i, method in enumerate(dict.fromkeys(m for m, _, _ in groups)):
        for batch, style in (("full", "-"), ("mini", "--")):
            group = groups.get((method, lr, batch))
            if not group:
                continue
            it = np.asarray(max((r["curves"]["iteration"] for r in group), key=len))
            for ax, key in zip(axes, ("objective", "max_abs_c")):
                ys = np.stack([_padded(_log10(r["curves"][key]), len(it)) for r in group])
                ax.plot(
                    it, np.nanmean(ys, 0), style, color=_COLORS[i % 10], lw=1.8, label=f"{_label(group[0])}, {batch}"
                )
    axes[0].set_ylabel("log10 objective (full batch)")
    axes[1].set_ylabel("log10 max |c| at the constraint points")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{problem}, lr = {lr:g}: objective and constraint violation")
    fig.tight_layout()
    return fig


def _final_figure(runs, problem: str):
    """Final test MSE and max |c| per method and setting (mean ± std over seeds for mini-batch runs)."""
    groups = _groups(runs)
    methods = list(dict.fromkeys(m for m, _, _ in groups))
    settings = sorted({(lr, b) for _, lr, b in groups}, key=lambda s: (-s[0], s[1]))
    fig = Figure(figsize=(max(9.0, 1.6 * len(methods) * max(1, len(settings)) / 2), 4.4))
    axes = fig.subplots(1, 2)
    width = 0.8 / max(len(settings), 1)
    labels = [_label(next(r for (m, _, _), g in groups.items() if m == method for r in g)) for method in methods]
    for ax, key, title in zip(axes, ("test_mse", "max_abs_c"), ("final test MSE", "final max |c|")):
        for j, (lr, batch) in enumerate(settings):
            means, errs = [], []
            for method in methods:
                vals = [r["final"][key] for r in groups.get((method, lr, batch), [])]
                means.append(np.mean(vals) if vals else np.nan)
                errs.append(np.std(vals) if len(vals) > 1 else 0.0)
            x = np.arange(len(methods)) + (j - (len(settings) - 1) / 2) * width
            ax.bar(x, means, width, yerr=errs, label=f"lr = {lr:g}, {batch}", capsize=3)
        ax.set_xticks(np.arange(len(methods)), labels, rotation=25, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{problem}: final metrics")
    fig.tight_layout()
    return fig


def best_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The run with the lowest final objective for each method spec (diverged runs only where nothing else)."""
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        obj = r["final"]["objective"]
        key = (math.isnan(obj), obj)
        m = r["config"]["method"]
        if m not in best or key < best[m][0]:
            best[m] = (key, r)
    return {m: r for m, (_, r) in best.items()}


def _prediction(run: dict[str, Any]) -> dict[str, np.ndarray]:
    if "prediction" in run:  # embedded (compact exports, see paper_figures/)
        return {k: np.asarray(v) for k, v in run["prediction"].items()}
    return dict(np.load(run["prediction_file"]))


def _prediction_figure(runs, problem: str):
    best = best_runs(runs)
    preds = {m: _prediction(r) for m, r in best.items()}
    labels = {m: _label(r) for m, r in best.items()}
    any_pred = next(iter(preds.values()))
    u_true = any_pred.get("u_true")
    if u_true is not None and u_true.ndim == 2 and ("nu" in any_pred or "x" in any_pred):
        return _field_figure(preds, labels, problem)
    if "y_true" in any_pred:
        return _manifold_figure(preds, labels, problem)
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    t = any_pred["t"]
    truth = np.atleast_2d(u_true.T).T if u_true.ndim == 1 else u_true
    for k in range(truth.shape[1]):
        ax.plot(t, truth[:, k], color="black", lw=2.5, alpha=0.6, label="truth" if k == 0 else None)
    # the axis follows the truth (a diverged run would otherwise flatten every other curve); runs that leave it
    # say so in the legend
    lo, hi = float(np.nanmin(truth)), float(np.nanmax(truth))
    pad = 0.3 * max(hi - lo, 1e-12)
    lo, hi = lo - pad, hi + pad
    for i, (m, p) in enumerate(preds.items()):
        up = p["u_pred"].reshape(len(t), -1)
        off = bool(np.any(~np.isfinite(up)) or np.nanmin(up) < lo or np.nanmax(up) > hi)
        label = labels[m] + (" (leaves the axis)" if off else "")
        for k in range(up.shape[1]):
            ax.plot(t, up[:, k], "--", color=_COLORS[i % 10], lw=1.4, label=label if k == 0 else None)
    ax.set_ylim(lo, hi)
    if "t_fit" in any_pred:
        fit = np.asarray(any_pred["u_fit"]).reshape(len(any_pred["t_fit"]), -1)
        for k in range(fit.shape[1]):
            ax.plot(any_pred["t_fit"], fit[:, k], "o", color="tab:red", ms=5, label="data" if k == 0 else None)
    if "t_constraint" in any_pred:
        for tc in any_pred["t_constraint"]:
            ax.axvline(tc, color="gray", ls=":", lw=1)
    ax.set_xlabel("t")
    ax.set_ylabel("u")
    ax.set_title(f"{problem}: prediction vs truth (best run of each method)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _field_figure(preds, labels, problem):
    any_pred = next(iter(preds.values()))
    truth = any_pred["u_true"]
    cols = 1 + len(preds)
    fig = Figure(figsize=(3.2 * cols, 6.0))
    axes = fig.subplots(2, cols, squeeze=False)
    vmin, vmax = truth.min(), truth.max()
    extent = None
    if "x" in any_pred and "t" in any_pred:
        extent = (any_pred["x"].min(), any_pred["x"].max(), any_pred["t"].min(), any_pred["t"].max())
    im = axes[0, 0].imshow(truth, origin="lower", vmin=vmin, vmax=vmax, extent=extent, aspect="auto", cmap="viridis")
    axes[0, 0].set_title("truth")
    fig.colorbar(im, ax=axes[0, 0], fraction=0.046)
    if "nu" in any_pred:
        im = axes[1, 0].imshow(any_pred["nu"], origin="lower", cmap="gray", aspect="auto")
        axes[1, 0].set_title("ν")
        fig.colorbar(im, ax=axes[1, 0], fraction=0.046)
    else:
        axes[1, 0].axis("off")
    err_max = max(np.abs(p["u_pred"].reshape(truth.shape) - truth).max() for p in preds.values())
    for j, (m, p) in enumerate(preds.items(), start=1):
        up = p["u_pred"].reshape(truth.shape)
        im = axes[0, j].imshow(up, origin="lower", vmin=vmin, vmax=vmax, extent=extent, aspect="auto", cmap="viridis")
        axes[0, j].set_title(labels[m], fontsize=8)
        im2 = axes[1, j].imshow(
            np.abs(up - truth), origin="lower", vmin=0, vmax=err_max, extent=extent, aspect="auto", cmap="magma"
        )
        axes[1, j].set_title("|error|", fontsize=8)
    fig.colorbar(im, ax=axes[0, -1], fraction=0.046)
    fig.colorbar(im2, ax=axes[1, -1], fraction=0.046)
    if extent is not None:
        for ax in axes[:, 0]:
            ax.set_xlabel("x")
            ax.set_ylabel("t")
    fig.suptitle(f"{problem}: prediction vs truth (best run of each method)")
    fig.tight_layout()
    return fig


def _manifold_figure(preds, labels, problem):
    any_pred = next(iter(preds.values()))
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.subplots()
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(theta), np.sin(theta), color="black", lw=1, alpha=0.5, label="‖y‖ = 1")
    ax.plot(any_pred["y_data"][:, 0], any_pred["y_data"][:, 1], ".", color="gray", ms=3, label="data")
    for i, (m, p) in enumerate(preds.items()):
        ax.plot(p["y_pred"][:, 0], p["y_pred"][:, 1], "-", color=_COLORS[i % 10], lw=1.5, label=labels[m])
    ax.set_aspect("equal")
    ax.set_title(f"{problem}: predictions on the test grid")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def make_figures(runs: list[dict[str, Any]], problem: str) -> dict[str, Figure]:
    """Every figure type for a list of finished runs (as :func:`problems.runner.load_results` returns them, or
    compact exports with embedded predictions)."""
    return {
        "overview": _overview_figure(runs, problem),
        "objective": _curve_figure(runs, "objective", "log10 objective (full batch)", f"{problem}: objective"),
        "violation": _curve_figure(runs, "max_abs_c", "log10 max |c|", f"{problem}: constraint violation"),
        "final_metrics": _final_figure(runs, problem),
        "prediction": _prediction_figure(runs, problem),
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
