"""Print the finished runs of a results folder as Markdown tables (the tables of RESULTS.md).

    python benchmarks/results_table.py results/paper spring chemistry
    python benchmarks/results_table.py results/layers kkt_e1 --metrics test_mse,test_mean_violation

One row per run: method, learning rate, batch mode, seed, then the final metrics (default: objective, test MSE,
max |c| at the constraint inputs), the number of iterations, ms per iteration and the status (a diverged run
shows the iteration it diverged at). Rows are sorted by batch mode, learning rate and final objective.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from problems.runner import load_results


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def table(results_dir: str, problem: str, metrics: list[str]) -> str:
    runs = load_results(results_dir, problem)
    if not runs:
        return f"(no finished runs of {problem} under {results_dir})"

    def order(r):
        cfg, obj = r["config"], r["final"].get("objective", math.nan)
        return (cfg["batch"], -cfg["lr"], math.isnan(obj), obj)

    head = ["method", "lr", "batch", "seed", *metrics, "iterations", "ms/it", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(runs, key=order):
        cfg = r["config"]
        status = r["status"] if r["status"] != "diverged" else f"diverged at {r['diverged_at']}"
        cells = [
            f"`{cfg['method']}`",
            f"{cfg['lr']:g}",
            cfg["batch"],
            str(cfg["seed"]),
            *(_fmt(r["final"].get(m, math.nan)) for m in metrics),
            str(cfg["iterations"]),
            f"{r['timing']['ms_per_iteration']:.1f}",
            status,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    size = runs[0]["config"]["size"]
    return f"**{problem}** (size `{size}`, `{results_dir}`)\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("problems", nargs="+")
    ap.add_argument("--metrics", default="objective,test_mse,max_abs_c")
    args = ap.parse_args(argv)
    for p in args.problems:
        print(table(args.results, p, args.metrics.split(",")))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
