"""sqpoptim's projected SQP against cooper-optim's Lagrangian methods, on problems with inequality constraints.

Two sets of problems, the same budgets for every method:

* Hock–Schittkowski problems with inequalities (``tests/hs_inequality.py``, full batch, from the book's start):
  the number of steps to |f - f*| <= 1e-4 max(1, |f*|) with violation <= 1e-8 (the test suite's criterion) and
  to a looser 1e-3 / 1e-4, the final relative gap and largest violation after ``--steps`` steps, and the process
  CPU time per step.
* A small network with pointwise bounds: a 2-32-32-1 tanh MLP fitted to sin(3 x_1) on 256 points, its output
  held below 0.3 at 40 fixed points (c_i = u(q_i) - 0.3 <= 0; the unconstrained fit reaches 1 there).

Methods. sqpoptim: ``StochasticSQP`` (fixed step) and ``ProjectedAdamSQP``, at the learning rates the test suite
measured per problem (``tests/test_hs_inequality.py``), or 0.01 for the network. cooper (version printed):
``Lagrangian`` gradient descent-ascent (``SimultaneousOptimizer``; primal ``torch.optim.Adam``, dual SGD on
the multipliers, projected to >= 0) and the ``AugmentedLagrangian`` (``AlternatingPrimalDualOptimizer``:
a primal Adam step on the augmented Lagrangian, then the multipliers updated at the new point by SGD with step
= the penalty coefficient c, the method of multipliers with one inner step). cooper's rates are the
best of a grid per problem (GDA: primal 0.1, 0.01, 0.001 x dual 1, 0.1, 0.01; ALM: primal 0.1, 0.01, 0.001 x
c 1, 10), chosen by the fewest steps to the strict criterion, then to the loose one, then by the smallest final
gap + violation; the rates are printed.

    pip install cooper-optim     # the benchmark extra: pip install -e .[bench]
    PYTHONPATH=. python benchmarks/cooper_comparison.py --steps 2000

(``PYTHONPATH=.``: the working tree's package and its test problems.)
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import cooper
import torch
from torch import nn

import sqpoptim
from tests.hs_inequality import PROBLEMS, HSProblem
from tests.test_hs_inequality import SETTINGS

f64 = torch.float64
DEFAULT_PROBLEMS = ("hs010", "hs011", "hs012", "hs021", "hs035", "hs043", "hs065", "hs071", "hs076", "hs100")
GDA_GRID = [(p, d) for p in (0.1, 0.01, 0.001) for d in (1.0, 0.1, 0.01)]
ALM_GRID = [(p, c) for p in (0.1, 0.01, 0.001) for c in (1.0, 10.0)]


@dataclass
class Run:
    strict: int | None  # steps to the strict criterion (None: not within the budget)
    loose: int | None
    gap: float  # final |f - f*| / max(1, |f*|) (network: the final loss)
    violation: float  # final largest violation
    cpu_ms: float  # process CPU time per step
    setting: str


class _CMP(cooper.ConstrainedMinimizationProblem):
    """A problem ``f, c_E, c_I`` as cooper's constrained minimisation problem (one dense multiplier per part)."""

    def __init__(self, f, eq, ineq, m_eq: int, m_in: int, formulation, penalty: float | None, dtype) -> None:
        super().__init__()
        self.f, self.eq, self.ineq = f, eq, ineq
        self.parts = []
        for kind, m, fn in ((cooper.ConstraintType.EQUALITY, m_eq, eq), (cooper.ConstraintType.INEQUALITY, m_in, ineq)):
            if not m:
                continue
            extra = {}
            if penalty is not None:
                extra["penalty_coefficient"] = cooper.penalty_coefficients.DensePenaltyCoefficient(
                    torch.full((m,), penalty, dtype=dtype)
                )
            constraint = cooper.Constraint(
                kind,
                formulation_type=formulation,
                multiplier=cooper.multipliers.DenseMultiplier(num_constraints=m, dtype=dtype),
                **extra,
            )
            setattr(self, "equalities" if kind == cooper.ConstraintType.EQUALITY else "inequalities", constraint)
            self.parts.append((constraint, fn))

    def compute_cmp_state(self) -> cooper.CMPState:
        observed = {c: cooper.ConstraintState(violation=fn()) for c, fn in self.parts}
        return cooper.CMPState(loss=self.f(), observed_constraints=observed)


def _run_cooper(
    params: list[torch.Tensor], f, eq, ineq, m_eq, m_in, method: str, rates, steps: int, judge
) -> tuple[int | None, int | None, float, float, float]:
    lr, dual = rates
    if method == "gda":
        cmp = _CMP(f, eq, ineq, m_eq, m_in, cooper.formulations.Lagrangian, None, params[0].dtype)
        opt_cls = cooper.optim.SimultaneousOptimizer
    else:
        cmp = _CMP(f, eq, ineq, m_eq, m_in, cooper.formulations.AugmentedLagrangian, dual, params[0].dtype)
        opt_cls = cooper.optim.AlternatingPrimalDualOptimizer
    primal = torch.optim.Adam(params, lr=lr)
    dual_opt = torch.optim.SGD(cmp.dual_parameters(), lr=dual, maximize=True)
    opt = opt_cls(cmp=cmp, primal_optimizers=primal, dual_optimizers=dual_opt)
    return _loop(lambda: opt.roll(), steps, judge)


def _run_sqp(params, f, eq, ineq, make, steps, judge):
    opt = make(params)

    def closure():
        return f(), sqpoptim.Constraints(eq=eq(), ineq=ineq())

    return _loop(lambda: opt.step(closure), steps, judge)


def _loop(step: Callable[[], object], steps: int, judge) -> tuple[int | None, int | None, float, float, float]:
    strict = loose = None
    cpu = 0.0
    gap = viol = math.nan
    for k in range(steps):
        t0 = time.process_time()
        step()
        cpu += time.process_time() - t0
        gap, viol, ok_strict, ok_loose = judge()
        if not math.isfinite(gap):
            break
        strict = k + 1 if strict is None and ok_strict else strict
        loose = k + 1 if loose is None and ok_loose else loose
    return strict, loose, gap, viol, 1e3 * cpu / max(k + 1, 1)


def hs_runs(problem: HSProblem, steps: int) -> dict[str, Run]:
    scale = max(1.0, abs(problem.f_star))
    out: dict[str, Run] = {}

    def setup():
        x = torch.tensor(problem.x0, dtype=f64, requires_grad=True)

        def judge():
            with torch.no_grad():
                gap = abs(problem.f(x).item() - problem.f_star) / scale
                viol = problem.violation(x)
            return gap, viol, gap <= 1e-4 and viol <= 1e-8, gap <= 1e-3 and viol <= 1e-4

        return x, judge

    m_eq = problem.eq(torch.tensor(problem.x0, dtype=f64)).numel()
    m_in = problem.ineq(torch.tensor(problem.x0, dtype=f64)).numel()
    for name, cls in (("sqp", sqpoptim.StochasticSQP), ("sqp-adam", sqpoptim.ProjectedAdamSQP)):
        lr, _ = SETTINGS[name].get(problem.name, (0.1, 0))
        x, judge = setup()
        res = _run_sqp(
            [x],
            lambda x=x: problem.f(x),
            lambda x=x: problem.eq(x),
            lambda x=x: problem.ineq(x),
            lambda p, cls=cls, lr=lr: cls(p, lr=lr),
            steps,
            judge,
        )
        out[name] = Run(*res, setting=f"lr {lr:g}")
    for method, grid in (("cooper-gda", GDA_GRID), ("cooper-alm", ALM_GRID)):
        best = None
        for rates in grid:
            x, judge = setup()
            res = _run_cooper(
                [x],
                lambda x=x: problem.f(x),
                lambda x=x: problem.eq(x),
                lambda x=x: problem.ineq(x),
                m_eq,
                m_in,
                method.split("-")[1],
                rates,
                steps,
                judge,
            )
            label = f"lr {rates[0]:g}, " + ("dual lr" if method == "cooper-gda" else "c") + f" {rates[1]:g}"
            run = Run(*res, setting=label)
            if best is None or _key(run, steps) < _key(best, steps):
                best = run
        out[method] = best
    return out


def _key(run: Run, steps: int) -> tuple:
    bad = steps + 1
    size = run.gap + run.violation if math.isfinite(run.gap + run.violation) else math.inf
    return (run.strict or bad, run.loose or bad, size)


def network_runs(steps: int) -> dict[str, Run]:
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(256, 2, generator=gen)
    Y = torch.sin(3 * X[:, :1])
    Q = torch.rand(40, 2, generator=gen)
    out: dict[str, Run] = {}

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))

    def setup():
        model = net()
        f = lambda: ((model(X) - Y) ** 2).mean()  # noqa: E731
        ineq = lambda: model(Q).squeeze(1) - 0.3  # noqa: E731

        def judge():
            with torch.no_grad():
                loss, viol = f().item(), ineq().clamp_min(0).max().item()
            return loss, viol, False, False

        return model, f, ineq, judge

    empty = lambda: torch.zeros(0)  # noqa: E731
    for name, cls in (("sqp", sqpoptim.StochasticSQP), ("sqp-adam", sqpoptim.ProjectedAdamSQP)):
        model, f, ineq, judge = setup()
        lr = 0.01
        res = _run_sqp(list(model.parameters()), f, empty, ineq, lambda p, cls=cls, lr=lr: cls(p, lr=lr), steps, judge)
        out[name] = Run(*res, setting=f"lr {lr:g}")
    for method, grid in (("cooper-gda", [(0.01, 1.0), (0.01, 0.1)]), ("cooper-alm", [(0.01, 1.0), (0.01, 10.0)])):
        for rates in grid:
            model, f, ineq, judge = setup()
            res = _run_cooper(
                list(model.parameters()), f, empty, ineq, 0, 40, method.split("-")[1], rates, steps, judge
            )
            label = f"lr {rates[0]:g}, " + ("dual lr" if method == "cooper-gda" else "c") + f" {rates[1]:g}"
            out[f"{method} ({label})"] = Run(*res, setting=label)
    model, f, _, judge = setup()  # the unconstrained fit, for scale
    adam = torch.optim.Adam(model.parameters(), lr=0.01)

    def adam_step():
        adam.zero_grad()
        f().backward()
        adam.step()

    out["adam (unconstrained)"] = Run(*_loop(adam_step, steps, judge), setting="lr 0.01")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--network-steps", type=int, default=1000)
    ap.add_argument("--problems", nargs="*", default=list(DEFAULT_PROBLEMS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"{datetime.date.today()}, {platform.machine()}, torch {torch.__version__}, cooper {cooper.__version__}, "
        f"1 thread; Hock-Schittkowski: {args.steps} steps each, network: {args.network_steps} steps\n"
    )
    by_name = {p.name: p for p in PROBLEMS}
    print(
        "| problem | method | steps to 1e-4 / viol 1e-8 | steps to 1e-3 / viol 1e-4 | final gap | final viol "
        "| CPU ms/step | setting |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.problems:
        for method, run in hs_runs(by_name[name], args.steps).items():
            print(
                f"| {name} | {method} | {run.strict or '-'} | {run.loose or '-'} | {run.gap:.1e} | {run.violation:.1e} "
                f"| {run.cpu_ms:.2f} | {run.setting} |",
                flush=True,
            )
    print("\n| network method | final loss | largest violation max(0, u(q) - 0.3) | CPU ms/step |")
    print("|---|---|---|---|")
    for method, run in network_runs(args.network_steps).items():
        print(f"| {method} | {run.gap:.4g} | {run.violation:.1e} | {run.cpu_ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
