"""Convergence figures: objective and violation against iterations, and the final metrics per method.

* :func:`curve_figure`: log10 of a curve vs iterations, one panel per learning rate; full-batch runs as solid
  lines, mini-batch runs as the mean of log10 over their seeds (dashed) with a band of ± one standard deviation
  (only where there are several seeds);
* :func:`overview_figure`: objective and violation side by side at the largest learning rate;
* :func:`final_figure`: final test MSE and max |c| per method (bars in the method's colour) for each setting
  (learning rate, batch mode); error bars (± one standard deviation over seeds) only where there are seeds.

Every figure has one legend, outside the axes, naming each method once.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .style import BATCH_LINESTYLE, Style, method_label

__all__ = ["curve_figure", "final_figure", "groups", "overview_figure"]

Group = dict[tuple[str, float, str], list[dict[str, Any]]]


def groups(runs: list[dict[str, Any]]) -> Group:
    """Runs by (method spec, learning rate, batch mode): the seeds of one setting."""
    out: Group = defaultdict(list)
    for r in runs:
        cfg = r["config"]
        out[(cfg["method"], cfg["lr"], cfg["batch"])].append(r)
    return out


def _log10(values: Sequence[float]) -> np.ndarray:
    a = np.abs(np.asarray(values, dtype=float))
    return np.log10(np.maximum(a, 1e-300))


def _padded(values: np.ndarray, length: int) -> np.ndarray:
    """A diverged run's curve stops early: pad with NaN (not drawn) to the group's length."""
    return np.concatenate([values, np.full(length - len(values), np.nan)])


def _stack(group: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    it = np.asarray(max((r["curves"]["iteration"] for r in group), key=len))
    ys = np.stack([_padded(_log10(r["curves"][key]), len(it)) for r in group])
    return it, ys


def _legend(fig: Figure, ax, runs: list[dict[str, Any]], styles: dict[str, Style], batches: set[str]) -> None:
    """One legend entry per method (colour and marker), then one per batch mode (line style)."""
    labels = {}
    for r in runs:
        labels.setdefault(r["config"]["method"], method_label(r))
    handles = [
        Line2D([], [], color=styles[m].color, marker=styles[m].marker, markersize=5, lw=1.6, label=label)
        for m, label in labels.items()
    ]
    if len(batches) > 1 or "mini" in batches:
        for batch in ("full", "mini"):
            if batch in batches:
                text = "full batch" if batch == "full" else "mini-batch (mean over seeds)"
                handles.append(Line2D([], [], color="black", ls=BATCH_LINESTYLE[batch], lw=1.4, label=text))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _draw(ax, group: list[dict[str, Any]], key: str, style: Style, batch: str, band: bool) -> None:
    it, ys = _stack(group, key)
    with np.errstate(all="ignore"), _quiet():
        mean, std = np.nanmean(ys, 0), np.nanstd(ys, 0)
    ax.plot(it, mean, BATCH_LINESTYLE[batch], lw=1.6, **style.line(len(it)))
    if band and len(group) > 1:
        ax.fill_between(it, mean - std, mean + std, color=style.color, alpha=0.15, lw=0, zorder=style.zorder - 1)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns after a divergence
        yield


def curve_figure(runs, styles: dict[str, Style], key: str, ylabel: str, title: str) -> Figure:
    grouped = groups(runs)
    lrs = sorted({lr for _, lr, _ in grouped}, reverse=True)
    fig = Figure(figsize=(5.5 * len(lrs) + 3.2, 4.2))  # + the legend, outside the axes
    axes = fig.subplots(1, len(lrs), squeeze=False, sharey=True)
    for ax, lr in zip(axes[0], lrs):
        for (method, lr_, batch), group in grouped.items():
            if lr_ == lr:
                _draw(ax, group, key, styles[method], batch, band=True)
        ax.set_title(f"lr = {lr:g}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(ylabel)
    _legend(fig, axes[0, -1], runs, styles, {b for _, _, b in grouped})
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def overview_figure(runs, styles: dict[str, Style], problem: str) -> Figure:
    """Objective and violation side by side at the largest learning rate: the figure for a quick look."""
    lr = max(r["config"]["lr"] for r in runs)
    runs = [r for r in runs if r["config"]["lr"] == lr]
    fig = Figure(figsize=(12.5, 4.2))
    axes = fig.subplots(1, 2)
    grouped = groups(runs)
    for (method, _, batch), group in grouped.items():
        for ax, key in zip(axes, ("objective", "max_abs_c")):
            _draw(ax, group, key, styles[method], batch, band=False)
    axes[0].set_ylabel("log10 objective (full batch)")
    axes[1].set_ylabel("log10 max |c| at the constraint points")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    _legend(fig, axes[1], runs, styles, {b for _, _, b in grouped})
    fig.suptitle(f"{problem}, lr = {lr:g}: objective and constraint violation")
    fig.tight_layout()
    return fig


def final_figure(runs, styles: dict[str, Style], problem: str) -> Figure:
    """Final test MSE and max |c|: one group of bars per setting, one bar per method in its colour."""
    grouped = groups(runs)
    methods = list(dict.fromkeys(m for m, _, _ in grouped))
    settings = sorted({(lr, b) for _, lr, b in grouped}, key=lambda s: (-s[0], s[1]))
    fig = Figure(figsize=(min(18.0, max(9.0, 0.55 * len(methods) * len(settings))) + 3.2, 4.4))
    axes = fig.subplots(1, 2)
    width = 0.8 / max(len(methods), 1)
    for ax, key, title in zip(axes, ("test_mse", "max_abs_c"), ("final test MSE", "final max |c|")):
        for i, method in enumerate(methods):
            x = np.arange(len(settings)) + (i - (len(methods) - 1) / 2) * width
            vals = [[r["final"][key] for r in grouped.get((method, lr, b), [])] for lr, b in settings]
            with np.errstate(all="ignore"), _quiet():
                means = np.array([np.nanmean(v) if v else np.nan for v in vals])
            style = styles[method]
            ax.bar(x, means, width, color=style.color, zorder=style.zorder, edgecolor="black", lw=0.4)
            seeded = [j for j, v in enumerate(vals) if len(v) > 1]
            if seeded:  # a spread only where there are several seeds
                errs = [np.nanstd(vals[j]) for j in seeded]
                ax.errorbar(x[seeded], means[seeded], yerr=errs, fmt="none", ecolor="black", capsize=3, lw=1)
        ax.set_xticks(np.arange(len(settings)), [f"lr = {lr:g}\n{b} batch" for lr, b in settings], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    _legend(fig, axes[1], runs, styles, {"full"})
    seeds = max(len(g) for g in grouped.values())
    note = f" (mini-batch: mean ± std over {seeds} seeds)" if seeds > 1 else ""
    fig.suptitle(f"{problem}: final metrics{note}")
    fig.tight_layout()
    return fig
