"""EnforceProjection(method="line_search"): the NP step shortened per sample, against the paper's full steps."""

import pytest
import torch
from layer_cases import F64, quadratic_instance

from sqpoptim.layers import EnforceProjection, OutputConstraints, _gauss_newton, adanp, np_step
from sqpoptim.layers._np_line_search import quartic_model_step


def _phi(c, q, t):
    return ((1 - t)[..., None] * c + (t**2)[..., None] * q).square().sum(-1)


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_quartic_model_step_is_the_minimiser_on_the_unit_interval(scale):
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(300, 5, dtype=F64, generator=gen)
    q = scale * torch.randn(300, 5, dtype=F64, generator=gen)
    q[:100] = -scale * c[:100] + 1e-2 * torch.randn(100, 5, dtype=F64, generator=gen)  # near double roots
    t = quartic_model_step(c, q)
    assert bool(((t > 0) & (t <= 1)).all())
    grid = torch.linspace(0, 1, 20_001, dtype=F64)[1:]
    best = torch.stack([_phi(c, q, g.expand(300)) for g in grid.split(1)], -1).amin(-1)  # [300]
    assert bool((_phi(c, q, t) <= best * (1 + 1e-12)).all())
    # No quadratic term: the full step is exact. A non-finite one: half the step.
    special = quartic_model_step(torch.ones(2, 3, dtype=F64), torch.tensor([[0.0] * 3, [float("nan")] * 3], dtype=F64))
    assert special.tolist() == [1.0, 0.5]


def test_the_model_is_exact_for_quadratic_constraints():
    h, h_jac, x, _, y_hat = quadratic_instance(B=5, n=8, m=4, noise=2.0)
    y1 = np_step(y_hat, *h_jac(x, y_hat))[0]
    d, c, q = y1 - y_hat, h(x, y_hat), h(x, y1)
    for t in (0.1, 0.37, 0.9):
        torch.testing.assert_close(h(x, y_hat + t * d), (1 - t) * c + t**2 * q, rtol=1e-12, atol=1e-12)


def _separable(B=5, n=6, seed=0):
    """h(x, y) = (R y)^2 - x^2 (elementwise, R orthogonal) from R y small and positive: the root R^T x is the one
    both iterations reach (each coordinate of R y is Newton's iteration on z^2 = x^2 from z > 0)."""
    gen = torch.Generator().manual_seed(seed)
    R = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=gen))[0]
    x = 1 + torch.rand(B, n, dtype=F64, generator=gen)

    def h_jac(x, y):
        z = y @ R.T
        return z * z - x**2, 2 * z[:, :, None] * R

    y_hat = (0.05 + 0.1 * torch.rand(B, n, dtype=F64, generator=gen)) @ R
    return OutputConstraints(h=lambda x, y: h_jac(x, y)[0], h_jac=h_jac), x, y_hat, x @ R


class _CountTrials:
    """Wraps the line search in :mod:`._gauss_newton` to record how many trials each search evaluated."""

    def __init__(self, monkeypatch):
        self.trials, search = [], _gauss_newton.np_line_search

        def counting(trial, c0, full, start):
            calls = [0]

            def counted(t, rows):
                calls[0] += 1
                return trial(t, rows)

            out = search(counted, c0, full, start)
            self.trials.append(calls[0])
            return out

        monkeypatch.setattr(_gauss_newton, "np_line_search", counting)


def test_far_start_fewer_steps_to_the_same_root(monkeypatch):
    cons, x, y_hat, root = _separable()
    paper = EnforceProjection(cons, eval_tol=1e-10, method="paper").eval().project(x, y_hat)
    count = _CountTrials(monkeypatch)
    ls = EnforceProjection(cons, eval_tol=1e-10, method="line_search").eval().project(x, y_hat)
    for res in (paper, ls):
        assert bool(res.converged.all()) and float(cons.h(x, res.y).abs().max()) <= 1e-10
        torch.testing.assert_close(res.y, root, rtol=0, atol=1e-10)
    # Measured: the paper's first step overshoots (NP from z ~ 0.1 towards z ~ 1.5 lands near 10) and six more
    # halve the excess; the exact quadratic model's step lands near the root instead.
    assert (ls.iterations, paper.iterations) == (6, 9)
    assert max(count.trials) == 1  # the model is exact here: its step always passed the test


def test_near_start_takes_the_papers_steps():
    h, h_jac, x, _, y_hat = quadratic_instance(B=6, n=8, m=4, noise=0.1)
    cons = OutputConstraints(h=h, h_jac=h_jac)
    paper = EnforceProjection(cons, eval_tol=1e-10, method="paper").eval().project(x, y_hat)
    ls = EnforceProjection(cons, eval_tol=1e-10, method="line_search").eval().project(x, y_hat)
    # Every full step decreases |h| here, so no step is shortened: the same iterates, bit for bit.
    assert ls.iterations == paper.iterations
    torch.testing.assert_close(ls.y, paper.y, rtol=0, atol=0)


def _sine(x, y):
    return torch.sin(3 * y) + 3.5 * y - x  # each row monotone in its y (derivative >= 0.5): one root


def test_sine_constraints_converge_and_never_increase_the_residual(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = 4 * torch.rand(16, 3, dtype=F64, generator=gen) - 2
    y_hat = 3 * torch.randn(16, 3, dtype=F64, generator=gen)
    cons = OutputConstraints(h=_sine)
    norms = {}
    for ls in (False, True):
        trajectory = [_sine(x, y_hat).norm(dim=-1)]
        for k in range(1, 13):  # the iteration is deterministic: depth k gives its k-th iterate
            res = adanp(cons, x, y_hat, tol=1e-10, max_depth=k, jacobian="exact", line_search=ls)
            trajectory.append(_sine(x, res.y).norm(dim=-1))
        norms[ls] = torch.stack(trajectory)  # [13, 16]
    assert bool((norms[True][1:] <= norms[True][:-1]).all())  # per sample, step by step
    assert bool((norms[False][1:] > norms[False][:-1]).any())  # the paper's steps do increase it here
    count = _CountTrials(monkeypatch)
    ls = adanp(cons, x, y_hat, tol=1e-10, jacobian="exact", line_search=True)
    paper = adanp(cons, x, y_hat, tol=1e-10, jacobian="exact")
    assert bool(ls.converged.all()) and float(_sine(x, ls.y).abs().max()) <= 1e-10
    assert max(count.trials) >= 2  # the quartic model is not exact for sin: some of its steps were halved
    assert ls.iterations < paper.iterations  # measured 9 against 38
    torch.testing.assert_close(ls.y, paper.y, rtol=0, atol=1e-9)  # the same (unique) root per coordinate


def test_implicit_backward_is_the_projector_at_the_output():
    # The backward differentiates at the output, whichever path led there: the paper's layer started at the
    # line search's output takes no step and must give the same vector-Jacobian products.
    cons, x, y_hat, _ = _separable(B=4, n=5, seed=1)
    w = torch.randn(y_hat.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    grads = []
    for method, start in (("line_search", y_hat), ("paper", None)):
        layer = EnforceProjection(cons, eval_tol=1e-11, method=method).eval()
        xx = x.clone().requires_grad_()
        yy = (start if start is not None else grads[0][0]).clone().requires_grad_()
        out = layer(xx, yy)
        grads.append((out.detach(), *torch.autograd.grad((out * w).sum(), (xx, yy))))
    assert EnforceProjection(cons, eval_tol=1e-11).eval().project(x, grads[0][0]).iterations == 0
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_implicit_from_an_infeasible_input():
    # Off the constraint set the implicit gradient is the projector at the output; for constraints affine in
    # y with a constant Jacobian (h = A y - sin x) that is the exact derivative whatever steps were taken.
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(2, 4, dtype=F64, generator=gen)
    h = lambda x, y: y @ A.T - torch.sin(x)  # noqa: E731
    layer = EnforceProjection(h, eval_tol=1e-12, method="line_search").eval()
    x = torch.randn(3, 2, dtype=F64, generator=gen).requires_grad_()
    y = (5 * torch.randn(3, 4, dtype=F64, generator=gen)).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x, y))
