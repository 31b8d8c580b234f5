"""The Levenberg–Marquardt normal step (``normal_damping``): the damped solve against the dense regularised
least-squares oracle, globalisation where the Gauss–Newton step diverges, and the ratio rule for ν (float64)."""

import itertools
import math

import pytest
import torch

import sqpoptim
from sqpoptim import _damping
from sqpoptim._linalg import damped, factor_gram, gram, normal_step

from .helpers import TinyPINN, burgers_residual, f64
from .optimizers import PROJECTED_SQP, factories
from .test_linalg import random_problem

X = torch.rand(40, 2, dtype=f64, generator=torch.Generator().manual_seed(8))
Y = torch.sin(2 * X[:, :1])
PTS = torch.tensor([[0.2, 0.3], [0.6, 0.4], [0.8, 0.9]], dtype=f64)

DAMPED = factories(*PROJECTED_SQP)


def _rejected(opt) -> int:
    """Number of damped steps the optimizer has rejected so far."""
    damping = opt.global_state.damping
    return 0 if damping is None or damping.rejected_steps is None else int(damping.rejected_steps)


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("nu", [1e-6, 1e-2, 3.0])
def test_damped_normal_step_solves_the_regularised_least_squares_problem(nu, weighted, sync_free):
    # v = argmin ½‖c + Jv‖² + μ/2 vᵀW⁻¹v, μ = ν mean(diag JWJᵀ): (JᵀJ + μW⁻¹) v = -Jᵀc, a dense n×n solve
    J, _, c, h = random_problem(5, 18, seed=3, cond=1e6)
    w = 1.0 / h if weighted else None
    F = factor_gram(gram(J, w), 1e-7, sync_free=sync_free)
    v = normal_step(J, c, damped(F, torch.tensor(nu, dtype=f64), 1e-7, sync_free=sync_free), w)
    G = J @ (J * (w if weighted else 1.0)).T
    mu = nu * torch.diagonal(G).mean()
    Winv = torch.diag(h) if weighted else torch.eye(18, dtype=f64)
    oracle = torch.linalg.solve(J.T @ J + mu * Winv, -J.T @ c)
    torch.testing.assert_close(v, oracle, rtol=1e-8, atol=1e-10)
    assert damped(F, None, 1e-7) is F


@pytest.mark.parametrize("nu0", [1e-6, 1.0])
@pytest.mark.parametrize("name", list(DAMPED))
def test_damping_globalises_the_normal_step_where_gauss_newton_diverges(name, nu0):
    # c(x) = atan(x0): the Gauss-Newton (Newton) iteration diverges from |x0| > 1.39; x1 carries the objective.
    def run(**kw):
        x = torch.tensor([2.0, 0.0], dtype=f64, requires_grad=True)
        opt = DAMPED[name]([x], lr=0.05, **kw)
        worst, nus = 0.0, []
        for _ in range(300):
            opt.step(lambda: (0.5 * (x[1] - 1.0) ** 2, torch.atan(x[:1])))
            worst = max(worst, abs(x[0].item()))
            nus.append(opt.diagnostics().get("damping"))
            if not math.isfinite(worst) or worst > 1e6:
                break
        return x.detach(), worst, nus, opt

    _, worst, _, _ = run(normal_damping=None)  # undamped: |x0| = 2 -> 3.5 -> 13.9 -> 279 -> ...
    assert worst > 1e6
    x, worst, nus, opt = run(normal_damping=nu0)
    assert worst < 4.0  # one Gauss-Newton overshoot (2 -> 3.54) is visited, then rejected: no runaway
    assert abs(math.atan(x[0].item())) < 1e-12  # and the iteration converges
    assert abs(x[1].item() - 1.0) < 0.05  # while the tangential part minimises the objective
    if nu0 == 1e-6:  # from (almost) Gauss-Newton: failures escalate ν by 2, 4, 8, ... until a step succeeds
        assert _rejected(opt) >= 3
        assert nus[1] == pytest.approx(2 * nus[0]) and nus[3] == pytest.approx(8 * nus[0])


def test_exact_model_divides_nu_by_three_each_step_and_damped_steps_still_reach_feasibility():
    gen = torch.Generator().manual_seed(5)
    C, d = torch.randn(3, 10, generator=gen, dtype=f64), torch.randn(3, generator=gen, dtype=f64)
    x = torch.zeros(10, dtype=f64, requires_grad=True)
    opt = sqpoptim.ProjectedHeavyBallSQP([x], lr=0.0, normal_damping=1.0)  # normal steps only
    nus, violations = [], []
    for _ in range(25):
        opt.step(lambda: (x.sum() * 0.0, C @ x - d))
        nus.append(opt.diagnostics()["damping"])
        violations.append((C @ x.detach() - d).norm().item())
    # linear constraints: the model is exact, ρ = 1, so Nielsen's rule gives ν_k = 3^{-k} while c is above
    # rounding level, down to the floor 1e-6
    exact = [k for k in range(1, 25) if violations[k - 1] > 1e-8]
    assert len(exact) >= 5
    for k in [0, *exact]:
        assert nus[k] == pytest.approx(max(3.0**-k, 1e-6), rel=1e-12)
    assert min(nus) >= 1e-6
    assert violations[0] < (C @ torch.zeros(10, dtype=f64) - d).norm().item()
    assert all(b < a for a, b in itertools.pairwise(violations[:6]))  # monotone (superlinear)
    assert violations[-1] < 1e-12
    assert _rejected(opt) == 0


def test_nu_relaxes_while_the_tangential_step_dominates():
    # on the unit circle, pulled along it by a large tangential step: c drifts (second order in u) although the
    # normal step is tiny. That drift says nothing about the normal step: nothing is rejected, and ν relaxes (a
    # damped, small normal step would otherwise never be judged again and c would drift away)
    x = torch.tensor([1.0, 0.0], dtype=f64, requires_grad=True)
    opt = sqpoptim.StochasticSQP([x], lr=0.2, normal_damping=0.01)
    nus = []
    for _ in range(20):
        opt.step(lambda: (x[1] * -1.0, (x @ x - 1.0).reshape(1)))
        nus.append(opt.diagnostics()["damping"])
        assert not opt.diagnostics()["rejected"]
    assert nus[0] == nus[1] == 0.01  # the first step starts feasible: no predicted decrease, nothing to judge
    for a, b in itertools.pairwise(nus[1:]):
        assert b == pytest.approx(max(0.9 * a, 1e-6), rel=1e-12)
    assert abs(x.detach().norm().item() - 1.0) < 0.05  # and the normal steps hold c in check


def _closure(model, scale=1.0):
    return lambda: (((model(X) - Y) ** 2).mean() * scale, burgers_residual(model, PTS))


def test_sync_free_damped_steps_match_exact_mode_and_a_refused_step_keeps_the_damping_state():
    out = []
    for sync_free in (False, True):
        model = TinyPINN(seed=21)
        opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, normal_damping=0.5, sync_free=sync_free)
        for _ in range(6):
            opt.step(_closure(model))
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        if sync_free:
            before = opt.global_state.damping.nu.clone(), opt.global_state.damping.model.clone()
            opt.step(_closure(model, math.inf))
            after = opt.global_state.damping
            assert torch.equal(after.nu, before[0]) and torch.equal(after.model, before[1])
            with pytest.raises(FloatingPointError):
                opt.check_finite()
    torch.testing.assert_close(out[0], out[1], rtol=1e-11, atol=1e-12)


def test_damping_state_survives_a_state_dict_round_trip():
    model = TinyPINN(seed=22)
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, normal_damping=0.5)
    for _ in range(3):
        opt.step(lambda: (((model(X) - Y) ** 2).mean(), burgers_residual(model, PTS)))
    state = opt.state_dict()
    fresh = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, normal_damping=0.5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.global_state.damping.nu, opt.global_state.damping.nu)
    assert torch.equal(fresh.global_state.damping.model, opt.global_state.damping.model)
    assert torch.equal(fresh.global_state.damping.x_accepted, opt.global_state.damping.x_accepted)


@pytest.mark.parametrize("value", [-1.0, 1e5, float("nan"), "0.1"])
def test_invalid_normal_damping_is_refused(value):
    with pytest.raises(ValueError, match="normal_damping"):
        sqpoptim.ProjectedAdamSQP([torch.ones(2, requires_grad=True)], normal_damping=value)


def test_damping_is_refused_with_the_adaptive_step_rule():
    with pytest.raises(ValueError, match="normal_damping applies to step_rule='fixed'"):
        sqpoptim.StochasticSQP([torch.ones(2, requires_grad=True)], step_rule="adaptive", normal_damping=0.1)


@pytest.mark.parametrize("name", list(DAMPED))
def test_the_normal_step_is_damped_by_default(name):
    x = torch.tensor([2.0, 0.0], dtype=f64, requires_grad=True)
    opt = DAMPED[name]([x], lr=0.05)
    assert opt.normal_damping == _damping.DEFAULT_NU0
    opt.step(_atan_closure(x))
    assert opt.diagnostics()["damping"] == pytest.approx(_damping.DEFAULT_NU0)
    assert DAMPED[name]([x], lr=0.05, normal_damping=None).normal_damping is None  # the papers' step


def test_the_adaptive_rule_and_the_unconstrained_baselines_are_undamped_by_default():
    x = torch.tensor([2.0, 0.0], dtype=f64, requires_grad=True)
    adaptive = sqpoptim.StochasticSQP([x], step_rule="adaptive")
    assert adaptive.normal_damping is None
    adaptive.step(_atan_closure(x))
    assert "damping" not in adaptive.diagnostics()
    assert sqpoptim.AdamUnc([x]).normal_damping is None
    assert sqpoptim.PenaltyAdam([x]).normal_damping is None


@pytest.mark.parametrize("sync_free", [False, True])
def test_rejected_steps_move_complex_parameters_back(sync_free):
    # a complex parameter is stepped through its real view (re, im): the run must be the run of the real pair,
    # rejections included (moving back after a rejection reads those views from inside the closure's grad mode)
    z = torch.tensor([2.0 + 0.5j], dtype=torch.complex128, requires_grad=True)
    x = torch.tensor([2.0, 0.5], dtype=f64, requires_grad=True)
    opt_z = sqpoptim.ProjectedAdamSQP([z], lr=0.05, normal_damping=1e-6, sync_free=sync_free)
    opt_x = sqpoptim.ProjectedAdamSQP([x], lr=0.05, normal_damping=1e-6, sync_free=sync_free)
    for _ in range(60):
        opt_z.step(lambda: ((z.imag - 1.0).square().sum(), torch.atan(z.real)))
        opt_x.step(lambda: ((x[1] - 1.0).square(), torch.atan(x[:1])))
        torch.testing.assert_close(torch.view_as_real(z.detach())[0], x.detach(), rtol=0, atol=0)
    assert _rejected(opt_z) == _rejected(opt_x) >= 3  # Gauss-Newton from Re z = 2 overshoots: rejected, escalated
    assert abs(math.atan(z.real.item())) < 1e-12


def _atan_closure(x):
    return lambda: (0.5 * (x[1] - 1.0) ** 2, torch.atan(x[:1]))


@pytest.mark.parametrize("name", list(DAMPED))
def test_sync_free_rejections_match_exact_mode(name):
    # the rejection is decided on the device in sync-free mode (a masked no-op step that moves x back) and on
    # the host in exact mode (an early return): the same iterates, ν and count of rejected steps
    runs = []
    for sync_free in (False, True):
        x = torch.tensor([2.0, 0.0], dtype=f64, requires_grad=True)
        opt = DAMPED[name]([x], lr=0.05, normal_damping=1e-6, sync_free=sync_free)
        path = []
        for _ in range(40):
            opt.step(_atan_closure(x))
            path.append(x.detach().clone())
        runs.append((torch.stack(path), float(_rejected(opt)), opt.diagnostics()["damping"]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-10, atol=1e-12)
    assert runs[0][1] == runs[1][1] >= 3
    assert runs[0][2] == pytest.approx(runs[1][2], rel=1e-12)


def test_damped_normal_step_with_per_coordinate_step_sizes_solves_the_weighted_problem():
    # param groups with different normal step sizes: δ = γ_max v_D with D = diag(γ/γ_max), damped in the D metric:
    # (JᵀJ + μ D⁻¹) δ = -γ_max Jᵀc, μ = ν mean(diag J D Jᵀ)
    from sqpoptim._linalg import scaled_normal_step

    J, _, c, _ = random_problem(4, 12, seed=9, cond=1e5)
    gamma = torch.cat([torch.full((6,), 0.2, dtype=f64), torch.full((6,), 0.8, dtype=f64)])
    F = factor_gram(gram(J), 1e-7)
    nu = torch.tensor(0.05, dtype=f64)
    delta, _ = scaled_normal_step(J, c, F, gamma, rank_tol=1e-7, damping=nu)
    d = gamma / gamma.max()
    mu = nu * torch.diagonal(J @ (J * d).T).mean()
    oracle = torch.linalg.solve(J.T @ J + mu * torch.diag(1.0 / d), -gamma.max() * (J.T @ c))
    torch.testing.assert_close(delta, oracle, rtol=1e-8, atol=1e-10)


def test_a_step_with_another_number_of_constraints_is_not_judged():
    """The ratio test compares ‖c‖ before and after a step; when the closure returns a different number of
    constraints the comparison means nothing, so the step is neither rejected nor used to adapt ν."""
    x = torch.tensor([2.0, -1.0, 0.5], dtype=f64, requires_grad=True)
    opt = sqpoptim.ProjectedAdamSQP([x], lr=1e-2)
    three = lambda: ((x**2).sum(), torch.stack([x[0] ** 2 - 1, x[1] ** 3, x[2] - 0.3]))  # noqa: E731
    # two constraints with a violation 1e6 times larger than the three had: judged, this would be a rejection
    two = lambda: ((x**2).sum(), 1e6 * torch.stack([x[0] ** 2 - 1, x[1] ** 3]))  # noqa: E731
    opt.step(three)
    nu = opt.global_state.damping.nu.clone()
    before = x.detach().clone()
    opt.step(two)
    diag = opt.diagnostics()
    assert diag["rejected"] is False and math.isnan(diag["damping_ratio"])
    assert torch.equal(opt.global_state.damping.nu, nu) and not torch.equal(x.detach(), before)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("nu", [None, 1e-6, 1e-2, 3.0])
def test_the_solver_knows_the_image_of_its_step_without_a_product(nu, weighted):
    # exact solves: J δ = γ J v = -γ(c + μy) with (G + μI) y = -c, and J u = 0; the product J δ is the oracle
    from sqpoptim._dense_solver import DenseSolver
    from sqpoptim._jacobian_operator import DenseJacobian

    J, x, c, h = random_problem(6, 30, seed=5, cond=1e3)
    S = DenseSolver(DenseJacobian(J), rank_tol=1e-7, sync_free=False)
    S = S.weighted(1.0 / h) if weighted else S
    damping = None if nu is None else torch.tensor(nu, dtype=f64)
    delta, info = S.step(x, c, 0.7, damping)
    # the two differ by the projection's rounding: |J u| ≲ ε κ(G) ‖J‖ ‖x‖ (κ(G) = 1e6 here)
    bound = 64 * torch.finfo(f64).eps * 1e6 * torch.linalg.matrix_norm(J, 2) * torch.linalg.vector_norm(x)
    assert float((info["Jdelta"] - J @ delta).abs().max()) <= float(bound)
    assert float(bound) < 1e-5 * float(torch.linalg.vector_norm(c))  # (and that is far below what is predicted)
    # not claimed where the solve is not exact (sync-free) or the normal step has per-coordinate step sizes
    assert "Jdelta" not in DenseSolver(DenseJacobian(J), rank_tol=1e-7, sync_free=True).step(x, c, 0.7, damping)[1]
    gamma = torch.full((30,), 0.7, dtype=f64)
    assert "Jdelta" not in DenseSolver(DenseJacobian(J), rank_tol=1e-7, sync_free=False).step(x, c, gamma, damping)[1]


@pytest.mark.parametrize("name", sorted(DAMPED))
def test_the_damping_model_predicts_the_linearised_residual_of_the_step_taken(name):
    # c_predicted = ‖c + Jδ‖/‖c‖ with δ the displacement applied and J at the old point, row by row by autograd
    import copy

    model = TinyPINN(seed=6)
    opt = DAMPED[name](model.parameters())
    closure = lambda: (((model(X) - Y) ** 2).mean(), burgers_residual(model, PTS))  # noqa: E731
    checked = 0
    for _ in range(6):
        old = copy.deepcopy(model)
        opt.step(closure)
        delta = torch.cat([(p - q).detach().reshape(-1) for p, q in zip(model.parameters(), old.parameters())])
        if opt.diagnostics()["rejected"] or not delta.any():
            continue
        c = burgers_residual(old, PTS)
        J = torch.stack(
            [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(ci, list(old.parameters()), retain_graph=True)])
                for ci in c
            ]
        )
        expected = (torch.linalg.vector_norm(c + J @ delta) / torch.linalg.vector_norm(c)).detach()
        # to the rounding of J u = 0 against ‖c‖ (the ratio is ~1e-6 once nearly feasible)
        assert float(opt.diagnostics()["c_predicted"]) == pytest.approx(float(expected), rel=1e-6, abs=1e-9)
        checked += 1
    assert checked >= 3


def test_the_judgement_on_the_host_is_the_judgement_on_the_device():
    """Exact mode judges a step on Python floats, sync-free mode on 0-d tensors; both run one rule. Every branch
    (success, failure with escalation, relaxation, no predicted decrease, non-finite values, the clamps of ν
    and of the escalation) gives the same ν, escalation, ρ and verdict, bit for bit."""
    nus, escalations = [1e-6, 0.3, 9e3], [2.0, 2.0**20]
    befores, predicteds = [2.0, 1e-300], [0.5, 2.0, 3.0]
    actuals = [0.1, 1.9, 2.5, 0.0, math.inf, math.nan]
    cases = itertools.product(nus, escalations, befores, predicteds, [0.0, 1.0], actuals, [1.0, math.inf])
    seen = set()
    for nu, esc, before, predicted, dominates, actual, loss in cases:
        state = _damping.DampingState(
            nu=torch.tensor(nu, dtype=f64),
            escalation=torch.tensor(esc, dtype=f64),
            model=torch.tensor([before, predicted, dominates], dtype=f64),
        )
        c = torch.tensor([actual, 0.0], dtype=f64)  # ‖c‖ = |actual|
        loss_t = torch.tensor(loss, dtype=f64)
        device = _damping.judge(state, loss_t, c, 2)
        host = _damping.judge(state, loss_t, c, 2, host=True)
        assert isinstance(host.reject, bool) and host.reject == bool(device.reject)
        for a, b in ((host.nu, device.nu), (host.escalation, device.escalation), (host.rho, device.rho)):
            assert a.dtype == b.dtype == f64
            assert torch.equal(a, b) or (a.isnan() and b.isnan()), (nu, esc, before, predicted, dominates, actual)
        seen.add((host.reject, math.isnan(float(host.rho)), round(float(host.nu) / nu, 6)))
    # every branch was taken: a rejection, an accepted judged step, relaxation (0.9) and no judgement (1)
    assert any(reject for reject, _, _ in seen) and (False, False, round(1 / 3, 6)) in seen
    assert (False, True, 0.9) in seen and (False, True, 1.0) in seen


def test_a_step_that_predicted_growth_fails_where_its_normal_part_dominated_and_the_violation_grew():
    """ρ has no sign to read when the model predicted no decrease (‖c_k + J_kδ_k‖ ≥ ‖c_k‖). Such a step is a
    failure when its normal part was the larger and ‖c‖ grew (an inexact step: the exact damped one always
    predicts a decrease), on the host as on the device; otherwise it is not judged and ν stays."""
    nu, esc = 1e-3, 4.0
    cases = [  # (before, predicted, dominates, actual) -> (rejected, ν factor, ρ)
        ((2.0, 2.1, 1.0, 2.5), (True, esc, -math.inf)),
        ((2.0, 2.1, 1.0, 1.9), (False, 1.0, math.nan)),  # predicted growth, but it fell: taken, ν unchanged
        ((2.0, 2.1, 0.0, 2.5), (False, 1.0, math.nan)),  # the tangential part dominated: not the damping's
        ((2.0, 2.0, 0.0, 2.5), (False, 1.0, math.nan)),  # the model after a rejection
        ((2.0, 1.0, 1.0, 2.5), (True, esc, -0.5)),  # a judged failure, as before
    ]
    for (before, predicted, dominates, actual), (reject, factor, rho) in cases:
        state = _damping.DampingState(
            nu=torch.tensor(nu, dtype=f64),
            escalation=torch.tensor(esc, dtype=f64),
            model=torch.tensor([before, predicted, dominates], dtype=f64),
        )
        c = torch.tensor([actual, 0.0], dtype=f64)
        for host in (False, True):
            v = _damping.judge(state, torch.tensor(1.0, dtype=f64), c, 2, host=host)
            assert bool(v.reject) == reject and float(v.nu) == pytest.approx(nu * factor, rel=1e-15)
            assert (math.isnan(float(v.rho)) and math.isnan(rho)) or float(v.rho) == rho
            assert float(v.escalation) == (2 * esc if reject else esc)
