"""Prediction-vs-truth figures, one per declared ``prediction_kind`` (:mod:`problems.core.problem`).

* ``series``: the truth as wide grey lines, each method's best run dashed in its colour; the axis follows the
  truth (a diverged run would otherwise flatten every other curve) and a run that leaves it says so in the
  legend; data points as markers and constraint points as dotted vertical lines where the problem gives them.
* ``field``: the truth, each method's prediction (same colour scale) and its absolute error (one scale for all);
  the input field ``nu`` beside the truth where the problem gives one.
* ``manifold``: the unit circle, the data, and each method's outputs on the test inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .style import Style

__all__ = ["PREDICTION_FIGURES", "field_figure", "manifold_figure", "series_figure"]

Preds = dict[str, dict[str, np.ndarray]]


def series_figure(preds: Preds, labels: dict[str, str], styles: dict[str, Style], problem: str) -> Figure:
    any_pred = next(iter(preds.values()))
    fig = Figure(figsize=(9.5, 4.2))
    ax = fig.subplots()
    t = any_pred["t"]
    u_true = any_pred["u_true"]
    truth = np.atleast_2d(u_true.T).T if u_true.ndim == 1 else u_true.reshape(len(t), -1)
    for k in range(truth.shape[1]):
        ax.plot(t, truth[:, k], color="black", lw=2.5, alpha=0.45, label="truth" if k == 0 else None, zorder=1)
    lo, hi = float(np.nanmin(truth)), float(np.nanmax(truth))
    pad = 0.3 * max(hi - lo, 1e-12)
    lo, hi = lo - pad, hi + pad
    for m, p in preds.items():
        up = p["u_pred"].reshape(len(t), -1)
        off = bool(np.any(~np.isfinite(up)) or np.nanmin(up) < lo or np.nanmax(up) > hi)
        label = labels[m] + (" (leaves the axis)" if off else "")
        for k in range(up.shape[1]):
            ax.plot(t, up[:, k], "--", lw=1.4, label=label if k == 0 else None, **styles[m].line(len(t)))
    ax.set_ylim(lo, hi)
    if "t_fit" in any_pred:
        fit = np.asarray(any_pred["u_fit"]).reshape(len(any_pred["t_fit"]), -1)
        for k in range(fit.shape[1]):
            ax.plot(any_pred["t_fit"], fit[:, k], "o", mfc="none", mec="black", ms=6, label="data" if k == 0 else None)
    if "t_constraint" in any_pred:
        for i, tc in enumerate(np.atleast_1d(any_pred["t_constraint"])):
            ax.axvline(tc, color="gray", ls=":", lw=1, label="constraint points" if i == 0 else None)
    ax.set_xlabel("t")
    ax.set_ylabel("u")
    ax.set_title(f"{problem}: prediction vs truth (best run of each method)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def field_figure(preds: Preds, labels: dict[str, str], styles: dict[str, Style], problem: str) -> Figure:
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
    err_max = max(np.nanmax(np.abs(p["u_pred"].reshape(truth.shape) - truth)) for p in preds.values())
    for j, (m, p) in enumerate(preds.items(), start=1):
        up = p["u_pred"].reshape(truth.shape)
        im = axes[0, j].imshow(up, origin="lower", vmin=vmin, vmax=vmax, extent=extent, aspect="auto", cmap="viridis")
        axes[0, j].set_title(labels[m], fontsize=8, color=styles[m].color)
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


def manifold_figure(preds: Preds, labels: dict[str, str], styles: dict[str, Style], problem: str) -> Figure:
    any_pred = next(iter(preds.values()))
    fig = Figure(figsize=(8.0, 5.5))
    ax = fig.subplots()
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(theta), np.sin(theta), color="black", lw=1, alpha=0.5, label="‖y‖ = 1")
    ax.plot(any_pred["y_data"][:, 0], any_pred["y_data"][:, 1], ".", color="gray", ms=3, label="data")
    for m, p in preds.items():
        y = p["y_pred"]
        ax.plot(y[:, 0], y[:, 1], "-", lw=1.5, label=labels[m], **styles[m].line(len(y)))
    ax.set_aspect("equal")
    ax.set_title(f"{problem}: predictions on the test grid")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


PREDICTION_FIGURES: dict[str, Any] = {"series": series_figure, "field": field_figure, "manifold": manifold_figure}
