"""Step time of the equality path before and after a change, in one process: is the equality path slower?

Loads a second copy of the package (``--before``: a directory holding an older ``sqpoptim/``, e.g. exported with
``git archive main sqpoptim | tar -x -C /tmp/before``) beside the working tree's, and times, interleaved in
rounds, ``torch.optim.Adam``, the old and the new optimizer on the same tanh MLP, batch and m equality
constraints (the model's output at m fixed points minus a target; the closure returns ``(loss, c)``). Each
round runs every method for ``--steps`` steps and records process CPU time and wall time per step; the report
is the median over rounds of each method's time divided by Adam's in the same round, and new/old; the order of
the methods is shuffled in every round.

    git archive main sqpoptim | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    PYTHONPATH=. python benchmarks/equality_path_overhead.py --before /tmp/before
    PYTHONPATH=. python benchmarks/equality_path_overhead.py --before /tmp/before --inequalities 10

(``PYTHONPATH=.``: the working tree's package, not an installed one; the report names the files it timed.)

With ``--inequalities K`` the new optimizers' closure also returns K inequalities (u(q_j) <= 10 at K more
points; inactive: the step QP's working set is the equalities) through ``sqpoptim.Constraints``, the old ones
the equalities alone: new/before is then the cost of the inequality path (its dual solves) over the equality
path.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import random
import statistics
import sys
import time

import torch
from torch import nn

import sqpoptim


def load_before(path: str):
    spec = importlib.util.spec_from_file_location(
        "sqpoptim_before", f"{path}/sqpoptim/__init__.py", submodule_search_locations=[f"{path}/sqpoptim"]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["sqpoptim_before"] = module
    spec.loader.exec_module(module)
    return module


def factories(pkg):
    return {
        "sqp-adam": lambda p: pkg.ProjectedAdamSQP(p, lr=1e-4),
        "sqp-hb": lambda p: pkg.ProjectedHeavyBallSQP(p, lr=1e-4),
        "sqp": lambda p: pkg.StochasticSQP(p, lr=1e-4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--constraints", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inequalities", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    before = load_before(args.before)
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(args.batch, 2, generator=gen)
    Y = torch.sin(3 * X[:, :1])
    P = torch.rand(args.constraints, 2, generator=gen)
    T = torch.cos(2 * P[:, :1]).squeeze(1)
    Q = torch.rand(args.inequalities, 2, generator=gen)

    def model():
        torch.manual_seed(1)
        layers, d = [], 2
        for _ in range(args.depth):
            layers += [nn.Linear(d, args.width), nn.Tanh()]
            d = args.width
        return nn.Sequential(*layers, nn.Linear(d, 1))

    def run(name: str, make) -> tuple[float, float]:
        net = model()
        opt = make(net.parameters())
        with_ineq = args.inequalities > 0 and name != "adam" and "(before)" not in name

        def closure():
            loss, c = ((net(X) - Y) ** 2).mean(), net(P).squeeze(1) - T
            if with_ineq:
                return loss, sqpoptim.Constraints(eq=c, ineq=net(Q).squeeze(1) - 10.0)
            return loss, c

        def adam_step():
            opt.zero_grad()
            ((net(X) - Y) ** 2).mean().backward()
            opt.step()

        step = adam_step if name == "adam" else (lambda: opt.step(closure))
        step()  # warm-up: lazy state
        t_cpu, t_wall = time.process_time(), time.perf_counter()
        for _ in range(args.steps):
            step()
        return (time.process_time() - t_cpu) / args.steps, (time.perf_counter() - t_wall) / args.steps

    methods = {"adam": lambda p: torch.optim.Adam(p, lr=1e-4)}
    new, old = factories(sqpoptim), factories(before)
    for name in new:
        methods[f"{name} (before)"] = old[name]
        methods[name] = new[name]
    ratios: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    order = list(methods)
    shuffle = random.Random(0).shuffle
    for _ in range(args.rounds):
        shuffle(order)  # no method always runs right after another
        times = {name: run(name, methods[name]) for name in order}
        for name in methods:
            ratios[name].append((times[name][0] / times["adam"][0], times[name][1] / times["adam"][1]))
    n = sum(p.numel() for p in model().parameters())
    print(f"new: {sqpoptim.__file__}, before: {before.__file__}")
    print(
        f"{datetime.date.today()}, {platform.machine()} {torch.__version__}, 1 thread, n = {n}, "
        f"m = {args.constraints}, inequalities (new only) {args.inequalities}, batch {args.batch}, "
        f"{args.rounds} rounds x {args.steps} steps\n"
    )
    print("| optimizer | CPU time / Adam | wall time / Adam | new / before (CPU) | new / before (wall) |")
    print("|---|---|---|---|---|")
    for name in new:
        cpu_new = statistics.median(r[0] for r in ratios[name])
        wall_new = statistics.median(r[1] for r in ratios[name])
        cpu_old = statistics.median(r[0] for r in ratios[f"{name} (before)"])
        wall_old = statistics.median(r[1] for r in ratios[f"{name} (before)"])
        paired = statistics.median(a[0] / b[0] for a, b in zip(ratios[name], ratios[f"{name} (before)"]))
        paired_wall = statistics.median(a[1] / b[1] for a, b in zip(ratios[name], ratios[f"{name} (before)"]))
        print(
            f"| {name} | {cpu_new:.3f} (before {cpu_old:.3f}) | {wall_new:.3f} (before {wall_old:.3f}) | "
            f"{paired:.3f} | {paired_wall:.3f} |"
        )


if __name__ == "__main__":
    main()
