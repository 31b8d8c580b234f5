"""The Fourier neural operator: the paper's parameter count, mode bookkeeping against numpy FFT filters,
translation equivariance, discretisation invariance, complex dtypes, and gradcheck in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from problems.core.fno import FNO, SpectralConv2d, real_parameter_count


def test_parameter_count_of_the_paper_configuration():
    model = FNO(3, 1, width=4, modes=(16, 16), n_layers=4)
    assert real_parameter_count(model) == 22_101  # the paper's (neuralop) count, complex entries twice
    assert sum(p.numel() for p in model.parameters()) == 12_885  # complex entries once
    assert all(s.weight.shape == (4, 4, 16, 9) for s in model.spectral)


@pytest.mark.parametrize(
    ("dtype", "complex_dtype"), [(torch.float32, torch.complex64), (torch.float64, torch.complex128)]
)
def test_shapes_and_dtypes(dtype, complex_dtype):
    model = FNO(3, 2, width=4, modes=(16, 16), n_layers=2, lifting_channels=8, projection_channels=8, dtype=dtype)
    assert all(s.weight.dtype == complex_dtype and s.weight.is_leaf for s in model.spectral)
    assert all(p.dtype == dtype for n, p in model.named_parameters() if not p.is_complex())
    for shape in [(16, 16), (32, 32), (16, 24)]:  # any grid the modes fit in
        y = model(torch.randn(5, 3, *shape, dtype=dtype))
        assert y.shape == (5, 2, *shape) and y.dtype == dtype


def test_real_dtype_casts_keep_the_imaginary_parts():
    model = FNO(3, 1, width=2, modes=(4, 4), n_layers=1, lifting_channels=4, projection_channels=4)
    w = model.spectral[0].weight.detach().clone()
    for cast in (lambda m: m.to(torch.float64), lambda m: m.double(), lambda m: m.to("cpu", torch.float64)):
        cast(model)
        assert model.spectral[0].weight.dtype == torch.complex128
        torch.testing.assert_close(model.spectral[0].weight.detach(), w.to(torch.complex128))
        assert model.lifting[0].weight.dtype == torch.float64
        model.float()
        assert model.spectral[0].weight.dtype == torch.complex64
        torch.testing.assert_close(model.spectral[0].weight.detach(), w)


def _identity_weights(conv):
    with torch.no_grad():
        eye = torch.eye(conv.weight.shape[0], dtype=conv.weight.dtype)
        conv.weight.copy_(eye[:, :, None, None].expand_as(conv.weight))
    return conv


def test_mode_bookkeeping_against_numpy_filters():
    """Identity weights make the layer a projection onto the retained modes: all modes when they cover the
    grid (identity), a low-pass filter otherwise (frequencies −m1/2..m1/2−1 × 0..m2/2 in rfft terms)."""
    x = torch.randn(2, 16, 16, 3, dtype=torch.float64)
    full = _identity_weights(SpectralConv2d(3, 3, (16, 16), dtype=torch.float64))
    torch.testing.assert_close(full(x), x, rtol=1e-12, atol=1e-12)

    low = _identity_weights(SpectralConv2d(3, 3, (4, 4), dtype=torch.float64))
    x_hat = np.fft.rfft2(x.numpy(), axes=(1, 2))
    freq_rows = np.fft.fftfreq(16, 1 / 16)
    keep = ((freq_rows >= -2) & (freq_rows <= 1))[:, None] & (np.arange(9) <= 2)[None, :]  # [16, 9]
    expected = np.fft.irfft2(x_hat * keep[None, :, :, None], s=(16, 16), axes=(1, 2))
    np.testing.assert_allclose(low(x).detach().numpy(), expected, atol=1e-12)


def test_spectral_conv_is_translation_equivariant():
    conv = SpectralConv2d(3, 2, (8, 8), dtype=torch.float64)
    x = torch.randn(2, 16, 16, 3, dtype=torch.float64)
    shifted = conv(torch.roll(x, shifts=(3, -5), dims=(1, 2)))
    torch.testing.assert_close(shifted, torch.roll(conv(x), shifts=(3, -5), dims=(1, 2)), rtol=1e-12, atol=1e-12)


def test_spectral_conv_is_discretisation_invariant():
    """A band-limited function sampled on 16² and on 32² gives the same output at the shared nodes."""
    conv = SpectralConv2d(2, 3, (16, 16), dtype=torch.float64)
    rng = np.random.default_rng(0)
    coef = rng.standard_normal((2, 7, 7, 2))  # channels × modes (kx, ky ≤ 6) × (cos, sin)

    def sample(n):
        g = np.arange(n) / n
        kx, ky = np.arange(7)[:, None, None, None], np.arange(7)[None, :, None, None]
        phase = 2 * np.pi * (kx * g[None, None, :, None] + ky * g[None, None, None, :])  # [7, 7, n, n]
        f = np.einsum("ckl,klxy->cxy", coef[..., 0], np.cos(phase)) + np.einsum(
            "ckl,klxy->cxy", coef[..., 1], np.sin(phase)
        )
        return torch.as_tensor(f).permute(1, 2, 0)[None]  # [1, n, n, 2]

    coarse, fine = conv(sample(16)), conv(sample(32))
    torch.testing.assert_close(fine[:, ::2, ::2], coarse, rtol=1e-10, atol=1e-10)


def test_gradcheck_tiny_fno_float64():
    torch.manual_seed(0)
    model = FNO(
        2,
        1,
        width=2,
        modes=(4, 4),
        n_layers=2,
        lifting_channels=3,
        projection_channels=3,
        dtype=torch.float64,
    )
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert any(p.is_complex() for p in params)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return functional_call(model, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="SpectralConv2d"):
        SpectralConv2d(2, 2, (5, 4))
    with pytest.raises(TypeError, match="SpectralConv2d"):
        SpectralConv2d(2, 2, (4, 4), dtype=torch.complex64)
    with pytest.raises(ValueError, match="too coarse"):
        SpectralConv2d(2, 2, (16, 16))(torch.randn(1, 8, 8, 2))
    with pytest.raises(ValueError, match="FNO"):
        FNO(3, 1)(torch.randn(3, 16, 16))
