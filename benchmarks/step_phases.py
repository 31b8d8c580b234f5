"""Where a constrained step's time goes: process CPU time and tensor operations per phase of the optimizer's step.

The runner's iteration of one method on one problem (``problem_step_time.py``'s), run ``--steps`` times after a
warm-up, with each phase of ``ConstrainedOptimizer.step`` timed by ``time.process_time_ns`` (the wrappers' own
cost, about a microsecond a phase, included) and, over ``--count`` further steps, its tensor operations counted
by a ``TorchDispatchMode`` (the count is exact; the mode's overhead is why the two are separate runs). The
closure's forward is timed apart from the rest of reading it where the method's closure is the problem's
``objective_and_constraints`` (the constrained methods); otherwise it stays in ``_parse``. What no phase
covers (the ``torch.optim`` step wrapper, the update, freeing the step's graph, the runner's iteration) is the
remainder of the iteration. Unlike ``scale_breakdown.py``, which re-runs the library's functions one by one on
the scaling benchmark's model, this wraps the optimizer's own phases, so the damping's judgement, the checks and
the record are in it.

    python benchmarks/step_phases.py                                  # spring, sqp-adam, full batch
    python benchmarks/step_phases.py --problem burgers --method sqp-adam --batch mini
"""

from __future__ import annotations

import argparse
import collections
import datetime
import time
from collections.abc import Callable
from typing import Any

import torch
from problem_step_time import iteration_timer  # (run as a script: benchmarks/ is on the path)
from torch.utils._python_dispatch import TorchDispatchMode

import sqpoptim
from problems import get_problem

PHASES = ("_parse", "_judge", "_form", "_check", "_direction", "_admit", "_record")
CLOSURE = "closure (forward)"
OUTSIDE = "(outside the phases)"


class _Counter(TorchDispatchMode):
    """Counts every tensor operation under the phase running at the time."""

    def __init__(self, current: list[str], counts: dict[str, collections.Counter]) -> None:
        super().__init__()
        self.current, self.counts = current, counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.current[0]][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def instrument(cls: type, problem: Any, spent: dict[str, int], current: list[str]) -> None:
    """Wrap the step's phases of ``cls`` and the problem's closure: time into ``spent``, the running phase in
    ``current``."""

    def wrap(name: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            outer, current[0] = current[0], name
            t0 = time.process_time_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.process_time_ns() - t0
                current[0] = outer

        return wrapper

    for name in PHASES:
        setattr(cls, name, wrap(name, getattr(cls, name)))
    problem.objective_and_constraints = wrap(CLOSURE, problem.objective_and_constraints)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="spring")
    parser.add_argument("--method", default="sqp-adam")
    parser.add_argument("--batch", choices=["full", "mini"], default="full")
    parser.add_argument("--size", default="paper")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = get_problem(args.problem, size=args.size, device="cpu", dtype=torch.float32)
    iteration = iteration_timer(problem, args.method, problem.defaults.lrs[0], args.batch)
    optimizer_class = type(iteration.training.optimizer)
    if not issubclass(optimizer_class, sqpoptim.ConstrainedOptimizer):
        raise SystemExit(f"{args.method!r} does not step a sqpoptim.ConstrainedOptimizer")
    spent: dict[str, int] = collections.defaultdict(int)
    current = [OUTSIDE]
    instrument(optimizer_class, problem, spent, current)
    for _ in range(max(args.steps // 10, 50)):  # warm-up
        iteration()
    spent.clear()
    t0 = time.process_time_ns()
    for _ in range(args.steps):
        iteration()
    total = time.process_time_ns() - t0
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with _Counter(current, counts):
        for _ in range(args.count):
            iteration()
    print(
        f"{datetime.date.today()} · torch {torch.__version__} · {args.threads} thread(s) · {args.problem} "
        f"({args.size}, {args.batch} batch) · {args.method} · {args.steps} steps"
    )
    print("| phase | µs / step | tensor ops / step | most frequent |")
    print("|---|---:|---:|---|")
    covered = 0
    for name in (CLOSURE, *PHASES):
        us = spent[name] / args.steps / 1e3
        if name == "_parse":  # the closure runs inside this phase: report the rest of it
            us -= spent[CLOSURE] / args.steps / 1e3
        covered += spent[name] if name != CLOSURE else 0
        ops = sum(counts[name].values()) / args.count
        top = ", ".join(f"{k} {v / args.count:g}" for k, v in counts[name].most_common(4))
        print(f"| {name} | {us:.1f} | {ops:g} | {top} |")
    rest = (total - covered) / args.steps / 1e3
    ops = sum(counts[OUTSIDE].values()) / args.count
    print(f"| the rest of the iteration | {rest:.1f} | {ops:g} | |")
    print(f"| **the iteration** | **{total / args.steps / 1e3:.1f}** | | |")


if __name__ == "__main__":
    main()
