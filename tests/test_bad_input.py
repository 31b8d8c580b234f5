"""Bad input gets a clear error naming the problem, and a refused step leaves parameters and optimizer state
bit-identical. Rank deficiency is not an error."""

import copy
import math

import pytest
import torch
from torch import nn

import sqpoptim

from .helpers import TinyPINN, burgers_residual, f64
from .optimizers import factories

X = torch.rand(32, 2, dtype=f64, generator=torch.Generator().manual_seed(3))
Y = torch.cos(2 * X[:, :1])
PTS = torch.tensor([[0.2, 0.3], [0.6, 0.4], [0.8, 0.9]], dtype=f64)

OPTIMIZERS = factories("sqp-adam", "sqp-hb", "sqp-hb-damped", "sqp", "adam-con", "primal-dual", lr=1e-2)


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite value whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


def objective(model):
    return ((model(X) - Y) ** 2).mean()


def good(model):
    return objective(model), burgers_residual(model, PTS)


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_unchanged(model, opt, snap):
    params, state = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)
    _assert_equal_trees(opt.state_dict()["state"], state["state"])


def _assert_equal_trees(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            if k != "diagnostics":
                _assert_equal_trees(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b):
            _assert_equal_trees(x, y)
    else:
        assert a == b


BAD_CLOSURES = {
    "non-scalar loss": (lambda m: (((m(X) - Y) ** 2), burgers_residual(m, PTS)), ValueError, "scalar"),
    "2-D c": (lambda m: (objective(m), burgers_residual(m, PTS).reshape(3, 1)), ValueError, "1-D"),
    "0-d c": (lambda m: (objective(m), burgers_residual(m, PTS)[0]), ValueError, "1-D"),
    "bare loss": (lambda m: objective(m), TypeError, r"\(loss, c\)"),
    "NaN loss": (lambda m: (objective(m) * math.nan, burgers_residual(m, PTS)), FloatingPointError, "loss"),
    "inf in c": (
        lambda m: (objective(m), burgers_residual(m, PTS) * torch.tensor([1.0, math.inf, 1.0], dtype=f64)),
        FloatingPointError,
        "constraint values",
    ),
    "NaN gradient": (
        lambda m: (NaNGradient.apply(objective(m)), burgers_residual(m, PTS)),
        FloatingPointError,
        "gradient",
    ),
    "NaN Jacobian": (
        lambda m: (objective(m), NaNGradient.apply(burgers_residual(m, PTS))),
        FloatingPointError,
        "Jacobian|gradient",
    ),
    "c without graph": (lambda m: (objective(m), torch.ones(2, dtype=f64)), ValueError, "do not depend"),
    "c row without graph": (
        lambda m: (objective(m), torch.cat([burgers_residual(m, PTS), torch.ones(1, dtype=f64)])),
        ValueError,
        "do not depend",
    ),
}


# The primal-dual method forms no Jacobian: a NaN in J'λ surfaces as a NaN gradient (covered), and a constant
# constraint row is a legitimate, if useless, term of its Lagrangian. Those two pairs do not apply to it.
REFUSAL_CASES = [
    (opt, case)
    for opt in OPTIMIZERS
    for case in BAD_CLOSURES
    if not (opt == "primal-dual" and case in ("NaN Jacobian", "c row without graph"))
]


@pytest.mark.parametrize("opt_name,case", REFUSAL_CASES)
def test_refused_step_leaves_parameters_and_state_bit_identical(opt_name, case):
    make, exc, match = BAD_CLOSURES[case]
    model = TinyPINN(seed=1)
    opt = OPTIMIZERS[opt_name](model.parameters())
    opt.step(lambda: good(model))  # state exists
    snap = snapshot(model, opt)
    with pytest.raises(exc, match=match):
        opt.step(lambda: make(model))
    assert_unchanged(model, opt, snap)
    opt.step(lambda: good(model))  # and the optimizer is still usable


def test_more_constraints_than_parameters():
    x = torch.zeros(3, dtype=f64, requires_grad=True)
    opt = sqpoptim.ProjectedAdamSQP([x])
    with pytest.raises(ValueError, match=r"more constraints than parameters: m = 4 > n = 3"):
        opt.step(lambda: (x.sum(), torch.cat([x, x[:1]]) ** 2))
    assert torch.equal(x, torch.zeros(3, dtype=f64)) and not opt.state


@pytest.mark.parametrize(
    "J,match",
    [
        (lambda m, n: torch.zeros(m, n + 1, dtype=f64), r"shape \[m, n\]"),
        (lambda m, n: torch.zeros(m, n, dtype=torch.float32), "dtype"),
        (lambda m, n: torch.zeros(m, n, dtype=f64, device="meta"), "is on meta"),
        (lambda m, n: [torch.zeros(m, 2, dtype=f64)], "blocks"),
        (lambda m, n: "J", "tensor or a sequence"),
    ],
)
def test_given_jacobian_of_wrong_shape_dtype_or_device(J, match):
    x = torch.ones(5, dtype=f64, requires_grad=True)
    y = torch.ones(4, dtype=f64, requires_grad=True)
    opt = sqpoptim.ProjectedAdamSQP([x, y])
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step(lambda: (x.sum() + y.sum(), (x[:2] ** 2).detach(), J(2, 9)))
    assert torch.equal(x, torch.ones(5, dtype=f64)) and not opt.state


def test_c_on_another_device_is_rejected():
    x = torch.ones(5, dtype=f64, requires_grad=True)
    opt = sqpoptim.ProjectedAdamSQP([x])
    with pytest.raises(ValueError, match="is on meta"):
        opt.step(lambda: (x.sum(), torch.zeros(2, dtype=f64, device="meta")))


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(10, 3, sparse=True, dtype=f64)
    opt = sqpoptim.ProjectedAdamSQP(emb.parameters())
    before = emb.weight.detach().clone()
    idx = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step(lambda: (emb(idx).sum(), emb(idx)[0, :1] - 1))
    assert torch.equal(emb.weight, before)


def test_parameters_of_different_dtypes_or_no_trainable_parameters():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, dtype=f64, requires_grad=True)
    with pytest.raises(ValueError, match="share one dtype"):
        sqpoptim.ProjectedAdamSQP([a, b]).step(lambda: (a.sum() + b.sum(), None))
    frozen = torch.ones(3)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        sqpoptim.ProjectedAdamSQP([frozen]).step(lambda: (frozen.sum(), None))


def test_step_without_closure():
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="needs a closure"):
        sqpoptim.ProjectedHeavyBallSQP([x]).step()


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda p: sqpoptim.ProjectedAdamSQP(p, lr=-1.0), "learning rate"),
        (lambda p: sqpoptim.ProjectedAdamSQP(p, betas=(1.0, 0.999)), "beta1"),
        (lambda p: sqpoptim.ProjectedAdamSQP(p, betas=(0.9, -0.1)), "beta2"),
        (lambda p: sqpoptim.ProjectedAdamSQP(p, eps=0.0), "eps"),
        (lambda p: sqpoptim.ProjectedAdamSQP(p, normal_lr=-1.0), "normal_lr"),
        (lambda p: sqpoptim.ProjectedAdamSQP(p, projection="oblique"), "projection"),
        (lambda p: sqpoptim.ProjectedAdamSQP(p, bias_correction="none"), "bias_correction"),
        (lambda p: sqpoptim.ProjectedAdamSQP(p, jacobian="forward"), "jacobian"),
        (lambda p: sqpoptim.ProjectedAdamSQP(p, chunk_size=0), "chunk_size"),
        (lambda p: sqpoptim.ProjectedAdamSQP(p, rank_tol=1.5), "rank_tol"),
        (lambda p: sqpoptim.ProjectedHeavyBallSQP(p, momentum=1.0), "momentum"),
        (lambda p: sqpoptim.ProjectedHeavyBallSQP(p, lr=float("nan")), "learning rate"),
        (lambda p: sqpoptim.StochasticSQP(p, step_rule="armijo"), "step_rule"),
        (lambda p: sqpoptim.StochasticSQP(p, sigma=1.0), "sigma"),
        (lambda p: sqpoptim.StochasticSQP(p, lipschitz=(1.0, -1.0)), "lipschitz"),
        (lambda p: sqpoptim.PenaltyAdam(p, rho=-1.0), "rho"),
        (lambda p: sqpoptim.PrimalDual(p, dual_lr=-0.1), "dual_lr"),
    ],
)
def test_invalid_hyperparameters(factory, match):
    with pytest.raises(ValueError, match=match):
        factory([torch.ones(2, requires_grad=True)])


def test_rank_deficient_jacobian_proceeds_on_the_independent_part():
    model = TinyPINN(seed=2)
    duplicated = torch.cat([PTS, PTS[:1]])  # the same constraint twice
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, normal_lr=1.0)
    with pytest.warns(sqpoptim.RankDeficiencyWarning, match="rank used 3 of 4"):
        opt.step(lambda: (objective(model), burgers_residual(model, duplicated)))
    diag = opt.diagnostics()
    assert diag["rank"] == 3 and diag["truncated"]
    opt.param_groups[0]["lr"] = 0.0  # normal steps only: Gauss-Newton on the independent constraints
    for _ in range(6):
        opt.step(lambda: (objective(model), burgers_residual(model, duplicated)))
    assert burgers_residual(model, duplicated).abs().max() < 1e-10


def test_sync_free_mode_skips_a_non_finite_step_on_the_device_and_reports_it_later():
    model = TinyPINN(seed=3)
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, sync_free=True)
    opt.step(lambda: good(model))
    snap = snapshot(model, opt)
    opt.step(lambda: (objective(model), NaNGradient.apply(burgers_residual(model, PTS))))  # no host read here
    params, state = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)
    for i, p in enumerate(model.parameters()):  # moments bit-identical, step count not advanced
        assert torch.equal(opt.state[p]["exp_avg"], state["state"][i]["exp_avg"])
    assert opt.global_state.step.item() == 1 and opt.global_state.nonfinite_steps.item() == 1
    with pytest.raises(FloatingPointError, match="Jacobian J at an earlier step"):
        opt.step(lambda: good(model))
    opt.check_finite()  # reported once
    opt.step(lambda: good(model))
    assert opt.global_state.step.item() == 2


def test_check_finite_reports_a_skipped_step():
    model = TinyPINN(seed=4)
    opt = sqpoptim.ProjectedHeavyBallSQP(model.parameters(), lr=1e-2, sync_free=True)
    opt.step(lambda: (objective(model) * math.inf, burgers_residual(model, PTS)))
    with pytest.raises(FloatingPointError, match="loss"):
        opt.check_finite()


def test_adaptive_rule_with_different_group_learning_rates_is_refused_without_changing_state():
    x = torch.ones(4, dtype=f64, requires_grad=True)
    y = torch.ones(3, dtype=f64, requires_grad=True)
    opt = sqpoptim.StochasticSQP([{"params": [x], "lr": 1.0}, {"params": [y], "lr": 0.5}], step_rule="adaptive")
    with pytest.raises(ValueError, match="one learning rate"):
        opt.step(lambda: ((x**2).sum() + (y**2).sum(), (x[:1] + y[:1] - 1)))
    assert torch.equal(x, torch.ones(4, dtype=f64)) and opt.global_state.step is None


def test_skipped_steps_recorded_in_a_checkpoint_are_not_reported_again_after_loading():
    model = TinyPINN(seed=5)
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, sync_free=True)
    opt.step(lambda: good(model))
    opt.step(lambda: (objective(model) * math.nan, burgers_residual(model, PTS)))
    with pytest.raises(FloatingPointError):
        opt.check_finite()
    saved = copy.deepcopy(opt.state_dict())
    opt2 = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, sync_free=True)
    opt2.load_state_dict(saved)
    for _ in range(3):
        opt2.step(lambda: good(model))
    opt2.check_finite()
    assert opt2.global_state.nonfinite_steps.item() == 1


@pytest.mark.parametrize("sync_free", [False, True])
def test_the_input_check_names_what_is_wrong_and_passes_a_finite_gradient_whose_sum_overflows(sync_free):
    """Exact mode screens g by its float64 sum in the one host read; a finite g whose sum overflows goes to the
    entrywise test and passes, while a non-finite entry is named, in both modes alike."""
    from sqpoptim._finite import FiniteGuard, ZeroJacobianRows

    loss, c, rows = (
        torch.tensor(1.0, dtype=f64),
        torch.tensor([0.5, -0.2], dtype=f64),
        torch.tensor([2.0, 3.0], dtype=f64),
    )
    big = torch.full((4,), 1.5e308, dtype=f64)
    guard = FiniteGuard()

    def flags(g, c=c, rows=rows, loss=loss):
        if sync_free:
            return guard.check(loss, c, g, rows, sync_free=True).tolist()
        guard.check(loss, c, g, rows, sync_free=False)
        return [False] * 5

    assert flags(big) == [False] * 5  # sum = inf, every entry finite
    bad_g = big.clone()
    bad_g[2] = math.inf
    bad_c = torch.tensor([0.5, math.nan], dtype=f64)
    zero_row = torch.tensor([2.0, 0.0], dtype=f64)
    if sync_free:
        assert flags(bad_g) == [False, False, True, False, False]
        assert flags(big, c=bad_c) == [False, True, False, False, False]
        assert flags(big, rows=zero_row) == [False, False, False, False, True]
    else:
        with pytest.raises(FloatingPointError, match="gradient"):
            flags(bad_g)
        with pytest.raises(FloatingPointError, match="constraint values"):
            flags(big, c=bad_c)
        with pytest.raises(ZeroJacobianRows) as err:
            flags(big, rows=zero_row)
        assert err.value.rows == [1]
