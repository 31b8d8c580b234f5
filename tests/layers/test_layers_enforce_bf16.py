"""EnforceProjection(mixed_precision="bfloat16"): bfloat16 NP steps far from the set, then float32 and float64."""

import platform
import warnings

import pytest
import torch
from layer_cases import F64, quadratic_instance

from sqpoptim.layers import EnforceProjection, OutputConstraints
from sqpoptim.layers._bf16_np import EPS, bf16_np, native_bfloat16
from sqpoptim.layers._mixed_np import _Evaluator

EPS32 = torch.finfo(torch.float32).eps


def _far_instance(B=16, n=40, m=25, scale=0.05, seed=0):
    """The quadratic family from raw outputs near 0, as an untrained backbone gives them (far from the set)."""
    h, h_jac, x, _, _ = quadratic_instance(B=B, n=n, m=m, seed=seed)
    y_hat = scale * torch.randn(B, n, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    return h, h_jac, OutputConstraints(h=h, h_jac=h_jac), x, y_hat


def _float32_np_steps(h_jac, x, y, k):
    """``k`` float32 NP steps added to a float64 iterate, with a dense solve of the Gram system."""
    for _ in range(k):
        c, J = h_jac(x.float(), y.float())
        w = torch.linalg.solve(J @ J.mT, c)
        y = y - (w[:, None, :] @ J).squeeze(1).double()
    return y


@pytest.mark.parametrize("dims", [(40, 25), (60, 40)])
def test_bfloat16_steps_retrace_the_float32_path(dims):
    n, m = dims
    h, h_jac, cons, x, y_hat = _far_instance(n=n, m=m)
    y, steps = bf16_np(_Evaluator(cons, x).jacobian_bf16, y_hat, max_iter=100)
    assert steps >= 3  # far from the set, several steps are taken before bfloat16 stops resolving progress
    y32 = _float32_np_steps(h_jac, x, y_hat, steps)
    # Measured 3-4 % after 4-5 steps; the NP map itself moves its iterates by that much when y_hat is rounded.
    assert float((y - y32).norm() / y32.norm()) <= 0.1
    assert float(h(x, y).abs().mean()) <= 0.6 * float(h(x, y_hat).abs().mean())


def test_a_sample_leaves_at_its_bfloat16_floor():
    _, h_jac, cons, x, y_hat = _far_instance()
    y, steps = bf16_np(_Evaluator(cons, x).jacobian_bf16, y_hat, max_iter=100)
    # At the end at least half of the samples are at or below their floor, measured as the phase measures it.
    c, J = h_jac(x.bfloat16(), y.bfloat16())
    floor = EPS * torch.linalg.vector_norm(J.float(), dim=-1).amax(-1) * torch.linalg.vector_norm(y, dim=-1)
    assert 2 * int((c.float().abs().amax(-1) <= floor).sum()) >= len(y)
    # ... and one step earlier more than half were above it (the phase did not stop late or early).
    y_prev, _ = bf16_np(_Evaluator(cons, x).jacobian_bf16, y_hat, max_iter=steps - 1)
    c, J = h_jac(x.bfloat16(), y_prev.bfloat16())
    floor = EPS * torch.linalg.vector_norm(J.float(), dim=-1).amax(-1) * torch.linalg.vector_norm(y_prev, dim=-1)
    assert 2 * int((c.float().abs().amax(-1) > floor).sum()) >= len(y)


def test_samples_below_their_floor_stay_put_bit_for_bit():
    h, h_jac, x, y_star, _ = quadratic_instance(B=10, n=40, m=25, seed=3)
    cons = OutputConstraints(h=h, h_jac=h_jac)
    far = 0.05 * torch.randn(6, 40, dtype=F64, generator=torch.Generator().manual_seed(4))
    y_in = torch.cat([y_star[:4], far])
    y, steps = bf16_np(_Evaluator(cons, x).jacobian_bf16, y_in, max_iter=100)
    assert steps >= 2
    assert torch.equal(y[:4], y_in[:4])
    assert bool(((y[4:] - y_in[4:]).norm(dim=-1) > 0.1).all())


def test_a_start_near_the_set_takes_no_bfloat16_step():
    h, h_jac, x, _, y_hat = quadratic_instance(B=12, n=40, m=25, noise=1e-3, seed=0)
    cons = OutputConstraints(h=h, h_jac=h_jac)
    y, steps = bf16_np(_Evaluator(cons, x).jacobian_bf16, y_hat, max_iter=100)
    assert steps == 0 and torch.equal(y, y_hat)
    for training in (True, False):
        runs = [
            EnforceProjection(cons, eval_tol=1e-10, mixed_precision=mp).train(training).project(x, y_hat)
            for mp in (True, "bfloat16")
        ]
        assert torch.equal(runs[0].y, runs[1].y) and runs[0].iterations == runs[1].iterations


def test_a_singular_factor_leaves_the_sample_to_float32():
    # Two identical constraint rows: every Gram matrix is singular, to bfloat16's accuracy and to any other.
    gen = torch.Generator().manual_seed(5)
    n = 10
    a = torch.randn(3, n, dtype=F64, generator=gen)
    a[1] = a[0]

    def h_jac(x, y):
        aa = a.to(y)
        return y @ aa.T + 0.05 * (y * y).sum(-1, keepdim=True) - x.to(y), aa + 0.1 * y[:, None, :]

    cons = OutputConstraints(h=lambda x, y: h_jac(x, y)[0], h_jac=h_jac)
    y_star = 3 * torch.randn(4, n, dtype=F64, generator=gen)
    x = h_jac(torch.zeros(4, 3, dtype=F64), y_star)[0]
    y_hat = 0.01 * torch.randn(4, n, dtype=F64, generator=gen)
    y, _ = bf16_np(_Evaluator(cons, x).jacobian_bf16, y_hat, max_iter=100)
    assert torch.equal(y, y_hat)
    out = EnforceProjection(cons, eval_tol=1e-9, mixed_precision="bfloat16").eval().project(x, y_hat)
    assert bool(out.converged.all()) and float(cons.h(x, out.y).abs().max()) <= 1e-9


@pytest.mark.parametrize("scale", [0.05, 0.2])
def test_the_layer_meets_its_tolerances_in_float64_terms(scale):
    h, h_jac, cons, x, y_hat = _far_instance(scale=scale)
    res = EnforceProjection(cons, eval_tol=1e-10, mixed_precision="bfloat16").eval().project(x, y_hat)
    assert res.y.dtype == F64 and bool(res.converged.all())
    assert float(h(x, res.y).abs().max()) <= 1e-10  # evaluated independently, in float64
    layer = EnforceProjection(cons, mixed_precision="bfloat16").train()
    res = layer.project(x, y_hat)
    # Training stops on float32 values of c (see the float32 layer's test): within the float32 floor.
    _, B = h_jac(x, res.y)
    floor = EPS32 * torch.linalg.vector_norm(B, dim=-1).amax(-1) * torch.linalg.vector_norm(res.y, dim=-1)
    assert float(h(x, res.y).abs().mean()) <= layer.train_tol + float(floor.max())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mixed_precision": "float16"}, "Invalid mixed_precision"),
        ({"mixed_precision": "bfloat16", "solve_dtype": torch.float32}, "mixed_precision='bfloat16' needs"),
        ({"mixed_precision": "bfloat16", "jacobian": "broyden"}, "mixed_precision='bfloat16' needs"),
    ],
)
def test_refuses_settings_it_cannot_honour(kwargs, match):
    *_, cons, _, _ = _far_instance()
    with pytest.raises(ValueError, match=match):
        EnforceProjection(cons, **kwargs)


def test_a_residual_growing_twice_running_ends_the_phase():
    # Affine constraints whose evaluation carries noise far above the bfloat16 floor (large terms that cancel do
    # this): each step lands where the last noise put it, so |c| wanders at the noise level and the floor never
    # ends the phase; the safeguard must, long before max_iter.
    gen = torch.Generator().manual_seed(7)
    A = torch.randn(6, 12, dtype=F64, generator=gen)
    b = torch.randn(16, 6, dtype=F64, generator=gen)

    def noisy(y_bf16):
        y = y_bf16.double()
        c = y @ A.T - b + torch.rand(b.shape, dtype=F64, generator=gen) - 0.5  # noise 0.5 against a floor ~0.01
        return c.to(torch.bfloat16), A.to(torch.bfloat16).expand(len(y), -1, -1)

    _, steps = bf16_np(noisy, torch.zeros(16, 12, dtype=F64), max_iter=100)
    assert steps <= 10


@pytest.mark.parametrize("native", [False, True, None])
def test_warns_where_the_cpu_emulates_bfloat16(monkeypatch, native):
    import sqpoptim.layers._enforce as enforce

    monkeypatch.setattr(enforce, "native_bfloat16", lambda device: native)
    *_, cons, x, y_hat = _far_instance()
    layer = EnforceProjection(cons, eval_tol=1e-9, mixed_precision="bfloat16").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x, y_hat)
    slow = [w for w in caught if "without native bfloat16" in str(w.message)]
    assert len(slow) == (1 if native is False else 0)
    if slow:  # attributed to the caller's line, not to the package
        assert slow[0].filename == __file__ and issubclass(slow[0].category, UserWarning)
    # the warning changes nothing: the same output as where bfloat16 is native
    monkeypatch.setattr(enforce, "native_bfloat16", lambda device: True)
    assert torch.equal(layer(x, y_hat), y)
    with warnings.catch_warnings():  # mixed_precision=True never warns
        warnings.simplefilter("error")
        monkeypatch.setattr(enforce, "native_bfloat16", lambda device: False)
        EnforceProjection(cons, eval_tol=1e-9, mixed_precision=True).eval()(x, y_hat)


def test_the_native_bfloat16_probe(monkeypatch):
    assert native_bfloat16(torch.device("meta")) is True  # other devices: decided by their own kernels
    on_x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    if on_x86:
        expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        assert native_bfloat16(torch.device("cpu")) is expected
    else:
        assert native_bfloat16(torch.device("cpu")) is None
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert native_bfloat16(torch.device("cpu")) is (bf16 or amx)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert native_bfloat16(torch.device("cpu")) is None  # no probe: unknown, no warning
