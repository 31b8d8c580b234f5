"""What a careless or hostile caller gets: honest errors at the step where something went wrong, and never a
non-finite value written into the parameters or the optimizer's state (exact and sync-free modes)."""

import math
import warnings

import pytest
import torch

import sqpoptim

from .helpers import TinyPINN, burgers_residual, f64
from .optimizers import PROJECTED_SQP, factories

X = torch.rand(32, 2, dtype=f64, generator=torch.Generator().manual_seed(3))
Y = torch.cos(2 * X[:, :1])
PTS = torch.tensor([[0.2, 0.3], [0.6, 0.4], [0.8, 0.9]], dtype=f64)

SQP = factories(*PROJECTED_SQP[:4], "sqp-adaptive-given-L", "adam-con")


def _state_tensors(opt):
    """Every tensor of the state, but the count of refused steps (which counts the refusal itself)."""
    sd = opt.state_dict()["state"]
    sd = {k: ({n: t for n, t in v.items() if n != "nonfinite_steps"} if k == "global" else v) for k, v in sd.items()}
    out = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.append(v.clone())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(sd)
    return out


def _all_finite(opt, params):
    return all(torch.isfinite(p).all() for p in params) and all(torch.isfinite(t).all() for t in _state_tensors(opt))


# ---------------------------------------------------------------------------------------------- zero rows


@pytest.mark.parametrize("name", list(SQP))
def test_zero_jacobian_row_of_an_infeasible_constraint_never_writes_nan_in_sync_free_mode(name):
    # c = x0² + 1 is infeasible; at x0 = 0 its Jacobian row is zero and the Gram matrix singular
    x = torch.zeros(3, dtype=f64, requires_grad=True)
    opt = SQP[name]([x], sync_free=True)
    closure = lambda: (((x - 2) ** 2).sum(), x[:1] ** 2 + 1)  # noqa: E731
    before = _state_tensors(opt)
    opt.step(closure)  # no host read: the refusal is a masked no-op ...
    assert torch.equal(x.detach(), torch.zeros(3, dtype=f64))
    assert _all_finite(opt, [x]) and len(_state_tensors(opt)) >= len(before)
    with pytest.raises(FloatingPointError, match="all-zero rows of unsatisfied constraints"):
        opt.check_finite()  # ... reported truthfully


@pytest.mark.parametrize("name", list(SQP))
def test_zero_jacobian_row_of_an_infeasible_constraint_is_diagnosed_in_exact_mode(name):
    x = torch.zeros(3, dtype=f64, requires_grad=True)
    opt = SQP[name]([x])
    with pytest.raises(
        ValueError, match=r"cannot be reduced from this point.*c = \[1\].*stationary here: an infeasible constraint"
    ):
        opt.step(lambda: (((x - 2) ** 2).sum(), x[:1] ** 2 + 1))
    assert torch.equal(x.detach(), torch.zeros(3, dtype=f64)) and opt.global_state.step is None


def test_a_constraint_that_does_not_depend_on_the_parameters_is_offered_as_a_cause():
    x = torch.zeros(3, dtype=f64, requires_grad=True)
    opt = sqpoptim.ProjectedAdamSQP([x])
    y = torch.ones(1, dtype=f64, requires_grad=True)  # a leaf that is not a parameter of the optimizer
    with pytest.raises(ValueError, match=r"constraint\(s\) \[1\].*c = \[2\].*do not depend on the parameters at all"):
        opt.step(lambda: (((x - 2) ** 2).sum(), torch.cat([x[:1] - 1, y * 2])))
    assert torch.equal(x.detach(), torch.zeros(3, dtype=f64))


@pytest.mark.parametrize("damping", [None, 1e-3], ids=["undamped", "damped"])
def test_a_zero_row_of_a_satisfied_constraint_is_not_an_error(damping):
    # c = x0² at x0 = 0 holds; its row is zero there: dropped from the linearisation like a dependent row
    x = torch.tensor([0.0, 1.0, -1.0], dtype=f64, requires_grad=True)
    opt = sqpoptim.ProjectedHeavyBallSQP([x], lr=0.1, normal_damping=damping)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sqpoptim.RankDeficiencyWarning)
        for _ in range(3 if damping is None else 10):  # damped: ν falls by 3 per step on the linear row
            opt.step(lambda: (((x - 2) ** 2).sum(), torch.stack([x[0] ** 2, x[1] + x[2] - 1])))
    assert torch.isfinite(x).all() and abs((x[1] + x[2]).item() - 1) < 1e-12


def test_a_zero_row_after_a_large_step_names_the_step():
    # from w = -3 the Gauss-Newton step for tanh(w) = 0.9 is 1.9 / 0.0099 = 192: tanh saturates to 1.0 exactly,
    # its derivative to 0. The error names the optimizer's step instead of blaming the constraint
    w = torch.tensor([-3.0], dtype=f64, requires_grad=True)
    opt = sqpoptim.StochasticSQP([w], lr=0.0, normal_damping=None)  # the papers' step
    closure = lambda: (w.sum() * 0.0, torch.tanh(w) - 0.9)  # noqa: E731
    opt.step(closure)
    assert w.item() > 150
    with pytest.raises(ValueError, match=r"previous step moved the parameters by ‖δ‖ = 192 against ‖x‖ = 189"):
        opt.step(closure)


# ---------------------------------------------------------------------------------------------- overflow


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("name", ["sqp-adam", "sqp-hb", "adam-con"])
def test_an_overflowing_gradient_never_reaches_the_moments(name, sync_free):
    # g = 1e25 is finite in float32 but g² is not: the moments would hold inf
    x = torch.ones(4, requires_grad=True)
    opt = SQP[name]([x], lr=1e-2, sync_free=sync_free)
    opt.step(lambda: ((x - 2).pow(2).sum(), x[:1] - 1))
    before = _state_tensors(opt), x.detach().clone()
    closure = lambda: (1e25 * x.sum(), x[:1] - 1)  # noqa: E731
    if sync_free:
        opt.step(closure)
        with pytest.raises(FloatingPointError, match="unusable step"):
            opt.check_finite()
    else:
        with pytest.raises(FloatingPointError, match="could not be formed"):
            opt.step(closure)
    assert torch.equal(x.detach(), before[1])
    for a, b in zip(_state_tensors(opt), before[0]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("lr", math.nan, "learning rate"),
        ("lr", -1.0, "learning rate"),
        ("betas", (1.5, 0.999), "beta1"),
        ("eps", 0.0, "eps"),
        ("normal_lr", math.inf, "normal_lr"),
    ],
)
def test_hyperparameters_changed_after_construction_are_checked_at_the_next_step(key, value, match):
    model = TinyPINN(seed=1)
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
    closure = lambda: (((model(X) - Y) ** 2).mean(), burgers_residual(model, PTS))  # noqa: E731
    opt.step(closure)
    params, state = [p.detach().clone() for p in model.parameters()], _state_tensors(opt)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=f"param group 0: .*{match}"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(a, b) for a, b in zip(_state_tensors(opt), state))


def test_add_param_group_refuses_bad_settings_and_keeps_the_optimizer_as_it_was():
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = sqpoptim.ProjectedAdamSQP([a])
    with pytest.raises(ValueError, match="param group 1: Invalid beta1"):
        opt.add_param_group({"params": [b], "betas": (1.5, 0.999)})
    assert len(opt.param_groups) == 1
    hb = sqpoptim.ProjectedHeavyBallSQP([a])
    with pytest.raises(ValueError, match="momentum"):
        hb.add_param_group({"params": [b], "momentum": -0.5})
    pd = sqpoptim.PrimalDual([a])
    with pytest.raises(ValueError, match="dual_lr"):
        pd.add_param_group({"params": [b], "dual_lr": math.nan})


def test_a_parameter_added_later_takes_its_own_first_adam_step():
    # torch.optim.Adam counts steps per parameter: a late parameter's first step has bias correction k = 1
    torch.manual_seed(0)
    a = torch.randn(5, dtype=f64, requires_grad=True)
    b = torch.randn(3, dtype=f64, requires_grad=True)
    opt = sqpoptim.AdamUnc([a], lr=0.1)
    loss = lambda: ((a - 1) ** 2).sum() + ((b + 2) ** 4).sum()  # noqa: E731
    for _ in range(5):
        opt.step(loss)
    opt.add_param_group({"params": [b]})
    b0 = b.detach().clone()
    opt.step(loss)
    ref_b = b0.clone().requires_grad_(True)
    ref = sqpoptim.AdamUnc([ref_b], lr=0.1)
    ref.step(lambda: ((ref_b + 2) ** 4).sum())
    torch.testing.assert_close(b.detach(), ref_b.detach(), rtol=1e-14, atol=1e-14)
    assert opt.state[b]["step"].item() == 1 and opt.state[a]["step"].item() == 6
    sd = opt.state_dict()  # the counts round-trip like torch.optim's
    twin = sqpoptim.AdamUnc([a.detach().clone().requires_grad_(True)], lr=0.1)
    twin.add_param_group({"params": [b.detach().clone().requires_grad_(True)]})
    twin.load_state_dict(sd)
    assert [twin.state[p]["step"].item() for g in twin.param_groups for p in g["params"]] == [6.0, 1.0]


# ---------------------------------------------------------------------------------------------- closures


def test_a_closure_that_calls_backward_gets_the_contract_as_a_hint():
    model = TinyPINN(seed=2)
    opt = sqpoptim.ProjectedAdamSQP(model.parameters())

    def torch_style():
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        return loss, burgers_residual(model, PTS)

    with pytest.raises(RuntimeError, match=r"(?s)did the closure call backward\(\)\?.*return loss, c"):
        opt.step(torch_style)


def test_a_closure_returning_only_the_loss_gets_the_contract_as_a_hint():
    model = TinyPINN(seed=2)
    opt = sqpoptim.ProjectedHeavyBallSQP(model.parameters())
    with pytest.raises(TypeError, match=r"(?s)single tensor; the closure must return \(loss, c\).*def closure"):
        opt.step(lambda: ((model(X) - Y) ** 2).mean())


def test_the_lipschitz_estimate_checks_its_extra_closure_calls_and_leaves_no_stray_state():
    model = TinyPINN(seed=3)
    opt = sqpoptim.StochasticSQP(model.parameters(), lr=1.0, step_rule="adaptive")
    calls = [0]

    def closure():
        calls[0] += 1
        loss = ((model(X) - Y) ** 2).mean()
        return (loss * math.nan if calls[0] == 3 else loss), burgers_residual(model, PTS)

    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="Lipschitz"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert opt.global_state.step is None and opt.global_state.tau is None

    def raising():
        calls[0] += 1
        if calls[0] > 4:
            raise KeyError("data loader ran dry")
        return ((model(X) - Y) ** 2).mean(), burgers_residual(model, PTS)

    with pytest.raises(KeyError):
        opt.step(raising)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert opt.global_state.step is None and opt.global_state.lipschitz is None


def test_rank_deficiency_warning_points_at_the_callers_line():
    model = TinyPINN(seed=2)
    duplicated = torch.cat([PTS, PTS[:1]])
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
    with pytest.warns(sqpoptim.RankDeficiencyWarning) as record:
        opt.step(lambda: (((model(X) - Y) ** 2).mean(), burgers_residual(model, duplicated)))
    assert record[0].filename == __file__


@pytest.mark.parametrize("damping", [None, "default"])
def test_infeasible_constraints_are_reported_in_the_diagnostics_and_warned_about_once(damping):
    # x0 = 1 and x0 = 2 at once: the least-squares normal step settles at x0 = 1.5 and c stays at (0.5, -0.5)
    x = torch.zeros(3, dtype=f64, requires_grad=True)
    kw = {} if damping == "default" else {"normal_damping": None}
    opt = sqpoptim.ProjectedHeavyBallSQP([x], lr=0.1, **kw)
    closure = lambda: (((x - 3) ** 2).sum(), torch.stack([x[0] - 1, x[0] - 2]))  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(40):
            opt.step(closure)
    infeasible = [w for w in caught if issubclass(w.category, sqpoptim.InfeasibilityWarning)]
    assert len(infeasible) == 1 and infeasible[0].filename == __file__
    assert "stalled at ‖c‖ = 0.707" in str(infeasible[0].message)
    assert opt.diagnostics()["c_predicted"] == pytest.approx(1.0, rel=1e-12)
    # damped, the least-squares solution is approached, not reached in one step (measured: 5.8e-11 away)
    assert x[0].item() == pytest.approx(1.5, abs=1e-12 if damping is None else 1e-9)


@pytest.mark.parametrize("damping", [None, "default"])
def test_a_feasible_problem_reports_that_the_linearised_step_removes_the_violation(damping):
    model = TinyPINN(seed=4)
    kw = {} if damping == "default" else {"normal_damping": None}
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sqpoptim.InfeasibilityWarning)
        for _ in range(25):
            opt.step(lambda: (((model(X) - Y) ** 2).mean(), burgers_residual(model, PTS)))
    if damping is None:  # J v = -c exactly
        assert opt.diagnostics()["c_predicted"] == 0.0
    else:  # the damped step leaves μ(G + μI)⁻¹c of c (measured: 3.7e-6 of it)
        assert 0.0 < opt.diagnostics()["c_predicted"] < 1e-4
    half = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, normal_lr=0.5, sync_free=True, normal_damping=None)
    half.step(lambda: (((model(X) - Y) ** 2).mean(), burgers_residual(model, PTS)))
    assert half.diagnostics()["c_predicted"] == pytest.approx(0.5, rel=1e-6)


# ----------------------------------------------------------------------------------- a refused first step


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("name", [*SQP, "sqp-adaptive"])
def test_a_step_whose_closure_raises_leaves_the_state_dict_as_it_was(name, sync_free):
    """Nothing of a step that failed in its closure reaches ``state_dict()``, not even an empty entry: the
    second step fails in its closure (the adaptive rule that estimates its Lipschitz constants fails inside its
    first step, at its second closure call)."""
    make = SQP.get(name) or factories("sqp-adaptive")["sqp-adaptive"]
    model = TinyPINN(seed=2)
    opt = make(model.parameters(), lr=1e-2, sync_free=sync_free)
    calls, snapshots = [0], [repr(opt.state_dict())]

    def closure():
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("the user's closure failed")
        return ((model(X) - Y) ** 2).mean(), burgers_residual(model, PTS)

    with pytest.raises(RuntimeError, match="the user's closure failed"):
        for _ in range(2):
            before = [p.detach().clone() for p in model.parameters()]
            opt.step(closure)
            snapshots.append(repr(opt.state_dict()))
    assert repr(opt.state_dict()) == snapshots[-1]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(snapshots) == (1 if name == "sqp-adaptive" else 2)


def test_zero_rows_at_the_lipschitz_estimates_point_are_named_in_one_clear_message():
    x = torch.tensor([1.0, 2.0], dtype=f64, requires_grad=True)
    opt = sqpoptim.StochasticSQP([x], lr=1.0, step_rule="adaptive")
    calls = [0]

    def closure():  # at the nearby point of the estimate the constraint no longer depends on x
        calls[0] += 1
        c = (x[:1] - 3) if calls[0] == 1 else (x[:1] * 0 + 1)
        return (x**2).sum(), c

    with pytest.raises(ValueError) as err:
        opt.step(closure)
    message = str(err.value)
    assert message.startswith("while estimating the Lipschitz constants (step_rule='adaptive') at a point")
    assert "constraint(s) [0] have all-zero Jacobian rows" in message and "parameters are unchanged" in message
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0], dtype=f64))
