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
# runs that stall at a local minimum of the violation on their way (the oscillator's energy constraint)
PASSES_A_STATIONARY_POINT = {("oscillator", "ProjectedAdamSQP", torch.float32)}
C_TOLERANCE = 1e-3  # max |c| at the end, both dtypes (the residuals are of size 1-100)


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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", sqpoptim.InfeasibilityWarning)
        out = train(problem, optimizer, dtype)
    assert out.error < problem.tolerance, f"max relative error {out.error:.3g} between the constraint points"
    assert out.c_inf < C_TOLERANCE, f"max |c| {out.c_inf:.3g} at the constraint points"
    infeasible = [w for w in caught if issubclass(w.category, sqpoptim.InfeasibilityWarning)]
    if (name, optimizer.__name__, dtype) in PASSES_A_STATIONARY_POINT:
        # the run stalls for 20 steps at a local minimum of ‖c‖ with c ≠ 0 before it leaves it: the warning says
        # so (measured: ‖c‖ = 1.96, ‖Jᵀc‖/(σ_max‖c‖) = 3.7e-3) and the run still ends at the solution
        assert len(infeasible) == 1 and "stationary point" in str(infeasible[0].message)
    else:  # feasible problems: no warning (the damped step stalls only at a negligible ‖c‖)
        assert not infeasible


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
