r"""A small two-dimensional Fourier neural operator (Li et al. 2021) over ``torch.fft``.

.. math::

    v_0 = Q_{\uparrow}(a), \qquad v_{l+1} = \sigma\bigl(\mathcal F^{-1}(R_l \cdot \mathcal F v_l) + b_l
    + W_l v_l\bigr) \ (l = 0..L-1,\ \text{no } \sigma \text{ after the last layer}), \qquad
    u = Q_{\downarrow}(v_L),

with :math:`\mathcal F` the real 2-D FFT, :math:`R_l` complex weights on the retained modes (zero elsewhere),
:math:`W_l` a pointwise linear skip without bias, :math:`\sigma` = GELU, and lifting/projection
:math:`Q_{\uparrow}, Q_{\downarrow}` pointwise two-layer MLPs (GELU). This mirrors the layout of neuralop
0.3's ``FNO`` (lifting and projection with 256 hidden channels, linear skips, bias in the spectral
convolution, no normalisation), the model behind the SQP paper's Darcy experiment (004 §5.4); the code is our
own.

Modes follow neuralop's convention: ``modes=(m1, m2)`` keeps the frequencies ``-m1/2 .. m1/2 - 1`` along
the first axis and the first ``m2//2 + 1`` rfft coefficients along the last. For a 16 × 16 grid, ``(16, 16)``
keeps all 16 × 9 rfft2 coefficients, so each spectral layer is a general circular convolution there, and the
same weights apply to any finer grid (the discretisation-invariance of the FNO).

Parameter count of the paper's configuration (``FNO(3, 1, width=4, modes=(16, 16), n_layers=4)``): counting a
complex weight as two real numbers (as neuralop's ``count_model_params`` does, and as the optimizer sees them)
gives lifting 3·256+256+256·4+4 = 2,052, per layer 2·4·4·16·9 + 4 (bias) + 16 (skip) = 4,628, projection
4·256+256+256+1 = 1,537: 2,052 + 4·4,628 + 1,537 = **22,101**, the paper's number. ``sum(p.numel())`` counts a
complex entry once and gives 12,885. See :func:`real_parameter_count`.

The spectral weights are complex ``nn.Parameter`` s (complex64 beside float32, complex128 beside float64).
``Module.to(torch.float64)`` would silently drop their imaginary parts, so :class:`FNO` overrides ``to``,
``float`` and ``double`` to map a real dtype to the matching complex dtype for complex parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FNO", "SpectralConv2d", "real_parameter_count"]

_COMPLEX = {torch.float16: torch.complex32, torch.float32: torch.complex64, torch.float64: torch.complex128}


def real_parameter_count(module: nn.Module) -> int:
    """Number of real degrees of freedom: a complex entry counts twice."""
    return sum(p.numel() * (2 if p.is_complex() else 1) for p in module.parameters())


class SpectralConv2d(nn.Module):
    """Spectral convolution on channels-last grids: ``[B, H, W, C_in] -> [B, H, W, C_out]``.

    ``y = irfft2(R · rfft2(x))`` on the retained modes (see the module docstring) plus a real bias per
    channel.
    Weights ``R [C_in, C_out, m1, m2//2 + 1]`` are complex, initialised ``N(0, 2/(C_in + C_out))`` (complex
    normal, neuralop's default scale).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        modes: tuple[int, int] = (16, 16),
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        m1, m2 = modes
        if m1 < 2 or m1 % 2 or m2 < 1:
            raise ValueError(f"SpectralConv2d: modes must be (even m1 >= 2, m2 >= 1), got {modes}")
        if dtype not in _COMPLEX:
            raise TypeError(f"SpectralConv2d: dtype must be a real floating dtype, got {dtype}")
        self.modes = (m1, m2)
        self.kept = (m1, m2 // 2 + 1)  # retained rfft2 coefficients per axis
        std = (2.0 / (in_channels + out_channels)) ** 0.5
        self.weight = nn.Parameter(
            std * torch.randn(in_channels, out_channels, *self.kept, dtype=_COMPLEX[dtype], device=device)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        k1, k2 = self.kept
        if h < k1 or w // 2 + 1 < k2:
            raise ValueError(f"SpectralConv2d: grid {h}x{w} is too coarse for modes {self.modes}")
        x_hat = torch.fft.rfft2(x, dim=(1, 2))  # [B, H, W//2+1, C_in]
        half = k1 // 2
        kept = torch.cat([x_hat[:, :half, :k2], x_hat[:, h - half :, :k2]], dim=1)  # [B, k1, k2, C_in]
        y_kept = torch.einsum("bxyi,ioxy->bxyo", kept, self.weight)  # [B, k1, k2, C_out]
        c_out = y_kept.shape[-1]
        # Zeros for the modes that are not retained (none on a grid that the modes cover exactly).
        rows = torch.cat([y_kept[:, :half], y_kept.new_zeros(b, h - k1, k2, c_out), y_kept[:, half:]], dim=1)
        y_hat = torch.cat([rows, rows.new_zeros(b, h, w // 2 + 1 - k2, c_out)], dim=2)  # [B, H, W//2+1, C_out]
        return torch.fft.irfft2(y_hat, s=(h, w), dim=(1, 2)) + self.bias


class FNO(nn.Module):
    """Fourier neural operator ``[B, C_in, H, W] -> [B, C_out, H, W]`` (see the module docstring)."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        *,
        width: int = 4,
        modes: tuple[int, int] = (16, 16),
        n_layers: int = 4,
        lifting_channels: int = 256,
        projection_channels: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if n_layers < 1 or width < 1:
            raise ValueError(f"FNO: need n_layers >= 1 and width >= 1, got {n_layers}, {width}")
        kw = {"device": device, "dtype": dtype}
        self.lifting = nn.Sequential(
            nn.Linear(in_channels, lifting_channels, **kw),
            nn.GELU(),
            nn.Linear(lifting_channels, width, **kw),
        )
        self.spectral = nn.ModuleList(SpectralConv2d(width, width, modes, **kw) for _ in range(n_layers))
        self.skips = nn.ModuleList(nn.Linear(width, width, bias=False, **kw) for _ in range(n_layers))
        self.projection = nn.Sequential(
            nn.Linear(width, projection_channels, **kw),
            nn.GELU(),
            nn.Linear(projection_channels, out_channels, **kw),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"FNO: expected input [B, C, H, W], got shape {tuple(x.shape)}")
        v = self.lifting(x.movedim(1, -1))  # [B, H, W, width]
        for l, (spectral, skip) in enumerate(zip(self.spectral, self.skips)):
            v = spectral(v) + skip(v)
            if l < len(self.spectral) - 1:
                v = F.gelu(v)
        return self.projection(v).movedim(-1, 1)  # [B, C_out, H, W]

    # Module.to / float / double cast complex parameters to a *real* dtype (dropping the imaginary part);
    # here a real target dtype maps to the matching complex dtype for complex tensors.
    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None or dtype not in _COMPLEX:
            return super().to(*args, **kwargs)
        return self._cast(dtype, device, non_blocking)

    def float(self):
        return self._cast(torch.float32)

    def double(self):
        return self._cast(torch.float64)

    def _cast(self, dtype: torch.dtype, device=None, non_blocking: bool = False):
        def convert(t: Tensor) -> Tensor:
            if t.is_complex():
                return t.to(device, _COMPLEX[dtype], non_blocking)
            return t.to(device, dtype if t.is_floating_point() else None, non_blocking)

        return self._apply(convert)
