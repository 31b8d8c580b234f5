"""What ``step`` returns and reports: the values of the point the parameters are at after a rejection, the same
diagnostics keys on every step, statistics fed once per fresh gradient, and Lagrange multiplier estimates."""

import copy

import pytest
import torch

import sqpoptim

from .helpers import f64
from .optimizers import factories

DAMPED = factories("sqp-adam", "sqp-hb", "sqp", "adam-con")


def _atan(x):
    # from x0 = 2 the Gauss-Newton step for atan(x0) = 0 overshoots (2 -> -3.54 -> 13.9 ...): rejections
    return lambda: (0.5 * (x[1] - 1.0) ** 2, torch.atan(x[:1]))


def _run_until_a_rejection(name, sync_free):
    x = torch.tensor([2.0, 0.0], dtype=f64, requires_grad=True)
    opt = DAMPED[name]([x], lr=0.05, normal_damping=1e-6, sync_free=sync_free)
    history = []
    for _ in range(12):
        point = x.detach().clone()
        state = copy.deepcopy(opt.state_dict())
        loss, c = opt.step(_atan(x))
        history.append((point, state, loss.clone(), c.clone(), opt.diagnostics(), x.detach().clone()))
        if history[-1][4]["rejected"]:
            return x, opt, history
    raise AssertionError("no step was rejected")


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("name", list(DAMPED))
def test_a_rejected_step_returns_the_values_of_the_point_the_parameters_go_back_to(name, sync_free):
    _, _, history = _run_until_a_rejection(name, sync_free)
    accepted_point, _, _, _, _, _ = history[-2]  # the rejected step was taken from here
    _, _, loss, c, diag, after = history[-1]
    assert torch.equal(after, accepted_point)  # moved back ...
    assert loss.item() == pytest.approx(0.5 * (accepted_point[1].item() - 1.0) ** 2, rel=1e-14)  # ... and says so
    assert c.item() == pytest.approx(torch.atan(accepted_point[0]).item(), rel=1e-14)
    assert diag["c_inf"] == pytest.approx(abs(c.item()), rel=1e-14)
    assert diag["v_norm"] == 0.0 and diag["u_norm"] == 0.0 and diag["rejected_steps"] >= 1


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("name", list(DAMPED))
def test_diagnostics_have_the_same_keys_on_every_step(name, sync_free):
    x = torch.tensor([2.0, 0.0], dtype=f64, requires_grad=True)
    opt = DAMPED[name]([x], lr=0.05, normal_damping=1e-6, sync_free=sync_free)
    keys, rejected = set(), 0
    for _ in range(30):
        opt.step(_atan(x))
        diag = opt.diagnostics()
        keys.add(frozenset(diag))
        rejected += bool(diag["rejected"])
    assert rejected >= 3 and len(keys) == 1
    assert {"c_inf", "v_norm", "u_norm", "rank", "gram_cond", "g_norm", "step_norm", "damping"} <= next(iter(keys))


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("name", ["sqp-adam", "sqp-hb", "adam-con"])
def test_the_retry_after_a_rejection_does_not_feed_the_statistics_again(name, sync_free):
    # the rejected step fed the moments with g(x_k); the retry from the same x_k must not feed them g(x_k) again
    x, opt, history = _run_until_a_rejection(name, sync_free)
    state_after_rejected_step = history[-1][1]  # the state saved just before the rejecting call
    opt.step(_atan(x))  # the retry, from the same point, with the escalated damping
    sd = opt.state_dict()
    for key, value in state_after_rejected_step["state"][0].items():
        assert torch.equal(sd["state"][0][key], value), key
    assert torch.equal(sd["state"]["global"]["step"], state_after_rejected_step["state"]["global"]["step"])
    assert not opt.diagnostics()["rejected"]


@pytest.mark.parametrize("name", ["sqp-adam", "sqp-hb", "sqp", "sqp-adaptive", "adam-con"])
def test_multipliers_are_the_least_squares_estimates(name):
    torch.manual_seed(0)
    A = torch.randn(3, 8, dtype=f64)
    x = torch.randn(8, dtype=f64, requires_grad=True)
    make = {
        **DAMPED,
        "sqp-adaptive": lambda p, **kw: sqpoptim.StochasticSQP(p, step_rule="adaptive", lipschitz=(2, 1), **kw),
    }[name]
    opt = make([x], lr=0.1)
    x0 = x.detach().clone()
    assert opt.multipliers is None
    opt.step(lambda: (((x - 1) ** 4).sum(), torch.tanh(A @ x) - 0.1))
    g = 4 * (x0 - 1) ** 3
    J = (1 - torch.tanh(A @ x0) ** 2).unsqueeze(1) * A
    # argmin ‖g + Jᵀλ‖; Adam(con) forms no Euclidean Gram matrix and estimates λ in its own metric W = D⁻¹
    # (after one step with standard bias correction D = sqrt(g² + ε)): argmin ‖W^½(g + Jᵀλ)‖
    root_w = (g**2 + 1e-7) ** -0.25 if name == "adam-con" else torch.ones_like(g)
    oracle = torch.linalg.lstsq((root_w.unsqueeze(1) * J.T), -(root_w * g).unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(opt.multipliers, oracle, rtol=1e-10, atol=1e-12)


def test_multipliers_at_a_solution_are_the_sensitivity_of_the_optimal_loss():
    # min ‖x - a‖² s.t. Bx = b + ε: d f*/dε_i = -λ_i. Checked by central differences of the closed-form optimum
    torch.manual_seed(1)
    B, b, a = torch.randn(2, 5, dtype=f64), torch.randn(2, dtype=f64), torch.randn(5, dtype=f64)
    x = torch.zeros(5, dtype=f64, requires_grad=True)
    opt = sqpoptim.ProjectedHeavyBallSQP([x], lr=0.2, momentum=0.0)
    for _ in range(200):
        opt.step(lambda: (((x - a) ** 2).sum(), B @ x - b))

    def optimum(eps):
        y = torch.linalg.solve(B @ B.T, B @ a - (b + eps))
        return ((B.T @ y) ** 2).sum()  # x* = a - Bᵀy, f* = ‖Bᵀy‖²

    h = 1e-6
    fd = torch.stack([(optimum(h * e) - optimum(-h * e)) / (2 * h) for e in torch.eye(2, dtype=f64)])
    torch.testing.assert_close(-opt.multipliers, fd, rtol=1e-6, atol=1e-8)
