"""C2/C3 (nonconvex programs): DC3's generator, the constraint functions against explicit formulas and
autograd, the scipy references against first- and second-order optimality conditions and random feasible
points, the metrics, every method through the runner, and ENFORCE's activation rule in the runner's closure."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from problems import problem_class, problem_names
from problems.methods import METHODS
from problems.output_tasks import nonconvex
from problems.output_tasks.nonconvex import NonconvexLinear, NonconvexQuadratic, generate_program
from problems.reference.nlp_solver import solve_references
from problems.runner import RunSpec, run

KINDS = {"linear": NonconvexLinear, "quadratic": NonconvexQuadratic}


@pytest.fixture(scope="module")
def tiny(cache):
    return {k: cls("tiny", dtype=torch.float64, cache_dir=cache) for k, cls in KINDS.items()}


def numpy_program(p):
    """The program's constants as numpy arrays (q, p, A and, for C3, A_i and d)."""
    return {k: v.copy() for k, v in p._numpy.items()}


def h_explicit(d, x, y):
    """h(x, y) for one instance, written out row by row (the test's independent formula)."""
    if "quad" not in d:
        return np.array([d["A"][i] @ y - x[i] for i in range(len(x))])
    return np.array([y @ d["quad"][i] @ y + d["A"][i] @ y + d["d"][i] - x[i] ** 3 for i in range(len(x))])


def jac_explicit(d, y):
    if "quad" not in d:
        return d["A"]
    return np.stack([(d["quad"][i] + d["quad"][i].T) @ y + d["A"][i] for i in range(len(d["A"]))])


def test_registered_variants():
    for name in ("nonconvex_linear", "nonconvex_quadratic", "nonconvex_linear_100x50", "nonconvex_quadratic_100x70"):
        assert name in problem_names()
    assert problem_class("nonconvex_linear_100x70").paper_dims == (100, 70)
    assert problem_class("nonconvex_quadratic").paper_dims == (200, 150)


def test_generator_is_dc3s_stream_with_the_papers_input_range():
    data = generate_program("linear", 200, 150, 10_000)
    rs = np.random.RandomState(17)
    np.testing.assert_array_equal(data["q"], rs.random_sample(200))
    np.testing.assert_array_equal(data["p"], rs.random_sample(200))
    np.testing.assert_array_equal(data["A"], rs.normal(0, 1, (150, 200)))
    np.testing.assert_array_equal(data["X"], rs.uniform(-5, 5, (10_000, 150)))
    assert data["X"].min() >= -5 and data["X"].max() <= 5 and 4.99 < data["X"].max()
    quad = generate_program("quadratic", 12, 6, 50)
    rs = np.random.RandomState(17)
    for key, draw in [("q", rs.random_sample(12)), ("p", rs.random_sample(12)), ("A", rs.normal(0, 1, (6, 12)))]:
        np.testing.assert_array_equal(quad[key], draw)
    rs.uniform(-5, 5, (50, 6))
    G = rs.normal(0, 1, (6, 12, 12))
    np.testing.assert_array_equal(quad["quad"], (G + G.transpose(0, 2, 1)) / 2)
    np.testing.assert_array_equal(quad["d"], rs.normal(0, 1, 6))
    with pytest.raises(ValueError, match="Invalid kind"):
        generate_program("cubic", 12, 6, 50)


def test_splits_follow_dc3(tiny, cache):
    for p in tiny.values():
        data = generate_program(p.kind, 12, 6, 150)
        assert len(p.x_train) == int(150 * 0.8334) == 125 and len(p.x_test) == 150 - 125 - int(150 * 0.0833) == 13
        np.testing.assert_array_equal(p.x_train.numpy(), data["X"][:125])
        np.testing.assert_array_equal(p.x_test.numpy(), data["X"][137:])
    with pytest.raises(ValueError, match="Invalid dims"):
        NonconvexLinear("small", dims=(10, 10), cache_dir=cache)


@pytest.mark.parametrize("kind", KINDS)
def test_constraint_functions_match_explicit_formulas_and_autograd(kind, tiny):
    p = tiny[kind]
    d = numpy_program(p)
    oc = p.output_constraints()
    torch.manual_seed(0)
    x, y = p.x_test[:5], torch.randn(5, 12, dtype=torch.float64)
    ev = oc.evaluate(x, y)  # the structured (h, J) path the layers use
    expected = np.stack([h_explicit(d, x[b].numpy(), y[b].numpy()) for b in range(5)])
    np.testing.assert_allclose(ev.h.numpy(), expected, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(oc.h(x, y).numpy(), expected, rtol=1e-12, atol=1e-10)
    auto = torch.stack(
        [torch.autograd.functional.jacobian(lambda v, b=b: oc.h(x[b : b + 1], v[None])[0], y[b]) for b in range(5)]
    )
    torch.testing.assert_close(ev.h_jac, auto, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ev.h_jac[0].numpy(), jac_explicit(d, y[0].numpy()), rtol=1e-12, atol=1e-12)
    w = torch.randn(5, 6, dtype=torch.float64)
    hess = oc.lagrangian_hessian(x, y, w, None)
    auto_h = torch.stack(
        [
            torch.autograd.functional.hessian(lambda v, b=b: (oc.h(x[b : b + 1], v[None])[0] * w[b]).sum(), y[b])
            for b in range(5)
        ]
    )
    torch.testing.assert_close(hess, auto_h, rtol=1e-12, atol=1e-12)
    # The objective: f(y) = 1/2 y^T diag(q) y + p^T sin y.
    np.testing.assert_allclose(
        p.objective_values(y).numpy(), 0.5 * (d["q"] * y.numpy() ** 2).sum(1) + (d["p"] * np.sin(y.numpy())).sum(1)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quadratic_h_is_the_same_on_every_path(dtype, tiny):
    """C3's ``h`` alone, ``h`` beside ``J`` without a graph (``J`` written in place) and with one (autograd) are the
    same arithmetic: equal bit for bit; float32 within its rounding of the float64 explicit formula."""
    p = tiny["quadratic"]
    d = numpy_program(p)
    torch.manual_seed(1)
    x, y = p.x_test[:5].to(dtype), torch.randn(5, 12, dtype=dtype)
    h, J = p._h_and_jacobian(x, y)
    assert torch.equal(p._h(x, y), h)
    h_g, J_g = p._h_and_jacobian(x, y.clone().requires_grad_())
    assert J_g.requires_grad and torch.equal(h_g.detach(), h) and torch.equal(J_g.detach(), J)
    expected = np.stack([h_explicit(d, x[b].double().numpy(), y[b].double().numpy()) for b in range(5)])
    jac = np.stack([jac_explicit(d, y[b].double().numpy()) for b in range(5)])
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    scale = np.abs(expected).max()
    np.testing.assert_allclose(h.double().numpy(), expected, rtol=0, atol=rtol * scale)
    np.testing.assert_allclose(J.double().numpy(), jac, rtol=0, atol=rtol * np.abs(jac).max())


def random_feasible_points(d, x, count, rng):
    """Feasible points from N(0, 1) starts by least-norm Gauss-Newton steps on h = 0 (the test's own sampler)."""
    points = []
    for _ in range(count):
        y = rng.normal(size=len(d["q"]))
        for _ in range(30):
            y = y - np.linalg.pinv(jac_explicit(d, y)) @ h_explicit(d, x, y)
        if np.abs(h_explicit(d, x, y)).max() < 1e-9:
            points.append(y)
    return points


@pytest.mark.parametrize("kind", KINDS)
def test_references_are_feasible_kkt_points_and_local_minima(kind, tiny):
    p = tiny[kind]
    d = numpy_program(p)
    ref = p.reference
    assert np.isfinite(ref["objective"]).all() and p.reference_ok.all()
    rng = np.random.default_rng(1)
    for k, x in enumerate(p.x_test.numpy()):
        y = ref["y"][k]
        assert np.abs(h_explicit(d, x, y)).max() <= 1e-8  # feasible
        grad = d["q"] * y + d["p"] * np.cos(y)
        J = jac_explicit(d, y)
        lam = np.linalg.lstsq(J.T, -grad, rcond=None)[0]  # independent least-squares multipliers
        assert np.abs(grad + J.T @ lam).max() <= 1e-6 * max(1.0, np.abs(grad).max())  # stationarity
        # Second order: the Lagrangian's Hessian is positive semidefinite on the tangent space.
        H = np.diag(d["q"] - d["p"] * np.sin(y))
        if "quad" in d:
            H = H + sum(lam[i] * (d["quad"][i] + d["quad"][i].T) for i in range(len(lam)))
        Z = scipy.linalg.null_space(J)
        assert np.linalg.eigvalsh(Z.T @ H @ Z).min() >= -1e-7
        # Better than feasible points drawn independently.
        others = random_feasible_points(d, x, 8, rng)
        assert len(others) >= 4
        assert ref["objective"][k] <= min(0.5 * d["q"] @ z**2 + d["p"] @ np.sin(z) for z in others) + 1e-12


@pytest.mark.slow  # spawns a worker that imports torch (~5-10 s)
def test_reference_worker_processes_match_in_process(monkeypatch):
    data = generate_program("linear", 60, 20, 3)
    program = {k: data[k] for k in ("q", "p", "A")} | {"seed": 17}
    monkeypatch.setenv("SQPOPTIM_REFERENCE_PROCESSES", "0")
    local = solve_references(program, data["X"][:2], np.arange(2), starts=1, max_starts=1)
    monkeypatch.setenv("SQPOPTIM_REFERENCE_PROCESSES", "1")  # n > 50: a spawned single-thread worker
    spawned = solve_references(program, data["X"][:2], np.arange(2), starts=1, max_starts=1)
    np.testing.assert_allclose(spawned["y"], local["y"], rtol=1e-10, atol=1e-10)
    assert (local["violation"] <= 1e-8).all()


class Lookup(nn.Module):
    """Returns the reference solution of the nearest test input (one parameter so a graph exists)."""

    def __init__(self, p):
        super().__init__()
        self.x, self.y = p.x_test, p.y_ref
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x):
        return self.scale * self.y[torch.cdist(x, self.x).argmin(-1)]


@pytest.mark.parametrize("kind", KINDS)
def test_constraints_and_metrics(kind, tiny):
    p = tiny[kind]
    model = p.make_model(0)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [32, 32, 12]
    c = p.constraints(model)
    assert c.shape == (p.num_constraints,) == (4 * 6,) and c.grad_fn is not None
    torch.testing.assert_close(c, p.output_constraints().h(p.x_train[:4], model(p.x_train[:4])).reshape(-1))
    m = p.metrics(Lookup(p))
    assert m["objective"] == pytest.approx(p.reference["objective"].mean(), rel=1e-12)
    assert m["reference_objective"] == pytest.approx(p.reference["objective"].mean(), rel=1e-12)
    assert abs(m["optimality_gap"]) < 1e-12 and m["test_mse"] == 0 and m["test_max_violation"] <= 1e-8
    # On the raw network: the mean and max of |h| over all test instances and constraints.
    m = p.metrics(model)
    with torch.no_grad():
        viol = p.output_constraints().h(p.x_test, model(p.x_test)).abs()
    assert m["test_max_violation"] == pytest.approx(float(viol.max()), rel=1e-12)
    assert m["test_mean_violation"] == pytest.approx(float(viol.mean()), rel=1e-12)
    pred = p.prediction(model)
    assert np.all(np.diff(pred["u_true"]) >= 0) and pred["u_pred"].shape == (13,)
    with pytest.raises(ValueError, match="outputs of shape"):
        p.output_loss(p.x_train[:3], torch.zeros(3, 5))


LAYER_METHODS = {
    "linear": ["hardnet", "kkt-hardnet"],
    # Unrolled KKT-Hardnet produced non-finite gradients on this instance (unconverged Newton from raw outputs
    # far from the quadratic constraint set): the implicit gradient is what runs here (10 Newton steps: from
    # those outputs each step costs many backtracking trials).
    "quadratic": ["kkt-hardnet:gradient=implicit:max_iter=10", "enforce:mixed_precision=bfloat16"],
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_method_runs_through_the_runner(kind, tmp_path, cache):
    methods = ["adam-unc", "soft", "enforce", "enforce:activation=true", "hardnet-pp:max_iter=30", "sqp-adam"]
    for method in methods + LAYER_METHODS[kind]:
        spec = RunSpec(f"nonconvex_{kind}", method, lr=1e-3, batch="mini", iterations=2, size="tiny", eval_every=2)
        res = run(spec, tmp_path, cache_dir=cache, progress=False)
        assert res["status"] == "complete" and res["curves"]["iteration"] == [0, 2], method
        assert all(math.isfinite(v) for v in res["curves"]["objective"]), method
        assert set(res["final"]) >= {"objective", "reference_objective", "optimality_gap", "test_max_violation"}


@pytest.mark.parametrize("kind", KINDS)
def test_enforce_meets_the_inference_tolerance_after_training(kind, tmp_path, cache):
    spec = RunSpec(f"nonconvex_{kind}", "enforce", lr=1e-3, batch="mini", iterations=10, size="tiny", dtype="float64")
    final = run(spec, tmp_path, cache_dir=cache, progress=False)["final"]
    assert final["test_max_violation"] <= 1e-6 < final["raw_test_max_violation"]


@pytest.mark.parametrize("penalty", [0.0, 1e3])
def test_activation_rule_in_the_closure(penalty, tiny):
    """Alg. 2 against its definition: keep ŷ when one NP step worsens the loss measure, else project."""
    p = tiny["linear"]
    method = METHODS["enforce"]
    options = method.parse_options({"activation": True, "activation_penalty": penalty})
    training = method.setup(p, p.make_model(0), 1e-3, options)
    model = training.model
    batch = p.sample_batch(torch.Generator().manual_seed(0))
    loss, _ = training.closure(batch)()
    x = p.inputs(batch)
    with torch.no_grad():
        y_hat = model.backbone(x)
        y_tilde = model.layer(x, y_hat)  # linear constraints: one NP step is the exact projection

        def measure(y):
            return p.objective_values(y).mean() + penalty * p.output_constraints().h(x, y).norm(dim=-1).mean()

        worse = bool(measure(model.layer.np_step(x, y_hat)) > measure(y_hat))
    # Without a penalty the projection raises the objective (the raw output minimises f unconstrained);
    # with a large one the violation dominates and the projection is accepted.
    assert worse == (penalty == 0.0)
    expected = (
        p.objective_values(y_hat).mean()
        if worse
        else p.objective_values(y_tilde).mean() + 0.5 * (y_hat - y_tilde).square().sum(-1).mean()
    )
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="activation rule"):
        METHODS["hardnet-pp"].parse_options({"activation": True})


def test_paper_size_settings():
    """The paper's settings without building the paper-size data: dimensions, budget, batch, SQP constraints."""
    cls = problem_class("nonconvex_quadratic")
    assert cls.paper_dims == (200, 150) and cls.defaults.lrs == (1e-4,) and cls.defaults.iterations_mini == 42_000
    assert nonconvex.CONSTRAINT_INSTANCES["paper"] * 150 == 1500 and nonconvex.MINI_BATCH == 200
