"""The implicit gradient of ENFORCE/HardNet++: the limit of the powers of the step Jacobian, in closed form."""

import pytest
import torch
from layer_cases import F64

from sqpoptim.layers._implicit import limit_vjp


def _case(B=3, k=4, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(B, k, n, dtype=F64, generator=gen)
    active = torch.tensor([[True, True, False, True], [True, False, False, True], [True, True, True, True]])
    grad = torch.randn(B, n, dtype=F64, generator=gen)
    return J, active[:B], grad


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_limit_vjp_is_the_limit_of_the_step_jacobian_powers(eps):
    """Oracle: the step Jacobian at a feasible point raised to a high power. ε > 0 (HardNet++'s paper step):
    I - H⁻¹ J_aᵀ J_a with H = J_cᵀJ_c + εI. ε = 0 (Levenberg–Marquardt steps with damping ν, NP steps for
    ν = 0): I - J_aᵀ (J_a J_aᵀ + νI)⁻¹ J_a, whose limit does not depend on ν."""
    J, active, grad = _case()
    eye = torch.eye(J.shape[-1], dtype=F64)
    Ja = J * active[..., None]
    if eps:
        step = eye - torch.linalg.solve(J.mT @ J + eps * eye, Ja.mT @ Ja)  # [B, n, n]
    else:
        G = Ja @ Ja.mT + 0.5 * torch.eye(J.shape[1], dtype=F64)
        step = eye - Ja.mT @ torch.linalg.solve(G, Ja)
    limit = torch.linalg.matrix_power(step, 4096)
    _, grad_y_hat = limit_vjp(J, active, grad, eps)
    torch.testing.assert_close(grad_y_hat, (limit.mT @ grad[..., None])[..., 0], rtol=1e-9, atol=1e-9)


def test_limit_vjp_annihilates_the_active_normals_and_keeps_the_tangent():
    J, active, _ = _case()
    Ja = J * active[..., None]
    # A cotangent in the row space of J_a is mapped to 0 by the orthogonal projector; one orthogonal to it is kept.
    coeffs = torch.randn(J.shape[0], J.shape[1], dtype=F64)
    normal = torch.einsum("bkn,bk->bn", Ja, coeffs)
    _, out = limit_vjp(J, active, normal, 0.0)
    assert float(out.abs().max()) <= 1e-12
    Q, _ = torch.linalg.qr(Ja.mT)  # [B, n, k]: spans the active normals (and zeros)
    tangent = torch.randn_like(normal)
    tangent = tangent - (Q @ (Q.mT @ tangent[..., None]))[..., 0]
    torch.testing.assert_close(limit_vjp(J, active, tangent, 0.0)[1], tangent, rtol=0, atol=1e-12)


def test_limit_vjp_for_equalities_factors_in_place_with_the_masked_results():
    """``active=None`` (every row active: ENFORCE's equalities) takes the in-place Gram factor of
    :func:`gram_cholesky_`; oracle: the masked path with every row marked active, and the step-power limit."""
    J, _, grad = _case()
    everything = torch.ones(J.shape[:2], dtype=torch.bool)
    v, out = limit_vjp(J, None, grad, 0.0)
    v_ref, out_ref = limit_vjp(J, everything, grad, 0.0)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    eye = torch.eye(J.shape[-1], dtype=F64)
    step = eye - J.mT @ torch.linalg.solve(J @ J.mT + 0.5 * torch.eye(J.shape[1], dtype=F64), J)
    limit = torch.linalg.matrix_power(step, 4096)
    torch.testing.assert_close(out, (limit.mT @ grad[..., None])[..., 0], rtol=1e-9, atol=1e-9)
    # HardNet++'s damped form with every row active: the same as an all-True mask.
    torch.testing.assert_close(limit_vjp(J, None, grad, 0.3)[1], limit_vjp(J, everything, grad, 0.3)[1])
