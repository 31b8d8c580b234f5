"""EnforceProjection(mixed_precision=True): float32 NP steps with float64 refinement against the float64 layer."""

import pytest
import torch
from layer_cases import F64, quadratic_instance

from sqpoptim.layers import EnforceProjection, OutputConstraints

EPS32 = torch.finfo(torch.float32).eps


def _instance(B=12, n=40, m=25, noise=0.1, seed=0):
    h, h_jac, x, y_star, y_hat = quadratic_instance(B=B, n=n, m=m, noise=noise, seed=seed)
    return h, OutputConstraints(h=h, h_jac=h_jac), x, y_star, y_hat


@pytest.mark.parametrize("method", ["paper", "line_search"])
@pytest.mark.parametrize("noise", [0.1, 0.5, 2.0])
def test_reaches_float64_tolerance_and_the_float64_projection(noise, method):
    h, cons, x, _, y_hat = _instance(noise=noise)
    mixed = EnforceProjection(cons, eval_tol=1e-10, mixed_precision=True, method=method).eval().project(x, y_hat)
    plain = EnforceProjection(cons, eval_tol=1e-10, method=method).eval().project(x, y_hat)
    assert mixed.y.dtype == F64 and bool(mixed.converged.all())
    assert float(h(x, mixed.y).abs().max()) <= 1e-10  # evaluated independently, in float64
    torch.testing.assert_close(mixed.residual, h(x, mixed.y).abs().amax(-1), rtol=0, atol=1e-14)
    # Both end on the constraint set; the float32 steps move the end point by the steps' rounding only.
    gap = float((mixed.y - plain.y).abs().max())
    assert gap <= 1e3 * EPS32 * float(y_hat.abs().max()), gap


def test_benchmark_size_reaches_1e_8():
    # The benchmark's shape (200 outputs, 150 quadratic rows): float32 alone stalls near 1e-5 here.
    h, cons, x, _, y_hat = _instance(B=6, n=200, m=150, noise=0.1, seed=1)
    res = EnforceProjection(cons, eval_tol=1e-8, mixed_precision=True).eval().project(x, y_hat)
    assert float(h(x, res.y).abs().max()) <= 1e-8
    f32 = EnforceProjection(cons, eval_tol=1e-8, solve_dtype=torch.float32, max_depth=8, nonconvergence="ignore")
    assert float(h(x, f32.eval().project(x, y_hat).y.double()).abs().max()) > 1e-8  # the oracle needs float64


def test_training_mode_meets_the_mean_tolerance_in_float64_terms():
    h, cons, x, _, y_hat = _instance(noise=0.5)
    layer = EnforceProjection(cons, mixed_precision=True).train()
    res = layer.project(x, y_hat)
    assert res.iterations > 0
    # The stopping test reads float32 values of c, which rounding y alone can move by up to the floor
    # eps_32 max_i |B_i| |y| (the module's estimate): the float64 mean is within that of the tolerance.
    _, B = cons.h_jac(x, res.y)
    floor = EPS32 * torch.linalg.vector_norm(B, dim=-1).amax(-1) * torch.linalg.vector_norm(res.y, dim=-1)
    assert float(h(x, res.y).abs().mean()) <= layer.train_tol + float(floor.max())


def _vjp(layer, x, y_in, w):
    xx, yy = x.clone().requires_grad_(), y_in.clone().requires_grad_()
    out = layer(xx, yy)
    gx, gy = torch.autograd.grad((out * w).sum(), (xx, yy))
    return out.detach(), gx, gy


@pytest.mark.parametrize("precision", [True, "bfloat16"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_implicit_backward_matches_the_float64_backward_at_the_output(mode, precision):
    _, cons, x, _, y_hat = _instance(noise=0.3)
    if precision == "bfloat16":  # from raw outputs near 0, where the bfloat16 phase takes steps
        y_hat = 0.05 * torch.randn(y_hat.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(y_hat.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    mixed = EnforceProjection(cons, mixed_precision=precision).train(mode == "train")
    y_m, gx_m, gy_m = _vjp(mixed, x, y_hat, w)
    # The float64 layer started at the mixed output takes no step there (it meets the same tolerance), so its
    # backward is the float64 projector at that very point: the oracle for the mixed backward.
    plain = EnforceProjection(cons).train(mode == "train")
    assert plain.project(x, y_m).iterations == 0
    y_p, gx_p, gy_p = _vjp(plain, x, y_m, w)
    torch.testing.assert_close(y_p, y_m, rtol=0, atol=0)
    # Training ends in float32: the backward solves with the float32 B and Gram factor, whose forward error is
    # bounded by m kappa(BB^T) eps_32 per sample (the textbook bound of a Cholesky solve, constant 1; measured
    # 2e-5..8e-5 here at kappa 37..177). Evaluation ends in phase 2 and evaluates B in float64: the float64 formula.
    _, B = cons.h_jac(x, y_m)
    eig = torch.linalg.eigvalsh(B @ B.mT)
    bound = B.shape[1] * (eig[:, -1] / eig[:, 0]) * EPS32 if mode == "train" else torch.full_like(eig[:, 0], 1e-10)
    assert float((gy_m - gy_p).abs().max()) > 0 or mode == "eval"
    assert bool(((gy_m - gy_p).abs().amax(-1) <= bound * gy_p.abs().amax(-1)).all())
    assert bool(((gx_m - gx_p).abs().amax(-1) <= bound * gx_p.abs().amax(-1)).all())


def test_ill_conditioned_rows_fall_back_to_float64_steps():
    # Two nearly parallel rows: kappa(J J^T) ~ 1e10 is beyond a float32 factor; the sample must still converge.
    gen = torch.Generator().manual_seed(5)
    n = 10
    a = torch.randn(3, n, dtype=F64, generator=gen)
    a[1] = a[0] + 1e-5 * torch.randn(n, dtype=F64, generator=gen)

    def h_jac(x, y):
        aa = a.to(y)
        J = aa + 0.1 * y[:, None, :]  # h_i = a_i.y + 0.05 |y|^2 - x_i
        return y @ aa.T + 0.05 * (y * y).sum(-1, keepdim=True) - x.to(y), J

    def h(x, y):
        return h_jac(x, y)[0]

    y_star = torch.randn(4, n, dtype=F64, generator=gen)
    x = h(torch.zeros(4, 3, dtype=F64), y_star)
    y_hat = y_star + 0.05 * torch.randn(4, n, dtype=F64, generator=gen)
    res = EnforceProjection(OutputConstraints(h=h, h_jac=h_jac), eval_tol=1e-9, mixed_precision=True)
    out = res.eval().project(x, y_hat)
    assert bool(out.regularized.any())  # float32 factors of this Gram matrix are rank-deficient
    assert float(h(x, out.y).abs().max()) <= 1e-9 and bool(out.converged.all())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gradient": "unrolled", "jacobian": "exact"},
        {"solve_dtype": torch.float32},
        {"jacobian": "broyden"},
    ],
)
def test_refuses_settings_it_cannot_honour(kwargs):
    _, cons, *_ = _instance()
    with pytest.raises(ValueError, match="mixed_precision"):
        EnforceProjection(cons, mixed_precision=True, **kwargs)


def test_line_search_in_float32_steps_from_a_far_start():
    # h = (R y)^2 - x^2 from R y ~ 0.1 (root R^T x): the float32 NP steps are shortened as the float64 ones are.
    gen = torch.Generator().manual_seed(0)
    n = 6
    R = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=gen))[0]
    x = 1 + torch.rand(5, n, dtype=F64, generator=gen)

    def h_jac(x, y):
        z = y @ R.T.to(y)
        return z * z - x.to(y) ** 2, 2 * z[:, :, None] * R.to(y)

    cons = OutputConstraints(h=lambda x, y: h_jac(x, y)[0], h_jac=h_jac)
    y_hat = (0.05 + 0.1 * torch.rand(5, n, dtype=F64, generator=gen)) @ R
    runs = {
        method: EnforceProjection(cons, eval_tol=1e-10, mixed_precision=True, method=method).eval().project(x, y_hat)
        for method in ("paper", "line_search")
    }
    for res in runs.values():
        assert bool(res.converged.all()) and float(cons.h(x, res.y).abs().max()) <= 1e-10
        torch.testing.assert_close(res.y, x @ R, rtol=0, atol=1e-9)
    # Measured on the same input: the float64 iterations take 6 and 9 steps (test_layers_enforce_line_search).
    assert runs["line_search"].iterations < runs["paper"].iterations


@pytest.mark.parametrize("feasible", [4, 7])  # of 12: the whole batch steps (8 active), a sub-batch steps (5)
def test_samples_at_the_solution_stay_put_while_the_others_step(feasible):
    # Phase 1 steps the whole batch while at least half of it is active, the others with a zero right-hand side;
    # with fewer active samples it steps those alone. Either way a sample already feasible must not move, and the
    # others must end where the float64 layer ends (to the float32 steps' rounding).
    h, cons, x, y_star, y_hat = _instance(B=12, n=60, m=50, noise=0.1, seed=2)
    y_in = torch.cat([y_star[:feasible], y_hat[feasible:]])
    assert float(h(x[:feasible], y_in[:feasible]).abs().max()) <= 1e-12
    mixed = EnforceProjection(cons, eval_tol=1e-10, mixed_precision=True).eval().project(x, y_in)
    plain = EnforceProjection(cons, eval_tol=1e-10).eval().project(x, y_in)
    assert bool(mixed.converged.all()) and float(h(x, mixed.y).abs().max()) <= 1e-10
    assert torch.equal(mixed.y[:feasible], y_in[:feasible])
    gap = float((mixed.y - plain.y).abs().max())
    assert gap <= 1e3 * EPS32 * float(y_in.abs().max()), gap
    assert mixed.iterations >= 3  # the others took float32 steps and refinements


def test_phase_two_chord_is_the_step_jacobian_with_its_row_patches_in_order():
    """The phase-2 Jacobian is assembled from the last whole-batch step's B and the sub-batch rows written over
    it, only when phase 2 runs; the caller's tensor is left as it was."""
    from sqpoptim.layers._mixed_np import _patched

    gen = torch.Generator().manual_seed(0)
    J = torch.randn(6, 3, 4, generator=gen)
    before = J.clone()
    first, second = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    out = _patched(J, [(torch.tensor([1, 4]), first), (torch.tensor([4, 5]), second)])
    expected = before.clone()
    expected[[1, 4]] = first
    expected[[4, 5]] = second  # the later patch wins on row 4
    assert torch.equal(out, expected) and torch.equal(J, before)
    assert _patched(J, []) is J
