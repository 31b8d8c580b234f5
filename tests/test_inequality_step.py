"""The inequality-constrained step QP and the cone-projected gradient against scipy and dense KKT solves
(float64, 1e-10), the equality path of the package, and the KKT conditions themselves."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sqpoptim._dual_qp import solve_dual_qp
from sqpoptim._inequality import ELASTIC_SHIFT, default_shift, inequality_step, project_gradient
from sqpoptim._linalg import factor_gram, gram, normal_step, project

from .qp_oracles import certify, qp_reference

f64 = torch.float64


def feasible_problem(m_eq, m_in, n, seed, *, gamma=1.0, row_scales=False, active_frac=0.5):
    """J [m, n], c with a consistent linearisation (a known feasible d with part of the inequalities at their
    bound), d0 and a positive diagonal metric h."""
    gen = torch.Generator().manual_seed(seed)
    m = m_eq + m_in
    J = torch.randn(m, n, generator=gen, dtype=f64)
    if row_scales:
        J = J * torch.logspace(-2, 2, m, dtype=f64)[torch.randperm(m, generator=gen)].unsqueeze(1)
    d_feas = torch.randn(n, generator=gen, dtype=f64)
    slack = torch.rand(m, generator=gen, dtype=f64) * (torch.rand(m, generator=gen) > active_frac)
    slack[:m_eq] = 0
    c = -(J @ d_feas + slack) / gamma
    d0 = 3 * torch.randn(n, generator=gen, dtype=f64)
    h = torch.rand(n, generator=gen, dtype=f64) * 10 + 0.1
    return J, c, d0, h, d_feas.numpy()


def _step(J, c, d0, m_eq, gamma=1.0, h=None, **kw):
    return inequality_step(d0, c, J, m_eq, gamma=gamma, weight=None if h is None else 1.0 / h, **kw)


@pytest.mark.parametrize("metric", ["identity", "diagonal"])
@pytest.mark.parametrize(
    "m_eq,m_in,n,seed",
    [(0, 1, 3, 0), (0, 6, 4, 1), (2, 5, 8, 2), (3, 12, 6, 3), (0, 20, 30, 4), (5, 30, 12, 5), (1, 8, 3, 6)],
)
def test_step_matches_scipy_certified_solution(m_eq, m_in, n, seed, metric):
    J, c, d0, h, feas = feasible_problem(m_eq, m_in, n, seed)
    h = None if metric == "identity" else h
    d_ref, _ = qp_reference(J.numpy(), c.numpy(), d0.numpy(), m_eq, h=None if h is None else h.numpy(), start=feas)
    out = _step(J, c, d0, m_eq, h=h)
    assert bool(out.converged)
    np.testing.assert_allclose(out.delta.numpy(), d_ref, rtol=1e-10, atol=1e-10)
    assert out.violation.item() < 1e-10


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_step_with_gamma_and_wide_row_scales(gamma):
    J, c, d0, h, feas = feasible_problem(2, 10, 15, seed=11, gamma=gamma, row_scales=True)
    d_ref, _ = qp_reference(J.numpy(), c.numpy(), d0.numpy(), 2, gamma=gamma, h=h.numpy(), start=feas)
    out = _step(J, c, d0, 2, gamma=gamma, h=h)
    np.testing.assert_allclose(out.delta.numpy(), d_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("metric", ["identity", "diagonal"])
def test_equalities_only_is_the_equality_step(metric):
    """Every row an equality: d = P_W d0 + v_W, the decomposition of the equality path, to rounding."""
    J, c, d0, h, _ = feasible_problem(6, 0, 20, seed=3)
    W = None if metric == "identity" else 1.0 / h
    F = factor_gram(gram(J, W), 1e-7)
    expected = project(J, d0, F, W) + normal_step(J, c, F, W)
    out = inequality_step(d0, c, J, 6, gamma=1.0, weight=W)
    torch.testing.assert_close(out.delta, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.tangential(), project(J, d0, F, W), rtol=1e-12, atol=1e-12)


def test_inactive_inequalities_leave_the_equality_step_unchanged():
    J, c, d0, _, _ = feasible_problem(4, 0, 25, seed=5)
    gen = torch.Generator().manual_seed(1)
    J_in = torch.randn(7, 25, generator=gen, dtype=f64)
    c_in = -(J_in @ d0).abs() - 10 * J_in.norm(dim=1) * (J @ d0 + c).abs().max()  # far inside, even at d
    F = factor_gram(gram(J), 1e-7)
    expected = project(J, d0, F) + normal_step(J, c, F)
    out = inequality_step(d0, torch.cat([c, c_in]), torch.cat([J, J_in]), 4, gamma=1.0)
    torch.testing.assert_close(out.delta, expected, rtol=1e-12, atol=1e-12)
    assert out.active.tolist() == [True] * 4 + [False] * 7
    assert (out.y[4:] == 0).all()


def test_working_set_decomposition():
    """d = u + γ v with u = P_A d0 (tangential, J_A u = 0) and γ v the normal step of the working set."""
    J, c, d0, _, _ = feasible_problem(2, 9, 12, seed=8)
    gamma = 0.5
    out = _step(J, c, d0, 2, gamma=gamma)
    A = out.active
    JA, cA = J[A], c[A]
    FA = factor_gram(gram(JA), 1e-7)
    u = out.tangential()
    torch.testing.assert_close(u, project(JA, d0, FA), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(out.delta - u, gamma * normal_step(JA, cA, FA), rtol=1e-11, atol=1e-11)
    assert (JA @ u).abs().max() < 1e-11


# ---------------------------------------------------------------- degenerate cases


def test_duplicate_active_constraints():
    """The same constraint three times: G is singular, the multiplier is split, d is the unique solution."""
    J, c, d0, _, _ = feasible_problem(1, 4, 6, seed=13, active_frac=1.0)
    J = torch.cat([J, J[2:3], J[2:3]])
    c = torch.cat([c, c[2:3], c[2:3]])
    d_ref, _ = qp_reference(J.numpy(), c.numpy(), d0.numpy(), 1)
    out = _step(J, c, d0, 1)
    np.testing.assert_allclose(out.delta.numpy(), d_ref, rtol=1e-10, atol=1e-10)
    err = certify(J.numpy(), c.numpy(), out.delta.numpy(), out.y.numpy(), d0.numpy(), np.ones(6), 1)
    assert err < 1e-10


def test_more_active_constraints_than_parameters():
    """Ten constraints through one vertex in R^3 (all active, G of rank 3), and d0 outside their cone."""
    gen = torch.Generator().manual_seed(2)
    J = torch.randn(10, 3, generator=gen, dtype=f64)
    vertex = torch.tensor([0.3, -0.2, 0.5], dtype=f64)
    c = -(J @ vertex)  # every constraint active at d = vertex
    d0 = vertex + 5 * torch.randn(3, generator=gen, dtype=f64)
    d_ref, _ = qp_reference(J.numpy(), c.numpy(), d0.numpy(), 0)
    out = _step(J, c, d0, 0)
    assert bool(out.converged)
    np.testing.assert_allclose(out.delta.numpy(), d_ref, rtol=1e-10, atol=1e-10)


def test_weakly_active_constraint():
    """d0 lands exactly on a bound with a zero multiplier (no strict complementarity): d = d0."""
    gen = torch.Generator().manual_seed(4)
    J = torch.randn(3, 5, generator=gen, dtype=f64)
    d0 = torch.randn(5, generator=gen, dtype=f64)
    c = -(J @ d0)
    c[1:] -= 1.0  # rows 1, 2 strictly inside; row 0 exactly on its bound at d0
    out = _step(J, c, d0, 0)
    torch.testing.assert_close(out.delta, d0, rtol=0, atol=1e-14)
    assert out.y.abs().max() < 1e-14


# ---------------------------------------------------------------- infeasible linearisations


def elastic_reference(J, c, d0, m_eq, h=None, gamma=1.0, eps=ELASTIC_SHIFT):
    """Oracle of the elastic step, in the primal with numpy: min φ(d) = ½‖d − d0‖²_H + Σ viol_i²/(2ε‖J_i‖²_W),
    viol = [γc_E + J_E d; max(0, γc_I + J_I d)], a strongly convex C¹ piecewise quadratic. Newton's method on the
    pattern of violated rows: once the pattern of the new point is the one it was solved with, φ is the
    quadratic of that pattern near it and the point is its exact minimiser (a dense solve). Returns (d, viol)."""
    J, c, d0 = (np.asarray(a, dtype=np.float64) for a in (J, c, d0))
    n = J.shape[1]
    h = np.ones(n) if h is None else np.asarray(h, dtype=np.float64)
    w = 1.0 / (eps * (J**2 / h).sum(axis=1))  # penalty weight of each row
    d = d0.copy()
    pattern = None
    for _ in range(100):
        r = gamma * c + J @ d
        new = np.r_[np.ones(m_eq, bool), r[m_eq:] > 0]
        if pattern is not None and (new == pattern).all():
            break
        pattern = new
        JP, wP = J[pattern], w[pattern]
        d = np.linalg.solve(np.diag(h) + JP.T @ (wP[:, None] * JP), h * d0 - JP.T @ (wP * gamma * c[pattern]))
    else:
        raise AssertionError("the pattern of violated rows did not settle")
    r = gamma * c + J @ d
    return d, np.r_[r[:m_eq], np.maximum(r[m_eq:], 0)]


@pytest.mark.parametrize("metric", ["identity", "diagonal"])
@pytest.mark.parametrize("seed", range(3))
def test_infeasible_linearisation_takes_the_elastic_step(seed, metric):
    gen = torch.Generator().manual_seed(seed)
    m_eq, m, n = 1, 9, 3
    J = torch.randn(m, n, generator=gen, dtype=f64)
    c = torch.randn(m, generator=gen, dtype=f64) + 1.0  # 8 random half-spaces in R^3 plus an equality
    d0 = torch.randn(n, generator=gen, dtype=f64)
    h = torch.rand(n, generator=gen, dtype=f64) * 10 + 0.1 if metric == "diagonal" else None
    d_ref, t_ref = elastic_reference(J.numpy(), c.numpy(), d0.numpy(), m_eq, h=None if h is None else h.numpy())
    assert np.abs(t_ref).max() > 1e-2  # the linearisation is inconsistent indeed
    for early_exit in (True, False):
        out = _step(J, c, d0, m_eq, h=h, early_exit=early_exit)
        assert bool(out.elastic) and bool(out.converged)
        # the oracle's dense solve has a condition number ~1/ε and our multipliers are ~|t|/ε (cancellation in
        # J'y): the two agree to ~1e-10 of max(|d|, |t|)
        scale = max(1.0, np.abs(d_ref).max(), np.abs(t_ref).max())
        np.testing.assert_allclose(out.delta.numpy(), d_ref, rtol=0, atol=1e-9 * scale)
        np.testing.assert_allclose(out.violation.item(), np.abs(t_ref).max(), rtol=1e-8)


def test_contradictory_bounds():
    """x ≤ -1 and x ≥ 1 linearised at 0: the elastic step stays at 0 (up to 1/(1 + 2/ε) of d0), violation 1."""
    J = torch.tensor([[1.0], [-1.0]], dtype=f64)
    c = torch.tensor([1.0, 1.0], dtype=f64)
    out = _step(J, c, torch.tensor([0.7], dtype=f64), 0)
    expected = 0.7 / (1 + 2 / ELASTIC_SHIFT)
    assert abs(out.delta.item() - expected) < 1e-9  # y ≈ 1/ε each, cancelling in J'y: a few ulp of 1e6
    assert abs(out.violation.item() - 1.0) < 1e-6
    assert bool(out.elastic)


def test_consistent_problems_are_not_elastic():
    J, c, d0, h, _ = feasible_problem(2, 12, 6, seed=3)
    out = _step(J, c, d0, 2, h=h, early_exit=False)
    assert not bool(out.elastic)


# ---------------------------------------------------------------- warm start and the sync-free loop


def test_warm_start_converges_in_one_iteration_and_agrees():
    J, c, d0, _, _ = feasible_problem(2, 25, 30, seed=21)
    cold = _step(J, c, d0, 2)
    assert int(cold.iterations) >= 1
    gen = torch.Generator().manual_seed(0)
    J2 = J + 1e-6 * torch.randn(J.shape, generator=gen, dtype=f64)
    d02 = d0 + 1e-6 * torch.randn(d0.shape, generator=gen, dtype=f64)
    warm = _step(J2, c, d02, 2, held=cold.held)
    again = _step(J2, c, d02, 2)
    assert int(warm.iterations) == 0  # the first partition tried is optimal
    torch.testing.assert_close(warm.delta, again.delta, rtol=1e-12, atol=1e-12)


def test_fixed_budget_without_host_reads_equals_early_exit():
    J, c, d0, h, _ = feasible_problem(3, 20, 16, seed=9)
    a = _step(J, c, d0, 3, h=h, early_exit=True, max_iter=40)
    b = _step(J, c, d0, 3, h=h, early_exit=False, max_iter=40)
    assert bool(a.converged) and bool(b.converged)
    assert int(a.iterations) == int(b.iterations)
    torch.testing.assert_close(a.delta, b.delta, rtol=0, atol=0)


def test_unconverged_budget_is_reported_and_dual_feasible():
    J, c, d0, _, _ = feasible_problem(0, 40, 20, seed=17, active_frac=0.2)
    full = _step(J, c, d0, 0)
    assert int(full.iterations) > 1
    cut = _step(J, c, d0, 0, max_iter=1, early_exit=False)
    assert not bool(cut.converged)
    assert (cut.y >= 0).all()
    # resuming from the partition it returned finishes the job
    resumed = _step(J, c, d0, 0, held=cut.held)
    torch.testing.assert_close(resumed.delta, full.delta, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- KKT conditions on random problems


@settings(max_examples=40, deadline=None)
@given(
    m_eq=st.integers(0, 3),
    m_in=st.integers(1, 15),
    n=st.integers(2, 12),
    seed=st.integers(0, 10**6),
    frac=st.floats(0.0, 1.0),
)
def test_kkt_conditions_hold_on_random_consistent_problems(m_eq, m_in, n, seed, frac):
    m_eq = min(m_eq, n)
    J, c, d0, h, _ = feasible_problem(m_eq, m_in, n, seed, active_frac=frac)
    out = _step(J, c, d0, m_eq, h=h, max_iter=200)
    assert bool(out.converged)
    err = certify(J.numpy(), c.numpy(), out.delta.numpy(), out.y.numpy(), d0.numpy(), h.numpy(), m_eq)
    assert err < 1e-9


# ---------------------------------------------------------------- the projected gradient


def test_gradient_mapping_with_equalities_or_out_of_reach_inequalities_is_the_equality_projection():
    J, _, g, _, _ = feasible_problem(3, 5, 20, seed=1)
    F = factor_gram(gram(J[:3]), 1e-7)
    far = torch.cat([torch.zeros(3, dtype=f64), torch.full((5,), -1e6, dtype=f64)])
    for alpha in (1e-3, 0.5):
        gbar, lam, _ = project_gradient(g, far, J, 3, alpha)
        torch.testing.assert_close(gbar, project(J[:3], g, F), rtol=1e-12, atol=1e-12)
        assert (lam[3:] == 0).all()
    gbar0, _, _ = project_gradient(g, far[3:], J[3:], 0, 0.5)
    assert torch.equal(gbar0, g)  # nothing within reach: g itself, bit for bit


@pytest.mark.parametrize("alpha", [1e-2, 0.3])
def test_gradient_mapping_against_scipy(alpha):
    """ḡ = -d/α with d the certified projection of -αg onto {J_E d = 0, min(c_I, 0) + J_I d <= 0} (1e-10), and
    ḡ = g + J'λ with λ >= 0 on the inequalities."""
    J, c, _, _, _ = feasible_problem(2, 8, 10, seed=4)
    c = c.clone()
    c[2:6] = torch.tensor([0.0, -1e-3, 0.5, -2.0], dtype=f64)  # on, just inside, beyond, far inside
    gen = torch.Generator().manual_seed(5)
    g = 3 * torch.randn(10, generator=gen, dtype=f64)
    gbar, lam, _ = project_gradient(g, c, J, 2, alpha)
    shifted = torch.cat([torch.zeros(2, dtype=f64), c[2:].clamp_max(0.0)])
    d_ref, _ = qp_reference(J.numpy(), shifted.numpy(), (-alpha * g).numpy(), 2)
    np.testing.assert_allclose((-alpha * gbar).numpy(), d_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gbar, g + J.T @ lam, rtol=1e-12, atol=1e-12)
    assert (lam[2:] >= 0).all() and (lam[2:] > 0).any()


def test_gradient_mapping_vanishes_at_a_kkt_point():
    """g = -J_A'λ with λ >= 0 on constraints at their bound (plus an equality), others inside: ḡ = 0 and the
    multipliers are recovered."""
    gen = torch.Generator().manual_seed(6)
    J = torch.randn(5, 8, generator=gen, dtype=f64)
    lam_true = torch.tensor([0.7, 1.3, 0.0, 2.0, 0.0], dtype=f64)  # row 0 equality; rows 1, 3 active
    c = torch.tensor([0.0, 0.0, -0.4, 0.0, -1.0], dtype=f64)
    g = -(J.T @ lam_true)
    gbar, lam, _ = project_gradient(g, c, J, 1, 0.1)
    assert gbar.abs().max() < 1e-12
    torch.testing.assert_close(lam, lam_true, rtol=1e-10, atol=1e-12)


def test_default_shift():
    assert default_shift(1e-6) == 1e-12
    assert default_shift(1e-7) == 1e-12
    assert default_shift(1e-3) == 1e-6


def test_dual_solver_handles_zero_gradient_rows():
    """A constraint with a zero gradient (G_ii = 0) satisfied by its value: multiplier 0, no NaN."""
    G = torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=f64)
    b = torch.tensor([-1.0, 1.0], dtype=f64)
    out = solve_dual_qp(G, b, torch.tensor([True, True]))
    assert bool(out.converged)
    torch.testing.assert_close(out.y, torch.tensor([0.0, 0.5], dtype=f64))


def test_nearly_parallel_active_rows_converge_without_cycling():
    """Two nearly parallel active rows (a thin wedge) make the multipliers large (~1e3) and w = b − Gy a difference
    of large terms: rounding must not re-admit the inactive row at every iteration (found by the property test
    above: the solve cycled to its budget and the step fell back to the elastic one, off by 5e-4)."""
    J, c, d0, h, _ = feasible_problem(0, 3, 2, 9432, active_frac=1.0)
    out = _step(J, c, d0, 0, h=h, max_iter=200)
    assert bool(out.converged) and not bool(out.elastic) and int(out.iterations) < 10
    assert out.y.max().item() > 100  # the large multipliers of the thin wedge
    err = certify(J.numpy(), c.numpy(), out.delta.numpy(), out.y.numpy(), d0.numpy(), h.numpy(), 0)
    assert err < 1e-9
