"""OutputConstraints: values, torch.func Jacobians, vjp, Lagrangian Hessians, bounds and validation."""

import math

import pytest
import torch
from layer_cases import F64, loop_jacobian, quadratic_instance

from sqpoptim.layers import OutputConstraints


def _nonlinear():
    h = lambda x, y: torch.stack([torch.sin(y[:, 0] * x[:, 0]) + y[:, 1] ** 2, y.prod(-1) - x[:, 1]], -1)  # noqa: E731
    g = lambda x, y: torch.exp(y[:, :3]) * x[:, :1]  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    return h, g, torch.randn(5, 2, dtype=F64, generator=gen), torch.randn(5, 4, dtype=F64, generator=gen)


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_func_jacobians_match_row_loop(mode):
    h, g, x, y = _nonlinear()
    ev = OutputConstraints(h=h, g=g, jac_mode=mode).evaluate(x, y)
    torch.testing.assert_close(ev.h, h(x, y), rtol=0, atol=1e-15)
    torch.testing.assert_close(ev.h_jac, loop_jacobian(h, x, y), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ev.g_jac, loop_jacobian(g, x, y), rtol=1e-12, atol=1e-13)
    assert ev.c.shape == (5, 5) and ev.c_jac.shape == (5, 5, 4)


def test_chunked_jacobian_and_no_input():
    h = lambda x, y: torch.stack([y[:, 0] * y[:, 1], y.sum(-1), y[:, 2] ** 3], -1)  # noqa: E731
    y = torch.randn(3, 4, dtype=F64)
    ev = OutputConstraints(h=h, jac_chunk_size=2).evaluate(None, y)
    torch.testing.assert_close(ev.h_jac, loop_jacobian(h, None, y), rtol=1e-12, atol=1e-14)


def test_user_jacobian_tensor_or_pair():
    h, h_jac, x, _, y = quadratic_instance()
    J = loop_jacobian(h, x, y)
    for jac in (h_jac, lambda x, y: h_jac(x, y)[1]):
        ev = OutputConstraints(h=h, h_jac=jac).evaluate(x, y)
        torch.testing.assert_close(ev.h_jac, J, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ev.h, h(x, y), rtol=1e-12, atol=1e-12)


def test_vjp_matches_jacobian_transpose():
    h, g, x, y = _nonlinear()
    wh, wg = torch.randn(5, 2, dtype=F64), torch.randn(5, 3, dtype=F64)
    cons = OutputConstraints(h=h, g=g)
    hv, gv, jty = cons.vjp(x, y, wh, wg)
    expected = torch.einsum("bmn,bm->bn", loop_jacobian(h, x, y), wh) + torch.einsum(
        "bqn,bq->bn", loop_jacobian(g, x, y), wg
    )
    torch.testing.assert_close(jty, expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(hv, h(x, y))
    torch.testing.assert_close(gv, g(x, y))


def test_lagrangian_hessian_matches_autograd_hessian():
    h, g, x, y = _nonlinear()
    wh, wg = torch.randn(5, 2, dtype=F64), torch.randn(5, 3, dtype=F64)
    H = OutputConstraints(h=h, g=g).lagrangian_hessian(x, y, wh, wg)
    for b in range(5):

        def lag(yb, b=b):
            return (h(x[b : b + 1], yb[None])[0] * wh[b]).sum() + (g(x[b : b + 1], yb[None])[0] * wg[b]).sum()

        torch.testing.assert_close(H[b], torch.autograd.functional.hessian(lag, y[b]), rtol=1e-12, atol=1e-12)


def test_bounds_and_residual_with_infinite_sides():
    g = lambda x, y: y  # noqa: E731
    cons = OutputConstraints(g=g, lower=torch.tensor([-1.0, -math.inf, 0.0]), upper=torch.tensor([1.0, 2.0, math.inf]))
    y = torch.tensor([[2.0, -5.0, -3.0], [0.5, 3.0, 7.0]], dtype=F64)
    ev = cons.evaluate(None, y, jacobian=False)
    r = cons.residual(ev, *cons.bounds(None, ev.g))
    torch.testing.assert_close(r, torch.tensor([[1.0, 0.0, -3.0], [0.0, 1.0, 0.0]], dtype=F64))
    torch.testing.assert_close(cons.violation(None, y), torch.tensor([3.0, 1.0], dtype=F64))
    # Default with g and no bounds: g <= 0; callable bounds get x.
    assert float(OutputConstraints(g=g).violation(None, y)[1]) == 7.0
    cb = OutputConstraints(g=g, upper=lambda x: x)
    assert cb.bounds(torch.ones(2, 3, dtype=F64), ev.g)[1].shape == (2, 3)


def test_validation_errors():
    y = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="at least one"):
        OutputConstraints()
    with pytest.raises(ValueError, match="without inequality"):
        OutputConstraints(h=lambda x, y: y, upper=1.0)
    with pytest.raises(ValueError, match="jac_mode"):
        OutputConstraints(h=lambda x, y: y, jac_mode="central")
    with pytest.raises(TypeError, match="callable"):
        OutputConstraints(h=3)
    with pytest.raises(ValueError, match=r"\[B, rows\]"):
        OutputConstraints(h=lambda x, y: y.sum(-1)).evaluate(None, y, jacobian=False)
    with pytest.raises(ValueError, match=r"\[B, rows\]"):
        OutputConstraints(h=lambda x, y: y.sum(-1)).evaluate(None, y)
    with pytest.raises(ValueError, match=r"\[B, rows\]"):
        OutputConstraints(h=lambda x, y: y[:2]).evaluate(None, y, jacobian=False)
    with pytest.raises(TypeError, match="float32"):
        OutputConstraints(h=lambda x, y: y.float()).evaluate(None, y, jacobian=False)
    with pytest.raises(ValueError, match="h_jac"):
        OutputConstraints(h=lambda x, y: y, h_jac=lambda x, y: y).evaluate(None, y)
    with pytest.raises(ValueError, match="broadcast"):
        cons = OutputConstraints(g=lambda x, y: y, upper=torch.zeros(3))
        cons.bounds(None, y)
