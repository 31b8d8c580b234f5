"""The layer papers' headline tables with the fast layers (``benchmarks/layer_tables.sh``), from the committed
exports ``layer_tables_<problem>``: final metrics per method over the seeds, objective curves and predictions
(best run of each method). HardNet++'s learned MPC (Table I), ENFORCE's C3 (Table 3), KKT-Hardnet on ENFORCE's
C1 and KKT-Hardnet's pooling (Table 6, at the paper's budget of mini-batches)."""

from __future__ import annotations

from pathlib import Path

from _data import problem_figures

PROBLEMS = ("mpc", "nonconvex_quadratic", "enforce_fitting", "pooling")
KINDS = ("objective", "final_metrics", "prediction")


def main(out: Path) -> list[Path]:
    exports = {p: f"layer_tables_{p}" for p in PROBLEMS}
    return problem_figures("fig_layer_tables.py", exports, KINDS, out, prefix="layer_tables_")


if __name__ == "__main__":
    for p in main(Path(__file__).resolve().parent):
        print(p)
