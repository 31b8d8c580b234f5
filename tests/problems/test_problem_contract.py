"""The :class:`problems.Problem` contract, checked on every problem of the catalogue at size ``tiny`` in float32
and float64 (and against the CPU on CUDA where a device is present). What only one problem has lives in its
own test file; what every problem must do lives here, once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from problems import get_problem, problem_class, problem_names

BASE_METRICS = {"objective", "test_mse", "max_abs_c"}


@dataclass(frozen=True)
class Expect:
    """What a problem's tiny instance must give beyond the contract: exact metric keys (``None``: at least the
    base three), exact prediction keys and shapes, and whether its batched objective back-propagates to every
    parameter."""

    metrics: frozenset[str] | None = None
    prediction: dict[str, tuple[int, ...]] = field(default_factory=dict)
    prediction_keys: frozenset[str] | None = None
    grads_everywhere: bool = False
    complex_parameters: bool = False
    """The model has complex parameters beside the real ones (the Fourier neural operator)."""


CATALOGUE: dict[str, Expect] = {
    "spring": Expect(
        metrics=frozenset(BASE_METRICS),
        prediction={"t": (1000,), "u_true": (1000,), "u_pred": (1000,), "t_constraint": (3,)},
        prediction_keys=frozenset({"t", "u_true", "u_pred", "t_fit", "u_fit", "t_constraint"}),
    ),
    "chemistry": Expect(
        metrics=frozenset(BASE_METRICS),
        prediction={"t_data": (64,)},
        grads_everywhere=True,
    ),
    "burgers": Expect(prediction={"u_true": (32, 32), "u_pred": (32, 32), "x": (32,), "t": (32,)}),
    "darcy": Expect(prediction={"u_true": (16, 16), "u_pred": (16, 16), "nu": (16, 16)}, complex_parameters=True),
    "manifold_toy": Expect(
        metrics=frozenset({*BASE_METRICS, "max_manifold_violation"}),
        prediction={"y_pred": (1000, 2), "y_true": (1000, 2), "x_constraint": (16,)},
    ),
}
NAMES = problem_names()
PREDICTION_KEYS = {"series": {"t", "u_true", "u_pred"}, "field": {"u_true", "u_pred"}, "manifold": {"y_pred"}}


def test_the_catalogue_is_the_registry():
    assert set(CATALOGUE) <= set(NAMES) and len(NAMES) == len(set(NAMES)) == 18


@pytest.fixture(scope="module")
def instances(cache):
    made: dict[tuple[str, torch.dtype], Any] = {}

    def get(name: str, dtype: torch.dtype, device: str = "cpu"):
        key = (name, dtype, device)
        if key not in made:
            made[key] = get_problem(name, size="tiny", dtype=dtype, device=device, cache_dir=cache)
        return made[key]

    return get


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex64 if dtype == torch.float32 else torch.complex128


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_training_terms_in_both_dtypes(name, dtype, instances):
    p = instances(name, dtype)
    expect = CATALOGUE.get(name, Expect())
    model = p.make_model(0)
    dtypes = {q.dtype for q in model.parameters()}
    assert dtypes == ({dtype, _complex(dtype)} if expect.complex_parameters else {dtype})
    batch = p.sample_batch(torch.Generator().manual_seed(0))
    f = p.objective(model, batch)
    assert f.dtype == dtype and f.dim() == 0 and torch.isfinite(f)
    full = p.objective(model)
    assert full.dtype == dtype and full.dim() == 0 and torch.isfinite(full)
    c = p.constraints(model)
    assert c.dtype == dtype and c.shape == (p.num_constraints,) and torch.isfinite(c).all()
    grads = torch.autograd.grad(f, list(model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in grads)  # a graph to the parameters
    if expect.grads_everywhere:
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_models_are_seeded_and_the_same_function_in_both_precisions(name, instances):
    p32, p64 = instances(name, torch.float32), instances(name, torch.float64)
    a, b, other = p64.make_model(0), p64.make_model(0), p64.make_model(1)
    pairs = list(zip(a.parameters(), b.parameters(), other.parameters()))
    assert all(torch.equal(x, y) for x, y, _ in pairs) and not all(torch.equal(x, z) for x, _, z in pairs)
    for x32, x64 in zip(p32.make_model(0).parameters(), a.parameters()):
        torch.testing.assert_close(x32.to(x64.dtype), x64, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_batches_are_deterministic_and_bad_ones_name_the_problem(name, instances):
    p = instances(name, torch.float64)
    a, b = (p.sample_batch(torch.Generator().manual_seed(3)) for _ in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = p.make_model(0)
    with pytest.raises(ValueError, match=name):
        p.objective(model, {"no such key": torch.arange(2)})
    with pytest.raises(ValueError, match="size"):
        problem_class(name)("huge", cache_dir=p.cache_dir)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_metrics_prediction_and_description(name, dtype, instances):
    p = instances(name, dtype)
    expect = CATALOGUE.get(name, Expect())
    model = p.make_model(0)
    metrics = p.metrics(model)
    assert metrics.keys() >= BASE_METRICS and all(isinstance(v, float) for v in metrics.values())
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    if expect.metrics is not None:
        assert set(metrics) == expect.metrics
    pred = p.prediction(model)
    assert set(pred) >= PREDICTION_KEYS[p.prediction_kind] and all(isinstance(v, np.ndarray) for v in pred.values())
    if expect.prediction_keys is not None:
        assert set(pred) == expect.prediction_keys
    for key, shape in expect.prediction.items():
        assert pred[key].shape == shape, key
    if p.prediction_kind == "series":
        assert pred["u_pred"].reshape(len(pred["t"]), -1).shape == np.atleast_2d(pred["u_true"].T).T.shape
    if p.prediction_kind == "field":
        assert pred["u_pred"].shape == pred["u_true"].shape and pred["u_true"].ndim == 2
    described = p.describe()
    assert described["problem"] == name and described["num_constraints"] == p.num_constraints
    assert described["prediction_kind"] == p.prediction_kind


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name, instances):
    cpu, gpu = instances(name, torch.float64), instances(name, torch.float64, "cuda")
    m_cpu, m_gpu = cpu.make_model(0), gpu.make_model(0)
    assert all(q.device.type == "cuda" for q in m_gpu.parameters())
    batch = cpu.sample_batch(torch.Generator().manual_seed(0))
    torch.testing.assert_close(gpu.objective(m_gpu, batch).cpu(), cpu.objective(m_cpu, batch))
    c = gpu.constraints(m_gpu)
    torch.testing.assert_close(c.cpu(), cpu.constraints(m_cpu))
    if c.numel():
        eye = torch.eye(c.numel(), dtype=torch.float64, device="cuda")
        params = list(m_gpu.parameters())
        J = torch.autograd.grad(c, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        assert all(j is None or j.device.type == "cuda" for j in J)
    on_cpu, on_gpu = cpu.metrics(m_cpu), gpu.metrics(m_gpu)
    assert on_gpu.keys() == on_cpu.keys()
    for key, value in on_gpu.items():
        if not key.startswith("time_"):  # timings differ; every other metric is the same number
            assert abs(value - on_cpu[key]) <= 1e-10 * max(1.0, abs(on_cpu[key])), key
