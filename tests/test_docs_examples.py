"""The guides' code (docs/examples/*.py) runs and does what the guides say; the torch behaviour the guides
document (torch.compile, autocast, GradScaler, Lightning) is checked where it is cheap to check."""

from __future__ import annotations

import contextlib
import functools
import runpy
import warnings
from pathlib import Path

import pytest
import torch

import sqpoptim

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def run_example(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name), run_name="example")


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@contextlib.contextmanager
def compile_backend(backend: str):
    """``torch.compile`` with ``backend`` for the duration: ``aot_eager`` runs AOTAutograd (where the compiled
    backward's limits documented in the guide come from) without inductor's C++ code generation, which takes
    about a minute of wall time on the CI machine."""
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch.compile = original
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------- the closure contract
def linear_model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3).double()


def test_closure_forms_with_graph_and_with_given_jacobian_take_the_same_steps():
    forms = run_example("closure_forms.py")
    runs = []
    for make in (forms["closure_with_graph"], forms["closure_with_jacobian"]):
        model = linear_model()
        opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
        closure = make(model)
        for _ in range(20):
            opt.step(closure)
        runs.append((flat(model), model))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=1e-12)
    model = runs[0][1]
    c = model(forms["x_c"]).sum(dim=1) - 1.0
    assert c.abs().max().item() < 1e-10  # linear constraints: the Gauss-Newton step meets them exactly


def test_pointwise_closure_takes_the_steps_of_the_closure_with_graph():
    forms = run_example("closure_forms.py")

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()

    def with_graph(model):
        def closure():
            loss = ((model(forms["t_data"]) - forms["u_data"]) ** 2).mean()
            t_c = forms["t_c"].clone().requires_grad_(True)
            u = model(t_c)
            du = torch.autograd.grad(u.sum(), t_c, create_graph=True)[0]
            return loss, (du + u).squeeze(1)

        return closure

    results = []
    for make in (with_graph, forms["closure_pointwise"]):
        model = mlp()
        opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
        closure = make(model)
        for _ in range(20):
            _, c = opt.step(closure)
        results.append((flat(model), c))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-10)
    assert results[1][1].abs().max().item() < 1e-4  # from max |c| = 0.1 at the start


def test_a_closure_calling_backward_is_refused_with_the_contract_and_nothing_changes():
    forms = run_example("closure_forms.py")
    model = linear_model()
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
    before = flat(model).clone()
    with pytest.raises(
        TypeError,
        match=r"must return \(loss, c\), \(loss, c, J\) or \(loss, Constraints\(.*\)\) and must not call backward",
    ):
        opt.step(forms["closure_calling_backward"](model, opt))
    assert torch.equal(flat(model), before)


# ------------------------------------------------------------------------------------------------ torch.compile
def ode_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    t = torch.linspace(0, 1, 20).unsqueeze(1)
    return model, t, torch.exp(-t), torch.tensor([[0.25], [0.5], [0.75]])


def train_eager(steps: int, constraints: str = "ode", **options) -> torch.Tensor:
    model, t, u_data, t_c = ode_problem()
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, **options)
    closure = make_closure(model, model, t, u_data, t_c, constraints)
    for _ in range(steps):
        opt.step(closure)
    return flat(model)


def make_closure(for_loss, for_c, t, u_data, t_c, constraints):
    def closure():
        loss = ((for_loss(t) - u_data) ** 2).mean()
        if constraints == "values":
            return loss, (for_c(t_c) - torch.exp(-t_c)).squeeze(1)
        x = t_c.clone().requires_grad_(True)
        u = for_c(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        return loss, (du + u).squeeze(1)

    return closure


def check_compile_example(backend: str):
    with compile_backend(backend):
        ns = run_example("compile_model.py")
    assert ns["c"].abs().max().item() < 1e-4
    # the compiled forward changes nothing but rounding: the same run in eager mode
    torch.testing.assert_close(flat(ns["model"]), train_eager(200), rtol=0, atol=1e-3)


@pytest.mark.slow  # compiling costs ~8 s of CPU; the compiled-module tests below stay in the default suite
def test_compile_example_matches_eager_training():
    check_compile_example("aot_eager")


@pytest.mark.slow
def test_compile_example_matches_eager_training_with_inductor():
    check_compile_example("inductor")


def compiled_steps(constraints: str, donated_buffer: bool, steps: int = 3, paths: list | None = None) -> torch.Tensor:
    import torch._functorch.config as functorch_config

    model, t, u_data, t_c = ode_problem()
    with compile_backend("aot_eager"), functorch_config.patch(donated_buffer=donated_buffer):
        compiled = torch.compile(model)
        opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
        closure = make_closure(compiled, compiled, t, u_data, t_c, constraints)
        for _ in range(steps):
            opt.step(closure)
            if paths is not None:
                paths.append(opt.diagnostics()["jacobian"])
    return flat(model)


def test_constraints_through_a_compiled_module_hit_donated_buffers():
    # c's graph is back-propagated once per constraint; a compiled backward with donated buffers runs once only
    with pytest.raises(RuntimeError, match="donated buffers"), warnings.catch_warnings():
        warnings.simplefilter("ignore", sqpoptim.JacobianFallbackWarning)  # the per-row loop fails the same way
        compiled_steps("values", donated_buffer=True)


def test_constraints_through_a_compiled_module_without_donated_buffers_match_eager():
    # the layer-factor Jacobian needs the eager nn.Linear calls: through a compiled module the optimizer takes the
    # batched one, so the eager reference takes it too (the two paths differ by rounding only)
    paths: list = []
    compiled = compiled_steps("values", donated_buffer=False, paths=paths)
    assert paths == ["batched"] * 3
    torch.testing.assert_close(compiled, train_eager(3, "values", jacobian="batched"))


def test_input_derivatives_through_a_compiled_module_are_a_double_backward():
    with pytest.raises(RuntimeError, match="double backward"), warnings.catch_warnings():
        warnings.simplefilter("ignore", sqpoptim.JacobianFallbackWarning)  # the per-row loop fails the same way
        compiled_steps("ode", donated_buffer=False)


@pytest.mark.slow  # compiling the step with its graph breaks takes 10-20 s
def test_compiling_the_step_runs_the_eager_batched_path_under_aot_autograd():
    # dynamo breaks the graph around the step's host logic; the layer recording sees no nn.Linear call through it,
    # so the step takes the batched Jacobian, and then the iterates of eager mode on that path
    model, t, u_data, t_c = ode_problem()
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
    closure = make_closure(model, model, t, u_data, t_c, "values")
    with compile_backend("aot_eager"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = torch.compile(opt.step)
        for _ in range(3):
            step(closure)
    assert opt.diagnostics()["jacobian"] == "batched"
    torch.testing.assert_close(flat(model), train_eager(3, "values", jacobian="batched"), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------- AMP
def test_amp_example_meets_the_constraints_far_better_than_constraints_under_autocast():
    ns = run_example("amp_bf16.py")
    assert ns["c"].dtype == torch.float32
    c_float32 = ns["c"].abs().max().item()
    assert c_float32 < 5e-3

    # the contrast the guide draws: c computed under autocast is bfloat16 and meets c = 0 only to bf16's resolution
    torch.manual_seed(0)  # the example's model, as it was before training
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)
    )
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)

    def closure():
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            loss = ((model(ns["x"]).float() - ns["y"]) ** 2).mean()
            c = model(ns["x_c"]).sum(dim=1) - 1.0
        return loss, c

    for _ in range(200):
        _, c = opt.step(closure)
    assert c.dtype == torch.bfloat16
    assert c.abs().max().item() > 10 * c_float32


def test_grad_scaler_refuses_a_closure():
    model = torch.nn.Linear(2, 1)
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: (model(torch.ones(1, 2)).sum(), None))


# ------------------------------------------------------------------------------------------------- Lightning
def lightning_fit(precision: str = "32-true", epochs: int = 150, plugins=None):
    """Train the guide's module as its ``__main__`` block does (without progress bars)."""
    import pytorch_lightning as pl

    ns = run_example("lightning_manual.py")
    torch.manual_seed(0)
    t = torch.linspace(0, 1, 20).unsqueeze(1)
    data = torch.utils.data.TensorDataset(t, torch.exp(-t) + 0.01 * torch.randn_like(t))
    module = ns["ConstrainedODEFit"]()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        precision=None if plugins else precision,
        plugins=plugins,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own notices (no GPU, few batches, ...)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=20))
    return module, trainer.callback_metrics


def test_lightning_manual_optimisation_passes_the_closure_through():
    module, metrics = lightning_fit(epochs=60)
    assert metrics["max_abs_c"].item() < 1e-4
    # what step returned reached the module: the logged violation is the optimizer's own c_inf
    assert metrics["max_abs_c"].item() == pytest.approx(module.optimizers().optimizer.diagnostics()["c_inf"])


def test_lightning_bf16_mixed_with_constraints_outside_autocast():
    # computed under the Trainer's autocast, c would be bfloat16 and stall at bf16's resolution (7.8e-3 here)
    _, metrics = lightning_fit("bf16-mixed")
    assert metrics["max_abs_c"].item() < 1e-4


def test_lightning_float16_mixed_precision_cannot_step_a_closure():
    from pytorch_lightning.plugins import MixedPrecision

    # 16-mixed runs the closure itself, then GradScaler.unscale_ and GradScaler.step(optimizer) with no closure
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    with pytest.raises((AssertionError, RuntimeError)):
        lightning_fit(epochs=1, plugins=[plugin])


@pytest.mark.slow  # dynamo traces the step: ~13 s of CPU
def test_a_compiled_step_reports_what_an_eager_step_reports():
    """torch.compile of ``opt.step`` (dynamo, eager backend) takes the eager steps — rejections of the damped
    step included — and leaves the same state, diagnostics and multipliers (attributes assigned anew inside a
    step would be lost where dynamo resumes after a graph break)."""

    def run(compiled):
        torch.manual_seed(0)
        x = torch.randn(4, dtype=torch.float64, requires_grad=True)
        opt = sqpoptim.ProjectedAdamSQP([x], lr=1e-2)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(4):
                step(lambda: ((x**2).sum(), x[:2] ** 2 - 1))
        return x.detach(), opt.state_dict()["state"]["global"], opt.diagnostics(), opt.multipliers

    torch._dynamo.reset()
    (x_e, state_e, diag_e, lam_e), (x_c, state_c, diag_c, lam_c) = run(False), run(True)
    assert state_e["damping"]["rejected_steps"].item() > 0  # the rejection path was taken too
    assert torch.equal(x_e, x_c) and repr(state_e) == repr(state_c)
    assert diag_e == diag_c and torch.equal(lam_e, lam_c)
