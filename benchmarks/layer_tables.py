"""The layer papers' tables from ``benchmarks/layer_tables.sh``'s runs: mean ± std over the seeds, one row per method.

* ``mpc``: HardNet++ Table I (test suboptimality, dynamics / box / quadratic violation, mean and max).
* ``nonconvex_quadratic``: ENFORCE Table 3 (test objective, optimality gap, max and mean |h|, inference time
  of the whole test batch).
* ``pooling``: KKT-Hardnet Table 6 (MSE and the mean violation |h| + |g| per row, Eq. 27, training and
  validation).
* ``enforce_fitting``: KKT-Hardnet on ENFORCE's C1 (runs finished / diverged, R², max violation).

    python benchmarks/layer_tables.py results/layer_tables mpc nonconvex_quadratic pooling enforce_fitting
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from problems.runner import load_results

COLUMNS = {
    "mpc": [
        ("subopt. mean", "test_subopt_mean"),
        ("subopt. max", "test_subopt_max"),
        ("dyn. mean", "test_dyn_viol_mean"),
        ("dyn. max", "test_dyn_viol_max"),
        ("box mean", "test_box_viol_mean"),
        ("box max", "test_box_viol_max"),
        ("quad. mean", "test_quad_viol_mean"),
        ("quad. max", "test_quad_viol_max"),
    ],
    "nonconvex_quadratic": [
        ("obj. value", "objective"),
        ("optimum", "reference_objective"),
        ("gap", "optimality_gap"),
        ("max eq.", "test_max_violation"),
        ("mean eq.", "test_mean_violation"),
        ("inf. ms (test batch)", "time_per_batch_ms"),
    ],
    "pooling": [
        ("train MSE", "train_mse"),
        ("train |h|+|g|", "train_violation"),
        ("val MSE", "val_mse"),
        ("val |h|+|g|", "val_violation"),
        ("val max viol.", "test_max_violation"),
    ],
    "enforce_fitting": [("R²", "r2"), ("MAPE %", "mape"), ("max viol. %", "max_violation_pct")],
}


def _stat(values: list[float]) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "nan"
    mean = statistics.fmean(finite)
    if len(finite) == 1:
        return f"{mean:.3g}"
    return f"{mean:.3g} ± {statistics.stdev(finite):.2g}"


def table(results_dir: str, problem: str) -> str:
    runs = load_results(results_dir, problem)
    if not runs:
        return f"(no finished runs of {problem} under {results_dir})"
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["config"]["method"], []).append(r)
    cols = COLUMNS[problem]
    head = ["method", "seeds", "iterations", *[c for c, _ in cols], "ms/it"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method, rs in sorted(by_method.items()):
        ok = [r for r in rs if r["status"] == "complete"]
        seeds = f"{len(ok)}" + (f" (+{len(rs) - len(ok)} diverged)" if len(ok) < len(rs) else "")
        iters = sorted({r["config"]["iterations"] for r in rs})
        cells = [_stat([r["final"].get(key, math.nan) for r in ok]) for _, key in cols]
        ms = _stat([r["timing"]["ms_per_iteration"] for r in rs])
        lines.append(f"| `{method}` | {seeds} | {', '.join(map(str, iters))} | " + " | ".join(cells) + f" | {ms} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results")
    parser.add_argument("problems", nargs="+", choices=sorted(COLUMNS))
    args = parser.parse_args()
    for problem in args.problems:
        print(f"\n### {problem}\n\n{table(args.results, problem)}")


if __name__ == "__main__":
    main()
