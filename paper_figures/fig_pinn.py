"""The SQP paper's figures for each PINN problem, from the committed exports ``pinn_<problem>``: objective curves
for both learning rates (full batch, and mean ± std of log10 over the mini-batch seeds), final test MSE and max |c|
per method, constraint violation over iterations, and prediction vs truth (best run of each method)."""

from __future__ import annotations

from pathlib import Path

from _data import problem_figures

PROBLEMS = ("spring", "chemistry", "burgers", "darcy")
KINDS = ("objective", "violation", "final_metrics", "prediction")


def main(out: Path) -> list[Path]:
    return problem_figures("fig_pinn.py", {p: f"pinn_{p}" for p in PROBLEMS}, KINDS, out)


if __name__ == "__main__":
    for p in main(Path(__file__).resolve().parent):
        print(p)
