"""Training steps of output-layer methods with oneDNN's fast float32 products and with IEEE ones, interleaved.

The mixed-precision ENFORCE layer runs its float32 products on oneDNN's bfloat16 split where that keeps float32's
accuracy (``sqpoptim.fast_float32_products``). This script takes the runner's training steps (as
``layer_step_time.py``: the untrained backbone of seed 0, real steps) of each method twice over, once with the
default setting and once with ``torch.backends.mkldnn.matmul.fp32_precision = "ieee"`` (set before each of that
copy's steps and reset after), beside Adam(unc), round by round in one process: one warm-up round, then
``--steps`` timed ones. It reports the median CPU time per step with its range, and the median minor page faults.

    PYTHONPATH=. python benchmarks/layer_fast_products.py
    PYTHONPATH=. python benchmarks/layer_fast_products.py --methods enforce:mixed_precision=true --steps 12
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics

import torch
from layer_step_time import Stepper

from problems import get_problem
from sqpoptim._fast_float32 import float32_products_verified


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="nonconvex_quadratic")
    parser.add_argument("--size", default="small")
    parser.add_argument(
        "--methods", nargs="+", default=["enforce:mixed_precision=true", "enforce:mixed_precision=bfloat16"]
    )
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = get_problem(args.problem, size=args.size)
    runs = {"adam-unc": ("adam-unc", "none")}
    for method in args.methods:
        runs[method] = (method, "none")
        runs[f"{method} (IEEE products)"] = (method, "ieee")
    steppers = {key: Stepper(problem, spec, "mini") for key, (spec, _) in runs.items()}
    samples: dict[str, list[tuple[float, int]]] = {key: [] for key in runs}
    for round_ in range(args.steps + 1):
        for key, (_, setting) in runs.items():
            torch.backends.mkldnn.matmul.fp32_precision = setting
            try:
                cpu, _, faults = steppers[key].step()
            finally:
                torch.backends.mkldnn.matmul.fp32_precision = "none"
            if round_:
                samples[key].append((cpu, faults))
    print(
        f"{datetime.date.today()} · torch {torch.__version__} · {platform.machine()} · 1 thread · "
        f"fast float32 products verified: {float32_products_verified()}"
    )
    print(f"| {args.problem} ({args.size}, mini) | CPU s / step (median of {args.steps}) | range | faults / step |")
    print("|---|---:|---:|---:|")
    for key, vals in samples.items():
        cpu = sorted(c for c, _ in vals)
        faults = statistics.median(f for _, f in vals)
        print(f"| {key} | {statistics.median(cpu):.3f} | {cpu[0]:.3f}–{cpu[-1]:.3f} | {faults:,.0f} |")


if __name__ == "__main__":
    main()
