"""The torch.optim contract: state_dict round trips, schedulers, param groups, frozen and complex parameters,
dtypes, the ways of passing J, and the sync-free mode (float64 unless stated)."""

import copy
import io

import pytest
import torch

import sqpoptim

from .helpers import TinyPINN, burgers_residual, burgers_residual_pointwise, f64
from .optimizers import factories

X = torch.rand(48, 2, dtype=f64, generator=torch.Generator().manual_seed(2))
Y = torch.sin(3 * X[:, :1]) * torch.cos(2 * X[:, 1:])
PTS = torch.tensor([[0.2, 0.3], [0.6, 0.4], [0.8, 0.9]], dtype=f64)

FACTORIES = factories(
    "sqp-hb",
    "sqp-adam",
    "sqp-adam-scaled-standard",
    "sqp-adam-damped",
    "sqp",
    "sqp-adaptive",
    "adam-con",
    "adam-unc",
    "penalty",
    "primal-dual",
    lr=1e-2,
)


def closure_for(model):
    return lambda: (((model(X) - Y) ** 2).mean(), burgers_residual(model, PTS))


def flat(model):
    return torch.cat(
        [torch.view_as_real(p).reshape(-1) if p.is_complex() else p.reshape(-1) for p in model.parameters()]
    )


@pytest.mark.parametrize("name", list(FACTORIES))
def test_interrupted_and_resumed_run_gives_the_same_iterates(name):
    model = TinyPINN(seed=4)
    opt = FACTORIES[name](model.parameters())
    for _ in range(8):
        opt.step(closure_for(model))
    reference = flat(model).clone()

    model2 = TinyPINN(seed=4)
    opt2 = FACTORIES[name](model2.parameters())
    for _ in range(4):
        opt2.step(closure_for(model2))
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    saved_copy = copy.deepcopy(saved)
    model3 = TinyPINN(seed=99)  # different init: everything must come from the checkpoint
    model3.load_state_dict(saved["model"])
    opt3 = FACTORIES[name](model3.parameters())
    opt3.load_state_dict(saved["opt"])
    for _ in range(4):
        opt3.step(closure_for(model3))
    torch.testing.assert_close(flat(model3), reference, rtol=0, atol=1e-14)
    # loading did not alias the checkpoint: training on did not write into it
    for a, b in zip(_tensors(saved["opt"]), _tensors(saved_copy["opt"])):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # diagnostics may hold a NaN ratio


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_state_keeps_the_torch_optim_layout_and_global_state_lands_on_the_parameters_device():
    model = TinyPINN(seed=1)
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
    opt.step(closure_for(model))
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape and opt.state[p]["exp_avg_sq"].dtype == p.dtype
    sd = opt.state_dict()
    assert sd["state"]["global"]["step"].item() == 1
    opt2 = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.global_state.step is not sd["state"]["global"]["step"]
    assert opt2.global_state.step.device == next(model.parameters()).device
    assert "global" not in opt2.state  # the optimizer-wide state is typed, not a string-keyed entry


def linear_problem(n=12, m=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    C = torch.randn(m, n, generator=gen, dtype=f64)
    d = torch.randn(m, generator=gen, dtype=f64)
    b = torch.randn(n, generator=gen, dtype=f64)
    return C, d, b


@pytest.mark.parametrize("normal_lr", [None, 0.3])
def test_schedulers_drive_the_tangential_step_and_the_normal_step_only_when_normal_lr_is_none(normal_lr):
    """With linear constraints c_{k+1} = (1 - γ_k) c_k exactly, so the contraction reads off γ_k."""
    C, d, b = linear_problem()
    x = torch.zeros(12, dtype=f64, requires_grad=True)
    opt = sqpoptim.ProjectedAdamSQP([x], lr=0.5, normal_lr=normal_lr, normal_damping=None)  # exact: J v = -c
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    for _ in range(5):
        lr = opt.param_groups[0]["lr"]
        c_before = C @ x.detach() - d
        opt.step(lambda: (((x - b) ** 2).sum(), C @ x - d))
        c_after = C @ x.detach() - d
        gamma = lr if normal_lr is None else normal_lr
        torch.testing.assert_close(c_after, (1 - gamma) * c_before, rtol=1e-10, atol=1e-13)
        sched.step()


@pytest.mark.parametrize(
    "factory", [lambda p: sqpoptim.ProjectedAdamSQP(p, lr=1e-2), lambda p: sqpoptim.ProjectedHeavyBallSQP(p, lr=1e-2)]
)
def test_one_cycle_scheduler_cycles_lr_and_momentum(factory):
    model = TinyPINN(seed=2)
    opt = factory(model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=6)
    key = "betas" if "betas" in opt.param_groups[0] else "momentum"
    seen_lr, seen_mom = set(), set()
    for _ in range(5):
        seen_lr.add(opt.param_groups[0]["lr"])
        seen_mom.add(str(opt.param_groups[0][key]))
        opt.step(closure_for(model))
        sched.step()
    assert len(seen_lr) == 5 and len(seen_mom) == 5
    assert torch.isfinite(flat(model)).all()


def test_step_lr_halves_the_tangential_step():
    C, d, b = linear_problem()
    x0 = torch.linalg.lstsq(C, d.unsqueeze(1)).solution.squeeze(1)  # feasible start: the step is tangential
    steps = {}
    for lr in (0.2, 0.1):
        x = x0.clone().requires_grad_(True)
        opt = sqpoptim.StochasticSQP([x], lr=0.2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        if lr == 0.1:
            sched.step()
        opt.step(lambda x=x: (((x - b) ** 2).sum(), C @ x - d))
        steps[lr] = x.detach() - x0
    torch.testing.assert_close(steps[0.1], 0.5 * steps[0.2], rtol=1e-12, atol=1e-14)


def test_param_groups_apply_their_lr_before_the_projection():
    C, d, b = linear_problem(n=12)
    x1 = torch.zeros(6, dtype=f64, requires_grad=True)
    x2 = torch.zeros(6, dtype=f64, requires_grad=True)
    groups = [{"params": [x1], "lr": 0.05}, {"params": [x2], "lr": 0.2}]
    opt = sqpoptim.ProjectedAdamSQP(groups, normal_lr=None, normal_damping=None)  # undamped: J δ = -γ c exactly

    def closure():
        x = torch.cat([x1, x2])
        return ((x - b) ** 2).sum(), C @ x - d

    for _ in range(3):
        x_before = torch.cat([x1, x2]).detach()
        c_before = C @ x_before - d
        opt.step(closure)
        delta = torch.cat([x1, x2]).detach() - x_before
        # the normal step moves each group in proportion to its lr and reduces c by the largest: J δ = -0.2 c
        torch.testing.assert_close(C @ delta, -0.2 * c_before, rtol=1e-10, atol=1e-12)
    diag = opt.diagnostics()
    assert diag["rank"] == 3 and diag["u_norm"] > 0


def test_frozen_parameters_are_skipped():
    model = TinyPINN(seed=5)
    model.l1.weight.requires_grad_(False)
    before = model.l1.weight.detach().clone()
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
    opt.step(closure_for(model))
    assert torch.equal(model.l1.weight, before)
    assert model.l1.weight not in opt.state
    model.l1.weight.requires_grad_(True)  # unfreezing later gives it state from then on
    opt.step(closure_for(model))
    assert not torch.equal(model.l1.weight, before) and "exp_avg" in opt.state[model.l1.weight]


def test_float32_linear_constraints_hold_to_float32_precision():
    C, d, b = (t.float() for t in linear_problem(n=40, m=5))
    x = torch.zeros(40, requires_grad=True)
    opt = sqpoptim.ProjectedAdamSQP([x], lr=1e-2, normal_lr=1.0)
    for _ in range(200):
        opt.step(lambda: (((x - b) ** 2).sum(), C @ x - d))
    assert (C @ x.detach() - d).abs().max() < 1e-5
    assert opt.state[x]["exp_avg"].dtype == torch.float32


def test_complex_parameters_move_in_the_null_space_through_their_real_views():
    model = TinyPINN(seed=6, complex_layer=True)
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, normal_lr=0.0)  # tangential steps only
    opt.step(closure_for(model))  # moments exist from here on
    params = list(model.parameters())
    c = burgers_residual(model, PTS)
    n = sum(p.numel() * (2 if p.is_complex() else 1) for p in params)
    J = sqpoptim._jacobian.batched_jacobian(c, params, n)
    before = flat(model).clone()
    opt.step(closure_for(model))
    delta = flat(model) - before
    assert delta.norm() > 1e-4
    assert (J @ delta).abs().max() < 1e-12 * J.norm() * delta.norm() * 10
    assert opt.state[model.spectral]["exp_avg"].shape == (16, 2)  # real view of the complex weight


def test_adam_unc_on_complex_parameters_matches_torch_adam():
    models = [TinyPINN(seed=7, complex_layer=True) for _ in range(2)]
    ours = sqpoptim.AdamUnc(models[0].parameters(), lr=1e-2, eps=1e-30)
    ref = torch.optim.Adam(models[1].parameters(), lr=1e-2, eps=1e-30)
    for _ in range(10):
        ours.step(lambda: ((models[0](X) - Y) ** 2).mean())
        ref.zero_grad()
        ((models[1](X) - Y) ** 2).mean().backward()
        ref.step()
    torch.testing.assert_close(flat(models[0]), flat(models[1]), rtol=1e-12, atol=1e-12)


def _one_step(closure_factory, **kw):
    model = TinyPINN(seed=8)
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, **kw)
    opt.step(closure_factory(model))
    return flat(model)


def test_jacobian_given_dense_per_parameter_or_pointwise_gives_the_same_step():
    ref = _one_step(closure_for)
    loop = _one_step(closure_for, jacobian="loop")
    torch.testing.assert_close(loop, ref, rtol=0, atol=1e-14)

    def with_dense_J(model):
        def closure():
            c = burgers_residual(model, PTS)
            J = torch.stack(
                [
                    torch.cat(
                        [g.reshape(-1) for g in torch.autograd.grad(ci, list(model.parameters()), retain_graph=True)]
                    )
                    for ci in c
                ]
            )
            return ((model(X) - Y) ** 2).mean(), c.detach(), J

        return closure

    def with_block_J(model):
        def closure():
            c = burgers_residual(model, PTS)
            params = list(model.parameters())
            rows = [torch.autograd.grad(ci, params, retain_graph=True) for ci in c]
            return ((model(X) - Y) ** 2).mean(), c.detach(), [torch.stack(col) for col in zip(*rows)]

        return closure

    def with_pointwise(model):
        return lambda: (
            ((model(X) - Y) ** 2).mean(),
            sqpoptim.PointwiseConstraints(model, burgers_residual_pointwise, PTS),
        )

    for factory in (with_dense_J, with_block_J, with_pointwise):
        torch.testing.assert_close(_one_step(factory), ref, rtol=0, atol=1e-13)


def test_autocast_closure_runs_with_float64_linear_algebra():
    model = TinyPINN(seed=9, dtype=torch.float32)
    Xf, Yf, Pf = X.float(), Y.float(), PTS.float()
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ((model(Xf) - Yf) ** 2).mean()
        return loss.float(), (model(Pf).squeeze(-1) - 0.5)  # constraints in float32

    for _ in range(3):
        opt.step(closure)
    assert torch.isfinite(flat(model)).all() and opt.state[model.l1.weight]["exp_avg"].dtype == torch.float32
    assert opt.diagnostics()["rank"] == 3


def test_adaptive_rule_restores_parameters_after_estimating_lipschitz_constants():
    runs = []
    for lipschitz in (None, "copy"):
        model = TinyPINN(seed=10)
        if lipschitz == "copy":
            lipschitz = (runs[0][1]["L"], runs[0][1]["Gamma"])
        opt = sqpoptim.StochasticSQP(model.parameters(), lr=1.0, step_rule="adaptive", lipschitz=lipschitz)
        for _ in range(3):
            opt.step(closure_for(model))
        runs.append((flat(model), opt.diagnostics()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    for key in ("tau", "xi", "alpha"):
        assert key in runs[0][1]


def test_sync_free_mode_matches_exact_mode_on_full_rank_problems():
    out = []
    for sync_free in (False, True):
        model = TinyPINN(seed=11)
        opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, sync_free=sync_free)
        for _ in range(5):
            opt.step(closure_for(model))
        out.append(flat(model))
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-13)


def test_step_returns_the_detached_loss_and_constraints_it_saw():
    model = TinyPINN(seed=12)
    opt = sqpoptim.ProjectedHeavyBallSQP(model.parameters(), lr=1e-2)
    expected_c = burgers_residual(model, PTS).detach()
    loss, c = opt.step(closure_for(model))
    assert not loss.requires_grad and not c.requires_grad
    torch.testing.assert_close(c, expected_c, rtol=0, atol=0)
    assert set(opt.diagnostics()) >= {"c_inf", "v_norm", "u_norm", "rank", "gram_cond"}


def test_state_dict_loads_with_weights_only_and_resumes_identically(tmp_path):
    # the optimizer-wide state is plain tensors in state_dict: a checkpoint needs no pickled classes
    model = TinyPINN(seed=7)
    opt = sqpoptim.StochasticSQP(model.parameters(), lr=0.5, step_rule="adaptive")
    closure = closure_for(model)
    for _ in range(2):
        opt.step(closure)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    twin = TinyPINN(seed=0)
    twin.load_state_dict(saved["model"])
    opt2 = sqpoptim.StochasticSQP(twin.parameters(), lr=0.5, step_rule="adaptive")
    opt2.load_state_dict(saved["opt"])
    for _ in range(2):
        opt.step(closure)
        opt2.step(closure_for(twin))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(opt.global_state.tau, opt2.global_state.tau)


def test_a_state_dict_in_the_flat_format_of_version_0_1_still_loads():
    model = TinyPINN(seed=8)
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, normal_damping=0.5)
    for _ in range(3):
        opt.step(closure_for(model))
    sd = opt.state_dict()
    new = sd["state"]["global"]
    damping = new["damping"]
    legacy = {
        "step": new["step"],
        "damping": damping["nu"],
        "damping_escalation": damping["escalation"],
        "damping_model": damping["model"],
        "damping_x": damping["x_accepted"],
        "diagnostics": {"c_inf": torch.tensor(1.0)},  # 0.1 checkpointed these; they are dropped
    }
    old_format = {**sd, "state": {**sd["state"], "global": legacy}}
    opt2 = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, normal_damping=0.5)
    opt2.load_state_dict(old_format)
    assert torch.equal(opt2.global_state.step, opt.global_state.step)
    assert torch.equal(opt2.global_state.damping.model, damping["model"])
    assert opt2.diagnostics() == {}


def test_unknown_optimizer_wide_state_is_refused_before_anything_changes():
    model = TinyPINN(seed=9)
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
    opt.step(closure_for(model))
    sd = opt.state_dict()
    bad = {**sd, "state": {**sd["state"], "global": {**sd["state"]["global"], "bogus": torch.zeros(())}}}
    fresh = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="unknown entries \\['bogus'\\]"):
        fresh.load_state_dict(bad)
    assert fresh.global_state.step is None and len(fresh.state) == 0
