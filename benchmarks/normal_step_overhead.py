"""Per-step cost of the default (globalised) normal step against the paper's undamped one, as ratios to
``torch.optim.Adam`` on the same model and batch: process CPU time and wall time, methods interleaved in one
process, one intra-op thread, median over rounds.

Two models: the user-style Poisson PINN of ``tests/user_problems.py`` (1-20-20-1 tanh, m = 20 ODE residuals
through second input derivatives; Adam minimises the soft-constrained loss, objective + mean c²) and a 64x2 tanh
MLP on a batch of 1024 with m = 10 output constraints (the setting of ``benchmarks/step_time.py``).

    PYTHONPATH=. python benchmarks/normal_step_overhead.py --rounds 7 --iterations 100

(``PYTHONPATH=.``: this checkout's ``sqpoptim`` and ``tests``, not an installed copy.)
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
import warnings

import torch
from torch import nn

import sqpoptim
from tests.user_problems import PROBLEMS

VARIANTS = {
    "sqp-adam (default)": lambda p: sqpoptim.ProjectedAdamSQP(p, lr=1e-3),
    "sqp-adam undamped": lambda p: sqpoptim.ProjectedAdamSQP(p, lr=1e-3, normal_damping=None),
    "sqp-hb (default)": lambda p: sqpoptim.ProjectedHeavyBallSQP(p, lr=1e-3),
    "sqp-hb undamped": lambda p: sqpoptim.ProjectedHeavyBallSQP(p, lr=1e-3, normal_damping=None),
}


def poisson_case():
    """(make_model, closure_for(model)) of the user-style Poisson PINN."""
    problem = PROBLEMS["poisson"]

    def make():
        setup = problem.build(torch.float32, 0)
        return setup.model, setup.closure

    return make


def mlp_case():
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.rand(1024, 8, generator=gen), torch.rand(1024, 1, generator=gen)
    Xc, Yc = torch.rand(10, 8, generator=gen), torch.rand(10, generator=gen)

    def make():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        return model, lambda: (((model(X) - Y) ** 2).mean(), model(Xc).squeeze(1) - Yc)

    return make


def measure(make, rounds: int, iterations: int) -> dict[str, tuple[float, float, int]]:
    """Median (CPU ms, wall ms) per iteration of Adam and of each variant over the first ``iterations`` steps from
    the same initialisation, rebuilt every round (so every round times the same trajectory, rejected steps
    included), methods interleaved round by round; with the number of rejected steps of one trajectory."""

    def adam_run():
        model, closure = make()
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)

        def iteration():
            adam.zero_grad(set_to_none=True)
            loss, c = closure()
            (loss + c.square().mean()).backward()
            adam.step()

        return iteration, lambda: 0

    def variant_run(build):
        model, closure = make()
        opt = build(model.parameters())
        rejected = lambda: int(opt.diagnostics().get("rejected_steps", 0))  # noqa: E731
        return (lambda: opt.step(closure)), rejected

    runs = {"torch.optim.Adam": adam_run, **{k: (lambda b=b: variant_run(b)) for k, b in VARIANTS.items()}}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    rejected: dict[str, int] = {}
    for _ in range(rounds):
        for name, start in runs.items():
            step, count = start()
            step()  # first call: layout and state allocation, not a steady-state step
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(iterations):
                step()
            cpu[name].append(1e3 * (time.process_time() - c0) / iterations)
            wall[name].append(1e3 * (time.perf_counter() - w0) / iterations)
            rejected[name] = count()
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k]), rejected[k]) for k in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # rank-deficiency warnings of the Poisson Jacobian are expected
    print(f"{datetime.date.today()} · torch {torch.__version__} · 1 thread · float32 · median of {args.rounds} rounds")
    print("| model | method | CPU ms/it | ratio to Adam (CPU) | wall ms/it | ratio to Adam (wall) | rejected steps |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, make in (("Poisson PINN, m = 20", poisson_case()), ("MLP 64x2, batch 1024, m = 10", mlp_case())):
        res = measure(make, args.rounds, args.iterations)
        adam_cpu, adam_wall, _ = res["torch.optim.Adam"]
        for name, (c, w, r) in res.items():
            print(f"| {label} | {name} | {c:.2f} | {c / adam_cpu:.2f}× | {w:.2f} | {w / adam_wall:.2f}× | {r} |")


if __name__ == "__main__":
    main()
