"""The layer papers' tasks, from the committed exports ``layers_<problem>``: final test error and constraint
violation per method (output layers, the soft penalty, the plain network and training-time SQP side by side),
objective curves and predictions (best run of each method). ``enforce_fitting`` (ENFORCE C1) is the figure that
compares training-time constraints with the output layers on a task where both apply."""

from __future__ import annotations

from pathlib import Path

from _data import problem_figures

PROBLEMS = (
    "enforce_fitting",
    "kkt_e1",
    "kkt_e2",
    "kkt_e3",
    "pooling",
    "mpc",
    "nonconvex_linear",
    "nonconvex_quadratic",
)
KINDS = ("objective", "final_metrics", "prediction")


def main(out: Path) -> list[Path]:
    return problem_figures("fig_layers.py", {p: f"layers_{p}" for p in PROBLEMS}, KINDS, out, prefix="layers_")


if __name__ == "__main__":
    for p in main(Path(__file__).resolve().parent):
        print(p)
