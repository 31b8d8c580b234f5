"""Training steps under ENFORCE's activation rule, split by whether the rule activated AdaNP.

ENFORCE's Alg. 2 (Lastrucci & Schweidtmann, arXiv:2502.06774, App. D.2) takes one NP step per batch and keeps the
projection only if it does not worsen the task-loss measure; a batch where it does runs AdaNP on, a batch where it
does not trains the raw output. From an untrained backbone the first steps are of the second kind, later ones of
the first, and the two cost very different amounts, so a median over a handful of steps says little. This script
trains one runner method (``enforce:activation=true`` and its options) for ``--steps`` steps from seed 0 and
reports the process CPU time of the steps of each kind, beside the same number of steps of the plain layer
(``--plain``, the method without ``activation=true``) interleaved step by step in the same process.

    PYTHONPATH=. python benchmarks/layer_activation_steps.py --steps 60
    PYTHONPATH=. python benchmarks/layer_activation_steps.py --method "enforce:activation=true" --steps 60

The rule's decision is read by wrapping :func:`sqpoptim.layers.adanp_activation` (what the runner's closure
calls); nothing else is changed.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import problems.methods.layers as layer_methods
from problems import get_problem
from problems.methods import METHODS, parse_method


class _Recorder:
    """Wraps the activation rule the runner's closure calls, keeping its decisions."""

    def __init__(self) -> None:
        self.decisions: list[bool] = []
        self._rule = layer_methods.layers.adanp_activation

    def __call__(self, *args, **kwargs):
        y, active = self._rule(*args, **kwargs)
        self.decisions.append(active)
        return y, active


def _training(problem, spec: str, seed: int):
    name, options = parse_method(spec)
    method, lr = METHODS[name], problem.defaults.lrs[0]
    torch.manual_seed(seed)
    return method.setup(problem, problem.make_model(seed), lr, method.parse_options(options, lr))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", default="nonconvex_quadratic")
    ap.add_argument("--size", default="small")
    ap.add_argument("--method", default="enforce:mixed_precision=true:activation=true")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if "activation=true" not in args.method:
        ap.error("--method must switch the activation rule on (activation=true)")
    recorder = _Recorder()
    layer_methods.layers.adanp_activation = recorder
    problem = get_problem(args.problem, size=args.size)
    runs = {"rule": _training(problem, args.method, 0)}
    if args.plain:
        runs["plain"] = _training(problem, args.method.replace(":activation=true", ""), 0)
    gens = {k: torch.Generator().manual_seed(0) for k in runs}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for step in range(args.steps):
        for key, training in runs.items():
            batch = problem.sample_batch(gens[key])
            t0 = time.process_time()
            training.optimizer.step(training.closure(batch))
            times[key].append(time.process_time() - t0)
        if step % 10 == 9 or step == args.steps - 1:
            active = sum(recorder.decisions)
            print(f"step {step + 1}: AdaNP activated on {active} of {len(recorder.decisions)} batches", flush=True)
    decisions = recorder.decisions
    rows = {
        "rule, AdaNP activated": [t for t, a in zip(times["rule"][1:], decisions[1:], strict=True) if a],
        "rule, projection discarded": [t for t, a in zip(times["rule"][1:], decisions[1:], strict=True) if not a],
        "rule, every step": times["rule"][1:],
    }
    if args.plain:
        rows["plain layer, every step"] = times["plain"][1:]
    print(f"\n{datetime.date.today()} · torch {torch.__version__} · {platform.machine()} · {args.threads} thread(s)")
    print(f"{args.problem} ({args.size}) · {args.method} · {args.steps} steps from seed 0 (the first one not timed)")
    print("| steps | count | CPU s median | min | max | mean |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, ts in rows.items():
        if ts:
            print(
                f"| {label} | {len(ts)} | {statistics.median(ts):.3f} | {min(ts):.3f} | {max(ts):.3f} "
                f"| {statistics.mean(ts):.3f} |"
            )


if __name__ == "__main__":
    main()
