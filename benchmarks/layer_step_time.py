"""One training step of the output-layer methods on the layer papers' tasks, beside Adam(unc) on the same task.

A step is what the runner does per iteration (``problems.runner``): draw the batch, build the closure (backbone,
layer, loss), ``optimizer.step`` (backward and Adam update). Every method starts from the same untrained
backbone (seed 0) and takes real training steps; methods are interleaved round by round in one process (one
warm-up round, then ``--steps`` timed rounds), each step timed by process CPU time and wall time, with the
minor page faults it took (``getrusage``: first touches of fresh memory, whose system time counts in the CPU
time; see the user guide's "Speed on the CPU"); the table reports medians and the ratio of CPU medians to
Adam(unc)'s. After the timed rounds each method's last batch is
projected again in evaluation mode to report the layer's iterations and largest violation there.

    python benchmarks/layer_step_time.py                                  # the default task/method pairs
    python benchmarks/layer_step_time.py --pairs mpc:hardnet-pp kkt_e1:kkt-hardnet --steps 5
    python benchmarks/layer_step_time.py --pairs "mpc:hardnet-pp:method=paper:gradient=unrolled"

A pair is ``problem:method`` or ``problem@size:method`` (default size ``small``; ``kkt_e1`` ``paper``), with
runner method options after further colons (``name:key=value:key=value`` as in ``python -m problems run``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import time

import torch

from problems import get_problem
from problems.methods import METHODS, parse_method

DEFAULT_PAIRS = [
    "mpc:hardnet-pp",
    "nonconvex_quadratic:enforce",
    "kkt_e1@paper:kkt-hardnet",
    "nonconvex_linear:kkt-hardnet",
    "enforce_fitting:kkt-hardnet",
]
DEFAULT_SIZES = {"kkt_e1": "paper", "kkt_e2": "paper", "kkt_e3": "paper", "pooling": "paper"}


def parse_pair(pair: str) -> tuple[str, str, str]:
    problem, _, spec = pair.partition(":")
    name, _, size = problem.partition("@")
    return name, size or DEFAULT_SIZES.get(name, "small"), spec


class Stepper:
    """One method on one problem, built as the runner builds it."""

    def __init__(self, problem, spec: str, batch_mode: str, seed: int = 0) -> None:
        name, options = parse_method(spec)
        method, lr = METHODS[name], problem.defaults.lrs[0]
        torch.manual_seed(seed)
        self.training = method.setup(problem, problem.make_model(seed), lr, method.parse_options(options, lr))
        self.model, self.problem = self.training.model, problem
        self.gen = torch.Generator().manual_seed(seed)
        self.batch_mode, self.batch = batch_mode, None

    def step(self) -> tuple[float, float, int]:
        """One training step: ``(CPU s, wall s, minor page faults)``."""
        self.batch = None if self.batch_mode == "full" else self.problem.sample_batch(self.gen)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0, w0 = time.process_time(), time.perf_counter()
        self.training.optimizer.step(self.training.closure(self.batch))
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        return cpu, wall, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    def layer_report(self) -> dict:
        layer = getattr(self.model, "layer", None)
        if layer is None:
            return {}
        x = self.problem.inputs(self.batch)
        was_training = layer.training
        layer.eval()
        with torch.no_grad():
            res = layer.project(x, self.model.backbone(x))
        layer.train(was_training)
        return {
            "iterations": res.iterations,
            "max_violation": float(res.residual.max()),
            "finite": bool(torch.isfinite(res.y).all()),
        }


def measure(pair: str, steps: int, batch_mode: str | None) -> list[dict]:
    name, size, spec = parse_pair(pair)
    problem = get_problem(name, size=size)
    mode = batch_mode or ("full" if name in ("kkt_e1", "kkt_e2", "kkt_e3", "enforce_fitting") else "mini")
    steppers = {"adam-unc": Stepper(problem, "adam-unc", mode), spec: Stepper(problem, spec, mode)}
    samples: dict[str, list[tuple[float, float, int]]] = {k: [] for k in steppers}
    for round_ in range(steps + 1):
        for key, stepper in steppers.items():
            t = stepper.step()
            if round_:  # round 0 warms up
                samples[key].append(t)
    base = statistics.median(c for c, _, _ in samples["adam-unc"])
    rows = []
    for key, stepper in steppers.items():
        cpu = statistics.median(c for c, _, _ in samples[key])
        rows.append(
            {
                "problem": name,
                "size": size,
                "batch": mode,
                "method": key,
                "cpu_s": cpu,
                "wall_s": statistics.median(w for _, w, _ in samples[key]),
                "cpu_max_s": max(c for c, _, _ in samples[key]),
                "page_faults": statistics.median(f for _, _, f in samples[key]),
                "ratio": cpu / base,
                **stepper.layer_report(),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", choices=["full", "mini"], help="override the per-problem batch mode")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--ieee-products",
        action="store_true",
        help="keep float32 products IEEE (torch.backends.mkldnn.matmul.fp32_precision = 'ieee'): the mixed-precision "
        "layers then do not use oneDNN's bfloat16 split products (sqpoptim.fast_float32_products)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ieee_products:
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    rows = []
    for pair in args.pairs:
        rows += measure(pair, args.steps, args.batch)
        for r in rows[-2:]:
            extra = f"  iters {r['iterations']}  max viol {r['max_violation']:.1e}" if "iterations" in r else ""
            print(
                f"{r['problem']}@{r['size']} {r['method']}: cpu {r['cpu_s']:.4f} s (max {r['cpu_max_s']:.4f}), "
                f"wall {r['wall_s']:.4f} s, {r['ratio']:.1f}x adam{extra}",
                flush=True,
            )
    products = "IEEE float32 products" if args.ieee_products else "default float32 products"
    print(
        f"\n{datetime.date.today()} · torch {torch.__version__} · {platform.machine()} · {args.threads} thread(s) · "
        f"{products}"
    )
    print(
        f"| task | method | CPU s / step (median of {args.steps}) | wall s | × Adam(unc) | page faults / step "
        "| layer iters | max viol |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        it = r.get("iterations", "")
        viol = f"{r['max_violation']:.1e}" if "max_violation" in r else ""
        print(
            f"| {r['problem']} ({r['size']}, {r['batch']}) | {r['method']} | {r['cpu_s']:.3f} | {r['wall_s']:.3f} | "
            f"{r['ratio']:.1f} | {r['page_faults']:,.0f} | {it} | {viol} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
