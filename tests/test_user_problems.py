"""A new user's first problems, trained with the projected optimizers' default settings (only the learning rate
and the number of steps chosen), checked against their exact solutions between the constraint points
(:mod:`tests.user_problems`), in float32 and float64."""

import math
import warnings

import pytest
import torch

import sqpoptim

from .user_problems import PROBLEMS, train

OPTIMIZERS = [sqpoptim.ProjectedAdamSQP, sqpoptim.ProjectedHeavyBallSQP]
SLOW = {  # runs of more than ~2.5 s CPU: 600-1,500 steps
    ("heat", "ProjectedHeavyBallSQP"),
    ("advection", "ProjectedHeavyBallSQP"),
    ("oscillator", "ProjectedHeavyBallSQP"),
    ("oscillator", "ProjectedAdamSQP"),
}
# heavy ball's other 300-step runs (~2 s CPU each): slow-marked; the default suite keeps heavy ball's defaults on
# poisson (the problem the damped default exists for) and Adam's on every problem
SECOND_OPINIONS = {("stiff", "ProjectedHeavyBallSQP"), ("mass_balance", "ProjectedHeavyBallSQP")}
C_TOLERANCE = 1e-3  # max |c| at the end, both dtypes (the residuals are of size 1-100)
# Runs whose single seed is a coin toss, judged over seeds instead. The float32 oscillator under Adam passes a
# stationary point of ‖c‖ with c ≠ 0 (‖c‖ ≈ 1.96) on its way, and how long it lingers there depends on float32
# rounding: at seed 0 the error after its 600 steps was 0.0008, 0.0012, 0.0112 and 0.059 for four variants of
# the Adam update's rounding (bias correction in float32 or float64, moments by addcmul or by products), all
# equally correct. Over seeds 0-9 it also falls into the feasible trap x ≡ 1 (error 2, see user_problems) six
# times in ten, in float64 one or two times in ten (measured 2026-12-02). Of seeds 0-4, seeds 2 and 3 reached
# the solution under every rounding variant measured (errors 4e-4 to 2.4e-3), seed 1 fell into the trap under
# every one, and seeds 0 and 4 went either way: two of the five must succeed.
BY_SEEDS = {("oscillator", "ProjectedAdamSQP", torch.float32): (range(5), 2)}  # seeds, how many must succeed


def _cases():
    for name in PROBLEMS:
        for opt in OPTIMIZERS:
            for dtype in (torch.float32, torch.float64):
                # float32 runs are slow-marked: the default suite keeps float64 for each problem and optimizer
                long_run = (name, opt.__name__) in SLOW | SECOND_OPINIONS or dtype == torch.float32
                marks = [pytest.mark.slow] if long_run else []
                yield pytest.param(name, opt, dtype, marks=marks, id=f"{name}-{opt.__name__}-{str(dtype)[6:]}")


@pytest.mark.parametrize(("name", "optimizer", "dtype"), list(_cases()))
def test_defaults_reach_the_exact_solution_between_the_constraint_points(name, optimizer, dtype):
    problem = PROBLEMS[name]
    seeds, needed = BY_SEEDS.get((name, optimizer.__name__, dtype), (range(1), 1))
    errors = []
    for seed in seeds:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", sqpoptim.InfeasibilityWarning)
            out = train(problem, optimizer, dtype, seed=seed)
        errors.append(out.error)
        assert out.c_inf < C_TOLERANCE, f"max |c| {out.c_inf:.3g} at the constraint points (seed {seed})"
        infeasible = [w for w in caught if issubclass(w.category, sqpoptim.InfeasibilityWarning)]
        if len(seeds) > 1:
            # a run may stall for 20 steps at the stationary point of ‖c‖ before it leaves it: the warning says so
            # (measured at seed 0: ‖c‖ = 1.96, ‖Jᵀc‖/(σ_max‖c‖) = 1e-3-4e-3), and says nothing else
            assert all("stationary point" in str(w.message) for w in infeasible) and len(infeasible) <= 1
        else:  # feasible problems: no warning (the damped step stalls only at a negligible ‖c‖)
            assert not infeasible
    reached = sum(error < problem.tolerance for error in errors)
    assert reached >= needed, f"max relative errors {[f'{e:.3g}' for e in errors]} between the constraint points"


def test_the_full_gauss_newton_step_fits_the_points_and_misses_the_solution():
    # the failure the defaults exist for: the paper's undamped normal step on the Poisson problem moves the
    # parameters by ~50 ‖θ‖ at the first step, and the run ends far from the exact solution between the points
    problem = PROBLEMS["poisson"]
    out = train(problem, sqpoptim.ProjectedAdamSQP, torch.float64, steps=100, normal_damping=None)
    assert out.first_step > 20 * out.theta
    assert not out.error < 1.0  # NaN (a refused step) also counts as missing
    default = train(problem, sqpoptim.ProjectedAdamSQP, torch.float64, steps=100)
    assert default.first_step < 20 * default.theta or default.rejected > 0
    assert default.error < 0.1 and math.isfinite(default.error)
