"""E1–E3 (KKT-Hardnet's examples): the data against their defining equations, the closed-form Jacobians and
Hessians against torch.func, the metrics on exact models, the layers on the data, the runner's methods, and the
soft-weight and warm-start options of the layer methods."""

import numpy as np
import pytest
import scipy.integrate
import torch
from torch import nn

from problems import get_problem
from problems.methods import METHODS
from problems.output_tasks.kkt_examples import E3_BEST_FEASIBLE_MSE, e1_target, e2_target
from problems.runner import RunSpec, run
from sqpoptim.layers import HardNetAffine, HardNetPP, KKTHardNet, OutputConstraints

NAMES = ["kkt_e1", "kkt_e2", "kkt_e3"]


class Lookup(nn.Module):
    """A model returning ``fn(x)`` (a closed form), with one unused parameter so that it has parameters."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.dummy = fn, nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.fn(x) + 0 * self.dummy


def problem(name, cache, size="tiny"):
    return get_problem(name, size=size, dtype=torch.float64, cache_dir=cache)


def test_data_are_the_papers_functions_and_satisfy_the_constraints(cache):
    e1, e2, e3 = (problem(n, cache, "small") for n in NAMES)
    for p in (e1, e2, e3):
        assert p.x_train.shape[0] == 300 and p.x_val.shape[0] == 100
        x = torch.cat([p.x_train, p.x_val])
        assert x.min() >= 1.0 and x.max() <= 2.0
    x1 = torch.cat([e1.x_train, e1.x_val]).numpy()
    np.testing.assert_array_equal(torch.cat([e1.y_train, e1.y_val]).numpy(), e1_target(x1))
    np.testing.assert_array_equal(e2.y_train.numpy(), e2_target(e2.x_train.numpy()))
    # E1: (2x - 1)^3 = 8x^3 - 12x^2 + 6x - 1, so h vanishes up to rounding of terms of size ~70.
    assert e1.output_constraints().h(e1.x_train, e1.y_train).abs().max() < 1e-12
    assert e2.output_constraints().h(e2.x_train, e2.y_train).abs().max() < 1e-12
    # E3: y = x^2 > x on (1, 2]: every point violates y <= x.
    torch.testing.assert_close(e3.y_train, e3.x_train**2, rtol=0, atol=0)
    assert (e3.output_constraints().g(e3.x_train, e3.y_train) > 0).all()


def test_sizes_are_prefixes_and_data_are_deterministic(cache, tmp_path):
    tiny, small = problem("kkt_e1", cache), problem("kkt_e1", cache, "small")
    assert tiny.x_train.shape[0] == 48 and tiny.x_val.shape[0] == 16
    torch.testing.assert_close(tiny.x_train, small.x_train[:48], rtol=0, atol=0)
    again = get_problem("kkt_e1", size="tiny", dtype=torch.float64, cache_dir=tmp_path)  # regenerated
    torch.testing.assert_close(again.x_val, tiny.x_val, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_closed_form_jacobians_and_hessians_match_torch_func(name, cache):
    p = problem(name, cache)
    oc = p.output_constraints()
    generic = OutputConstraints(h=oc.h, g=oc.g, lower=oc.lower, upper=oc.upper)
    x = p.x_train
    y = 3 * torch.randn(x.shape[0], p.y_train.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b = oc.evaluate(x, y), generic.evaluate(x, y)
    torch.testing.assert_close(a.c_jac, b.c_jac, rtol=1e-14, atol=1e-14)
    w_h = torch.randn_like(a.h) if a.h is not None else None
    w_g = torch.randn_like(a.g) if a.g is not None else None
    torch.testing.assert_close(oc.lagrangian_hessian(x, y, w_h, w_g), generic.lagrangian_hessian(x, y, w_h, w_g))


def test_constraints_shape_and_graph(cache):
    for name in ("kkt_e1", "kkt_e2"):
        p = problem(name, cache)
        model = p.make_model(0)
        c = p.constraints(model)
        assert c.shape == (p.num_constraints,) == (8,)
        (g,) = torch.autograd.grad(c.sum(), model[-1].weight)
        assert g.abs().sum() > 0
        # c is h at the first k training inputs
        x = p.x_train[:8]
        torch.testing.assert_close(c, p.output_constraints().h(x, model(x)).reshape(-1))
    e3 = problem("kkt_e3", cache)
    assert e3.num_constraints == 0 and e3.constraints(e3.make_model(0)).shape == (0,)


def test_metrics_of_exact_and_best_feasible_models(cache):
    e1 = problem("kkt_e1", cache, "small")
    m = e1.metrics(Lookup(lambda x: torch.cat([8 * x**3 + 5, 2 * x - 1], dim=1)))
    # torch's and numpy's x**3 may differ in the last bit: outputs ~70 give squared errors of ~1e-28
    assert m["train_mse"] < 1e-26 and m["val_mse"] < 1e-26 and m["test_mse"] == m["val_mse"]
    assert m["val_violation"] < 1e-13 and m["test_max_violation"] < 1e-12 and m["max_abs_c"] < 1e-12
    e3 = problem("kkt_e3", cache, "small")
    exact = e3.metrics(Lookup(lambda x: x**2))
    x = e3.x_val
    # Eq. 27 with one inequality row: the mean of ReLU(x^2 - x); the max over points of the same
    assert exact["val_mse"] == 0
    assert exact["val_violation"] == pytest.approx(float((x**2 - x).mean()), rel=1e-14)
    assert exact["test_max_violation"] == pytest.approx(float((x**2 - x).max()), rel=1e-14)
    best = e3.metrics(Lookup(lambda x: x))
    assert best["val_violation"] == 0 and best["val_mse"] == pytest.approx(float(((x - x**2) ** 2).mean()))


def test_best_feasible_mse_of_e3_is_the_integral():
    value, _ = scipy.integrate.quad(lambda x: (x**2 - x) ** 2, 1.0, 2.0)
    assert E3_BEST_FEASIBLE_MSE == pytest.approx(value, rel=1e-14)


def test_layers_keep_feasible_data_and_project_e3_onto_y_equals_x(cache):
    for name in ("kkt_e1", "kkt_e2"):
        p = problem(name, cache)
        for layer in (KKTHardNet(p.output_constraints()), HardNetPP(p.output_constraints(), early_stop=True)):
            torch.testing.assert_close(layer.eval()(p.x_train, p.y_train), p.y_train, rtol=0, atol=1e-10)
    e3 = problem("kkt_e3", cache)
    # The projection of y = x^2 onto {y <= x} is y = x, for every layer that handles the inequality.
    oc = e3.output_constraints()
    for layer in (HardNetAffine(oc), KKTHardNet(oc), HardNetPP(oc, early_stop=True, tol=1e-12)):
        torch.testing.assert_close(layer.eval()(e3.x_train, e3.y_train), e3.x_train, rtol=0, atol=1e-10)


LAYER_METHODS = {
    # From the untrained network KKT-Hardnet stalls on E1's cubic (see sqpoptim.layers._kkt): 5 steps keep it fast
    "kkt_e1": ["enforce", "hardnet-pp:early_stop=true", "kkt-hardnet:max_iter=5"],
    "kkt_e2": ["hardnet", "enforce", "hardnet-pp:early_stop=true", "kkt-hardnet"],
    "kkt_e3": ["hardnet", "hardnet-pp:early_stop=true", "kkt-hardnet"],
}


@pytest.mark.parametrize("name", NAMES)
def test_methods_run_through_the_runner(name, cache, tmp_path):
    methods = ["adam-unc", "soft", *LAYER_METHODS[name]] + (["sqp-adam"] if name != "kkt_e3" else [])
    for method in methods:
        spec = RunSpec(name, method, lr=1e-3, batch="mini", iterations=2, size="tiny", dtype="float64", eval_every=1)
        res = run(spec, tmp_path, cache_dir=cache, progress=False)
        assert res["status"] == "complete" and res["curves"]["iteration"] == [0, 1, 2], method
        f = res["final"]
        assert np.isfinite(f["objective"]) and {"val_mse", "val_violation", "test_max_violation"} <= set(f)
        if method.split(":")[0] in ("hardnet", "enforce", "hardnet-pp", "kkt-hardnet") and name != "kkt_e1":
            assert f["test_max_violation"] < 1e-8, method  # affine constraints: exact after the layer
    with pytest.raises(ValueError, match="equalities only"):
        run(RunSpec("kkt_e3", "enforce", lr=1e-3, iterations=1, size="tiny"), tmp_path, cache_dir=cache)


def _setup(method, problem, options):
    m = METHODS[method]
    return m.setup(problem, problem.make_model(0), 1e-3, m.parse_options(options))


def test_soft_weight_defaults_to_the_papers_and_can_be_overridden(cache):
    p = problem("kkt_e1", cache)
    assert _setup("soft", p, {}).settings["rho"] == 100.0
    assert _setup("soft", p, {"rho": 3.0}).settings["rho"] == 3.0
    pool = get_problem("pooling", size="tiny", dtype=torch.float64, cache_dir=cache)
    assert _setup("soft", pool, {}).settings["rho"] == 1.0
    # ... and the loss is the task loss plus that weight times the mean squared violation
    training = _setup("soft", p, {"rho": 3.0})
    batch = p.sample_batch(torch.Generator().manual_seed(0))
    x = p.inputs(batch)
    loss, _ = training.closure(batch)()
    with torch.no_grad():
        y = training.model(x)
        ev = p.output_constraints().evaluate(x, y, jacobian=False)
        bounds = p.output_constraints().bounds(x, ev.g) if ev.g is not None else (None, None)
        r = p.output_constraints().residual(ev, *bounds)
        expected = p.output_loss(x, y, batch) + 3.0 * r.square().sum(-1).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)


def test_warm_start_trains_the_backbone_alone_above_eta(cache):
    p = problem("kkt_e2", cache)
    batch = p.sample_batch(torch.Generator().manual_seed(0))
    x = p.inputs(batch)
    with torch.no_grad():
        raw = float(p.output_loss(x, p.make_model(0)(x), batch))
    for eta, layer_on in ((0.5 * raw, False), (2 * raw, True)):
        training = _setup("kkt-hardnet", p, {"eta": eta})
        model = training.model
        loss, _ = training.closure(batch)()
        expected = p.output_loss(x, model(x) if layer_on else model.backbone(x), batch)
        assert float(loss) == pytest.approx(float(expected), rel=1e-12)
        assert (abs(float(loss) - raw) < 1e-12 * raw) is not layer_on
    off = _setup("kkt-hardnet", p, {})
    assert off.settings["eta"] is None
    for bad in (-1.0, 0.0, "high"):
        with pytest.raises(ValueError, match="eta"):
            _setup("kkt-hardnet", p, {"eta": bad})
