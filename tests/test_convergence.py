"""Full-batch convergence to known solutions: random linearly constrained convex QPs (closed-form KKT point)
and a catalogue of nonlinear equality-constrained problems cross-checked with scipy's SLSQP (float64)."""

import numpy as np
import pytest
import scipy.optimize
import torch

import sqpoptim

from .catalogue import CASES

f64 = torch.float64

SQP_METHODS = {
    "sqp-fixed": lambda p, **kw: sqpoptim.StochasticSQP(p, lr=0.5, normal_lr=1.0, **kw),
    "sqp-adaptive": lambda p, **kw: sqpoptim.StochasticSQP(p, lr=1.0, step_rule="adaptive", **kw),
    "sqp-hb": lambda p, **kw: sqpoptim.ProjectedHeavyBallSQP(p, lr=0.5, momentum=0.5, normal_lr=1.0, **kw),
    "sqp-adam": lambda p, **kw: sqpoptim.ProjectedAdamSQP(p, lr=1e-2, normal_lr=1.0, **kw),
    "sqp-adam-scaled": lambda p, **kw: sqpoptim.ProjectedAdamSQP(p, lr=1e-2, normal_lr=1.0, projection="scaled", **kw),
    "sqp-adam-standard": lambda p, **kw: sqpoptim.ProjectedAdamSQP(
        p, lr=1e-2, normal_lr=1.0, bias_correction="standard", **kw
    ),
    "adam-con": lambda p, **kw: sqpoptim.ConstrainedAdam(p, lr=1e-2, normal_lr=1.0, **kw),
}


def random_qp(seed, n=50, m=5):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=gen, dtype=f64)
    Q = A @ A.T / n + 0.5 * torch.eye(n, dtype=f64)
    b = torch.randn(n, generator=gen, dtype=f64)
    C = torch.randn(m, n, generator=gen, dtype=f64)
    d = torch.randn(m, generator=gen, dtype=f64)
    K = torch.cat([torch.cat([Q, C.T], 1), torch.cat([C, torch.zeros(m, m, dtype=f64)], 1)])
    x_star = torch.linalg.solve(K, torch.cat([-b, d]))[:n]
    return Q, b, C, d, x_star


# Adam(con) and the Adam options take 1,000-2,000 steps to 1e-7 here (5-10 s of CPU each): marked slow
_SLOW_QP = {"sqp-adam-scaled", "sqp-adam-standard", "adam-con"}


@pytest.mark.parametrize("damped", [False, True], ids=["undamped", "default"])
@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=[pytest.mark.slow] if m in _SLOW_QP else []) for m in SQP_METHODS]
)
def test_linear_equality_constrained_qp_converges_to_kkt_point(method, damped):
    Q, b, C, d, x_star = random_qp(seed=sorted(SQP_METHODS).index(method))
    x = torch.zeros(50, dtype=f64, requires_grad=True)
    # undamped: the papers' normal step (the adaptive rule's is undamped in both cases)
    opt = SQP_METHODS[method]([x], **({} if damped else {"normal_damping": None}))

    def closure():
        return 0.5 * x @ Q @ x + b @ x, C @ x - d

    opt.step(closure)
    first_violation = (C @ x.detach() - d).abs().max().item()
    initial = (C @ torch.zeros(50, dtype=f64) - d).abs().max().item()
    if method != "sqp-adaptive" and not damped:  # the adaptive rule scales the whole step by its α_k < 1
        assert first_violation < 1e-12  # a full normal step solves linear constraints at once
    elif method != "sqp-adaptive":
        # the damped step removes all but ~ν0 of the violation; the linear model is exact, so ρ = 1 and ν falls
        # by 3 per step (Nielsen's rule) to its floor: feasibility to rounding within a few steps
        assert first_violation < 1e-2 * initial
        for _ in range(10):
            opt.step(closure)
        assert (C @ x.detach() - d).abs().max().item() < 1e-12
    else:
        assert first_violation < initial
        for _ in range(100):
            opt.step(closure)
        assert (C @ x.detach() - d).abs().max().item() < 1e-12
    worst = 0.0
    for k in range(4000):  # measured: 60 (heavy ball) to 2130 (Adam(con)) iterations reach 1e-7
        opt.step(closure)
        worst = max(worst, (C @ x.detach() - d).abs().max().item())
        if k % 10 == 0 and (x.detach() - x_star).norm().item() <= 1e-7:
            break
    assert worst < 1e-12  # ... and the tangential steps stay in the null space
    assert (x.detach() - x_star).norm().item() <= 1e-6


def test_primal_dual_converges_on_the_qp():
    Q, b, C, d, x_star = random_qp(seed=11)
    x = torch.zeros(50, dtype=f64, requires_grad=True)
    opt = sqpoptim.PrimalDual([x], lr=0.2, dual_lr=0.2, inner=torch.optim.SGD)
    for k in range(3000):  # measured: 170 iterations to 1e-7
        opt.step(lambda: (0.5 * x @ Q @ x + b @ x, C @ x - d))
        if k % 10 == 0 and (x.detach() - x_star).norm().item() <= 1e-7:
            break
    assert (x.detach() - x_star).norm().item() <= 1e-6
    # the multipliers converge to the KKT multipliers: Q x* + b + C' λ* = 0
    lam_star = torch.linalg.lstsq(C.T, -(Q @ x_star + b).unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(opt.multipliers, lam_star, rtol=1e-5, atol=1e-6)


def _scipy_solution(case):
    def fun(z):
        return case.f(torch.tensor(z, dtype=f64)).item()

    def jac(z):
        zt = torch.tensor(z, dtype=f64, requires_grad=True)
        return torch.autograd.grad(case.f(zt), zt)[0].numpy()

    def cons(z):
        return case.c(torch.tensor(z, dtype=f64)).numpy()

    def cons_jac(z):
        return torch.autograd.functional.jacobian(case.c, torch.tensor(z, dtype=f64)).numpy()

    res = scipy.optimize.minimize(
        fun,
        np.array(case.x0),
        jac=jac,
        method="SLSQP",
        constraints=[{"type": "eq", "fun": cons, "jac": cons_jac}],
        options={"ftol": 1e-12, "maxiter": 500},
    )
    # SLSQP's own success flag is not required (it can stall at its tolerance on hs007 while at x*); its point
    # must be feasible and agree with the catalogue's solution.
    assert np.abs(cons(res.x)).max() < 1e-8, res
    return res.x


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_catalogue_solution_agrees_with_scipy(case):
    assert case.error(torch.tensor(_scipy_solution(case), dtype=f64)) < 1e-6


# Iterations measured to reach the tolerance on every case (slowest case: hs027, a Rosenbrock valley): fixed
# SQP 880, heavy ball 870, Adam 960. The budgets leave a margin; runs stop once converged.
CATALOGUE_METHODS = {
    "sqp-fixed": (lambda p: sqpoptim.StochasticSQP(p, lr=0.2, normal_lr=1.0), 2000),
    "sqp-hb": (lambda p: sqpoptim.ProjectedHeavyBallSQP(p, lr=0.2, momentum=0.5, normal_lr=1.0), 2000),
    "sqp-adam": (lambda p: sqpoptim.ProjectedAdamSQP(p, lr=3e-2, normal_lr=1.0), 2500),
}


def _solve(case, factory, iters):
    x = torch.tensor(case.x0, dtype=f64, requires_grad=True)
    opt = factory([x])
    for k in range(iters):
        opt.step(lambda: (case.f(x), case.c(x)))
        if k % 10 == 0 and case.error(x.detach()) < 1e-7 and case.c(x.detach()).abs().max() < 1e-11:
            break
    return x


# Adam's run of the catalogue costs ~25 s of CPU (its steps are the dearest and it needs the most) and the
# fixed-step SQP's ~5 s: slow-marked. The default suite solves the catalogue with heavy ball (the same projected
# step as the fixed-step SQP, with momentum), the fixed-step SQP the linear QPs above and the nonlinear
# Hock-Schittkowski set with equalities and inequalities (test_hs_inequality.py), and Adam the QPs above.
_SLOW_CATALOGUE = {"sqp-adam", "sqp-fixed"}


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=[pytest.mark.slow] if m in _SLOW_CATALOGUE else []) for m in CATALOGUE_METHODS]
)
def test_catalogue_solved_full_batch(method):
    factory, iters = CATALOGUE_METHODS[method]
    failures = []
    for case in CASES:
        x = _solve(case, factory, iters)
        err = case.error(x.detach())
        viol = case.c(x.detach()).abs().max().item()
        if not (err < 1e-6 and viol < 1e-10):
            failures.append(f"{case.name}: |x - x*| = {err:.2e}, |c| = {viol:.2e}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_catalogue_solved_by_the_adaptive_rule():
    """The Berahas et al. step size is conservative (≈ 1/L): a larger budget, slow-marked."""
    factory = lambda p: sqpoptim.StochasticSQP(p, lr=1.0, step_rule="adaptive")  # noqa: E731
    failures = []
    for case in CASES:
        x = _solve(case, factory, 30000)
        err, viol = case.error(x.detach()), case.c(x.detach()).abs().max().item()
        if not (err < 1e-6 and viol < 1e-10):
            failures.append(f"{case.name}: |x - x*| = {err:.2e}, |c| = {viol:.2e}")
    assert not failures, "\n".join(failures)
