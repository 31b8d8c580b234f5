"""Penalty vs Lagrangian vs SQP on the manifold toy (the article in papers/000): final violation, test error and
the largest gradient norm seen in training, as functions of the penalty weight ρ, with the primal-dual
(Lagrangian) and SQP methods as reference lines. From the committed export ``toy``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _data import load
from matplotlib.figure import Figure


def _rho(run: dict) -> float | None:
    return run["config"]["options"].get("rho") if run["config"]["method_name"] == "penalty" else None


def main(out: Path) -> list[Path]:
    problem, runs = load("toy")
    runs = [r for r in runs if r["status"] == "complete"]  # a diverged primal-dual setting has no final values
    penalty = sorted((r for r in runs if _rho(r) is not None), key=_rho)
    others = [r for r in runs if _rho(r) is None]
    rho = np.array([_rho(r) for r in penalty])
    fig = Figure(figsize=(13.0, 5.0))
    axes = fig.subplots(1, 3)
    panels = [
        (lambda r: r["final"]["max_abs_c"], "final max |‖y‖² − 1| at the constraint points"),
        (lambda r: r["final"]["test_mse"], "final test MSE"),
        (lambda r: r["grad_norm"]["max"], "largest gradient norm in training"),
    ]
    fixed = {"sqp-adam": "tab:green", "adam-unc": "tab:gray", "adam-con": "tab:blue"}
    lagrangian = iter(["tab:orange", "tab:brown", "tab:purple", "tab:olive", "tab:pink", "tab:cyan"])
    colors = {r["config"]["method"]: fixed.get(r["config"]["method_name"]) or next(lagrangian) for r in others}
    for ax, (value, title) in zip(axes, panels):
        ax.loglog(rho, [value(r) for r in penalty], "o-", color="tab:red", lw=2, label="penalty f + ρ/2 ‖c‖²")
        for r in others:
            opts = r["config"]["options"]
            details = f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else ""
            style = "--" if r["config"]["method_name"] == "primal-dual" else "-"
            ax.axhline(
                value(r),
                ls=style,
                color=colors[r["config"]["method"]],
                lw=1.4,
                label=r["config"]["method_label"] + details,
            )
        ax.set_xlabel("penalty weight ρ")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    lr = penalty[0]["config"]["lr"] if penalty else float("nan")
    fig.suptitle(
        f"{problem}: outputs on the unit circle, {penalty[0]['config']['iterations']} iterations, "
        f"lr {lr:g} (primal-dual with SGD: lr 0.05)"
    )
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    path = out / "toy_penalty_vs_lagrangian.png"
    fig.savefig(path, dpi=110)
    return [path]


if __name__ == "__main__":
    print(*main(Path(__file__).resolve().parent), sep="\n")
