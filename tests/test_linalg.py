"""The step decomposition against the full KKT solve and its defining identities (float64)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sqpoptim import _linalg
from sqpoptim._linalg import (
    EXACT_COND_M,
    _condition,
    factor_gram,
    gram,
    kkt_reference,
    normal_step,
    project,
    scaled_normal_step,
)

f64 = torch.float64


def random_problem(m, n, seed, cond=1.0):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=gen, dtype=f64)
    if cond != 1.0:  # impose singular values spread over [1/cond, 1]
        U, _, Vh = torch.linalg.svd(J, full_matrices=False)
        J = U @ torch.diag(torch.logspace(0, -np.log10(cond), m, dtype=f64)) @ Vh
    g = torch.randn(n, generator=gen, dtype=f64)
    c = torch.randn(m, generator=gen, dtype=f64)
    h = torch.rand(n, generator=gen, dtype=f64) * 10 + 0.1
    return J, g, c, h


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("m,n", [(1, 5), (3, 20), (10, 40), (40, 41)])
def test_decomposition_equals_kkt_first_block(m, n, sync_free):
    J, g, c, _ = random_problem(m, n, seed=m * 100 + n)
    F = factor_gram(gram(J), 1e-7, sync_free=sync_free)
    v = normal_step(J, c, F)
    u = -project(J, g, F)
    s, _ = kkt_reference(J, g, c)
    torch.testing.assert_close(v + u, s, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sync_free", [False, True])
def test_decomposition_with_diagonal_metric_equals_kkt(sync_free):
    J, g, c, h = random_problem(6, 30, seed=7)
    W = 1.0 / h
    F = factor_gram(gram(J, W), 1e-7, sync_free=sync_free)
    s = normal_step(J, c, F, W) - project(J, W * g, F, W)
    s_ref, _ = kkt_reference(J, g, c, h)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_projected_gradient_leaves_step_unchanged_but_raw_momentum_does_not():
    """d depends on g only through its null-space part (any metric): g -> Pg or g + J'y changes nothing. A
    momentum of raw gradients taken at earlier Jacobians is not of that form, and changes the step."""
    J, g, c, h = random_problem(4, 25, seed=3)
    F = factor_gram(gram(J), 1e-7)
    Pg = project(J, g, F)
    d = normal_step(J, c, F) - project(J, g, F)
    torch.testing.assert_close(normal_step(J, c, F) - project(J, Pg, F), d, rtol=1e-12, atol=1e-12)
    y = torch.randn(4, dtype=f64)
    for metric in (None, h):
        ref = kkt_reference(J, g, c, metric)[0]
        torch.testing.assert_close(kkt_reference(J, Pg, c, metric)[0], ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(kkt_reference(J, g + J.T @ y, c, metric)[0], ref, rtol=1e-10, atol=1e-10)
    J_prev, g_prev, _, _ = random_problem(4, 25, seed=4)  # the previous iterate's Jacobian and gradient
    F_prev = factor_gram(gram(J_prev), 1e-7)
    raw = 0.9 * g_prev + g
    projected = 0.9 * project(J_prev, g_prev, F_prev) + Pg
    assert (project(J, raw, F) - project(J, projected, F)).norm() > 1e-2


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 8),
    extra=st.integers(0, 30),
    seed=st.integers(0, 10_000),
    scale=st.floats(1e-3, 1e3),
    weighted=st.booleans(),
)
def test_identities(m, extra, seed, scale, weighted):
    n = m + extra
    J, g, c, h = random_problem(m, n, seed)
    J = J * scale
    W = 1.0 / h if weighted else None
    F = factor_gram(gram(J, W), 1e-7)
    v = normal_step(J, c, F, W)
    u = -project(J, g, F, W)
    tol = 1e-9 * (1 + scale)
    # J v = -c to the accuracy of a Gram solve: its error grows like eps·κ(G)·‖c‖ (a square 5×5 Gaussian J, seed
    # 104 and weighted, has κ(G) = 7e7 and a residual of 2.4e-9; hypothesis found it)
    gram_err = 64 * torch.finfo(f64).eps * F.cond.item() * c.abs().max().item()
    torch.testing.assert_close(J @ v, -c, rtol=1e-9, atol=1e-9 + gram_err)
    assert (J @ u).abs().max() <= tol * (1 + g.abs().max())  # J u = 0
    inner = v @ (u / W if weighted else u)  # v ⟂ u in the W^{-1} inner product
    # u's rounding error is eps·κ(G)·‖g‖ in size and has no reason to be orthogonal to v: a square J (u = 0
    # exactly) scaled by 1.5, weighted, seed 8, has κ(G) = 5e5, ‖v‖ = 89, ‖u‖ = 2e-11 and an inner product of
    # 1.1e-8 (hypothesis found it)
    inner_err = 64 * torch.finfo(f64).eps * F.cond.item() * v.norm().item() * (g / W if weighted else g).norm().item()
    assert abs(inner) <= 1e-8 * (1 + v.norm() * u.norm()) + inner_err
    Pg = project(J, g, F, W)
    torch.testing.assert_close(project(J, Pg, F, W), Pg, rtol=1e-9, atol=1e-9)  # P^2 = P


def test_projector_matrix_is_symmetric_idempotent_with_rank_n_minus_m():
    J, *_ = random_problem(5, 12, seed=11)
    F = factor_gram(gram(J), 1e-7)
    P = torch.stack([project(J, e, F) for e in torch.eye(12, dtype=f64)], 1)
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-12)
    assert torch.linalg.matrix_rank(P).item() == 7


def test_rank_deficient_duplicate_rows_exact_mode_gives_least_norm_step():
    J, g, _, _ = random_problem(3, 15, seed=5)
    Jd = torch.cat([J, J[:1]])  # duplicate constraint
    x_feasible = torch.randn(15, dtype=f64)
    c = Jd @ x_feasible  # consistent: the duplicate has the same value
    F = factor_gram(gram(Jd), 1e-7)
    assert F.chol is None and int(F.rank) == 3
    v = normal_step(Jd, c, F)
    v_ref = -np.linalg.lstsq(Jd.numpy(), c.numpy(), rcond=None)[0]  # least-norm solution
    np.testing.assert_allclose(v.numpy(), v_ref, rtol=1e-10, atol=1e-10)
    u = -project(Jd, g, F)
    assert (Jd @ u).abs().max() < 1e-10
    P_ref = np.eye(15) - np.linalg.pinv(Jd.numpy()) @ Jd.numpy()
    np.testing.assert_allclose(u.numpy(), -P_ref @ g.numpy(), rtol=1e-10, atol=1e-10)


def test_rank_deficient_sync_free_mode_matches_truncated_solution():
    J, g, _, _ = random_problem(3, 15, seed=6)
    Jd = torch.cat([J, J[1:2]])
    c = Jd @ torch.randn(15, dtype=f64)
    exact = factor_gram(gram(Jd), 1e-6, sync_free=False)
    smooth = factor_gram(gram(Jd), 1e-6, sync_free=True)
    assert int(smooth.rank) == -1 and torch.isinf(smooth.cond)
    torch.testing.assert_close(normal_step(Jd, c, smooth), normal_step(Jd, c, exact), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(project(Jd, g, smooth), project(Jd, g, exact), rtol=1e-8, atol=1e-8)


def test_ill_conditioned_beyond_rank_tol_is_truncated():
    J, *_ = random_problem(4, 20, seed=9, cond=1e9)  # sigma_min / sigma_max = 1e-9 < rank_tol 1e-7
    F = factor_gram(gram(J), 1e-7)
    assert F.chol is None and int(F.rank) == 3
    J2, _, _, _ = random_problem(4, 20, seed=9, cond=1e4)
    F2 = factor_gram(gram(J2), 1e-7)
    assert F2.chol is not None and int(F2.rank) == 4
    true_cond = float(torch.linalg.cond(gram(J2)))  # ≈ (1e4)^2
    assert true_cond / 10 < float(F2.cond) <= true_cond * (1 + 1e-8)  # a tight lower bound


@pytest.mark.parametrize("m", [1, 4, EXACT_COND_M, EXACT_COND_M + 1, 60])
def test_the_condition_number_is_exact_for_small_m_and_a_lower_bound_beyond(m):
    J, *_ = random_problem(m, 2 * m + 5, seed=m, cond=1e3)
    G = gram(J)
    true_cond = float(torch.linalg.cond(G))  # from the singular values of G
    cond = float(factor_gram(G, 1e-7).cond)
    if m <= EXACT_COND_M:
        assert cond == pytest.approx(true_cond, rel=1e-9)
    else:  # the estimate from the Cholesky factor: below, and within a factor of ten
        assert true_cond / 10 < cond <= true_cond * (1 + 1e-8)
    singular = gram(torch.cat([J, J[:1]]))  # a duplicate row
    F = factor_gram(singular, 1e-7)  # seen as rank-deficient: truncated to the m independent rows
    assert F.chol is None and int(F.rank) == m
    nan = torch.full((m, m), float("nan"), dtype=f64)
    assert torch.isnan(_condition(nan, torch.linalg.cholesky_ex(nan)[0]))


def test_gram_in_chunks_matches_direct(monkeypatch):
    J = torch.randn(7, 1000, dtype=torch.float32)
    w = torch.rand(1000, dtype=torch.float32) + 0.5
    direct = J.double() @ (J.double() * w.double()).T
    monkeypatch.setattr(_linalg, "_GRAM_CHUNK_BYTES", 8 * 7 * 64)  # 64 columns per chunk
    torch.testing.assert_close(gram(J, w), direct, rtol=1e-12, atol=1e-12)
    assert gram(J).dtype == f64


def test_scaled_normal_step_with_per_coordinate_step_sizes():
    J, _, c, _ = random_problem(3, 12, seed=2)
    F = factor_gram(gram(J), 1e-7)
    gamma = torch.cat([torch.full((6,), 0.1, dtype=f64), torch.full((6,), 0.4, dtype=f64)])
    delta, v = scaled_normal_step(J, c, F, gamma, rank_tol=1e-7)
    torch.testing.assert_close(J @ delta, -0.4 * c, rtol=1e-10, atol=1e-10)  # J δ = -γ_max c
    delta_s, _ = scaled_normal_step(J, c, F, 0.25, rank_tol=1e-7)
    torch.testing.assert_close(delta_s, 0.25 * v, rtol=0, atol=0)


def test_empty_constraint_set():
    J = torch.zeros(0, 6, dtype=f64)
    F = factor_gram(gram(J), 1e-7)
    x = torch.randn(6, dtype=f64)
    assert torch.equal(project(J, x, F), x)
    assert torch.equal(normal_step(J, torch.zeros(0, dtype=f64), F), torch.zeros(6, dtype=f64))


@pytest.mark.parametrize("m", [3, 150])
def test_the_workspace_gives_the_factors_of_fresh_matrices_and_keeps_its_buffers(m):
    """The optimizer's reused m x m buffers (from ``MIN_M`` rows on the CPU) hold exactly the matrices and factors
    a fresh allocation gives, step after step; below ``MIN_M`` nothing is kept."""
    from sqpoptim._dense_solver import DenseSolver
    from sqpoptim._jacobian_operator import DenseJacobian
    from sqpoptim._workspace import MIN_M, Workspace

    ws = Workspace()
    nu = torch.tensor(1e-3, dtype=torch.float64)
    pointers = set()
    for seed in range(3):
        J, _, c, _ = random_problem(m, 2 * m + 7, seed, cond=1e3)
        x = torch.randn(J.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        steps = []
        for workspace in (None, ws):
            S = DenseSolver(DenseJacobian(J), rank_tol=1e-7, sync_free=False, workspace=workspace)
            delta, info = S.step(x, c, 0.5, nu)
            steps.append((delta, S.gram.clone(), S.factor.chol.clone(), info["Jdelta"]))
            if workspace is not None:
                pointers.add(S.factor.chol.data_ptr())
        for a, b in zip(*steps):
            assert torch.equal(a, b)
    assert (ws.nbytes > 0) == (m >= MIN_M) and (len(pointers) == 1) == (m >= MIN_M)
