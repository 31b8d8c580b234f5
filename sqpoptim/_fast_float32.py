r"""Float32 matrix products at bfloat16 speed where they keep float32's accuracy (oneDNN on the CPU).

PyTorch (2.9 and later) lets oneDNN compute float32 matrix products with bfloat16 arithmetic inside
(``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``). On a CPU with native bfloat16 instructions
(AVX512-BF16, AMX) the result can keep float32's accuracy at about twice float32's speed: the accuracy measured
below is that of a split of each operand into bfloat16 parts whose cross products are summed in float32 (the
"bf16x3" scheme, :math:`a = a_1 + a_2 + O(2^{-16} a)`, :math:`ab \approx a_1 b_1 + a_1 b_2 + a_2 b_1`), not of
a plain bfloat16 product; oneDNN does not document which it uses. Measured on this package's CPU benchmark
machine (AMD EPYC with AVX512-BF16, one thread, torch 2.13), against float64 products, as the largest
componentwise error over :math:`|A||B|`:

==============================================  ==========  ==========  ==========  ==========
product                                         IEEE ms     bf16 ms     IEEE error  bf16 error
==============================================  ==========  ==========  ==========  ==========
``[200, 200] x [200, 30000]`` (C3's ``A_i y``)  29.8        12.8        2.0e-7      3.6e-7
``[200, 150, 200] x [200, 200, 150]`` (Gram)    23.0        10.5        4.6e-7      9.4e-7
==============================================  ==========  ==========  ==========  ==========

The setting's documentation does not promise that accuracy (a plain bfloat16 product, error
:math:`\approx 2^{-9}`, would also satisfy it), so :func:`float32_products_verified` checks it once per process:
products of random operands under the setting must stay within :math:`16\,\epsilon_{32}\,|A||B|` of float64
(a plain bfloat16 product of the first shape above: 1.7e-3, about 900 times the bound).

:func:`fast_float32_products` turns the setting on inside a ``with`` block when the check passed and the
user has left the setting at its default (``"none"``). An explicit choice is respected: ``"ieee"``, set directly,
through ``torch.backends.fp32_precision`` or by ``torch.set_float32_matmul_precision("highest")``, keeps the
products IEEE. The setting is process-wide: float32 products that other threads run while the block is open take
the same path.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["fast_float32_products", "fast_products_on", "float32_products_verified"]

_TOLERANCE = 16.0  # in units of float32's epsilon, componentwise over |A||B|


def _backend():
    mkldnn = getattr(torch.backends, "mkldnn", None)
    matmul = getattr(mkldnn, "matmul", None)
    if matmul is None or not hasattr(matmul, "fp32_precision") or not mkldnn.is_available():
        return None
    return matmul


def _worst_error() -> float:
    """The largest componentwise error over :math:`|A||B|` of a few float32 products (``mm`` and ``bmm``)."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for a, b in (
        (torch.randn(64, 256, generator=gen), torch.randn(256, 96, generator=gen)),
        (torch.randn(8, 48, 256, generator=gen), torch.randn(8, 256, 48, generator=gen)),
    ):
        exact = a.double() @ b.double()
        scale = a.double().abs() @ b.double().abs()
        worst = max(worst, float(((a @ b).double() - exact).abs().div(scale).max()))
    return worst


@functools.cache
def float32_products_verified() -> bool:
    """Whether oneDNN's ``"bf16"`` float32 products are float32-accurate here (checked once per process)."""
    backend = _backend()
    if backend is None:
        return False
    old = backend.fp32_precision
    try:
        backend.fp32_precision = "bf16"
        return _worst_error() <= _TOLERANCE * torch.finfo(torch.float32).eps
    except (RuntimeError, ValueError):
        return False
    finally:
        backend.fp32_precision = old


@contextlib.contextmanager
def fast_float32_products(device: torch.device | str = "cpu") -> Iterator[bool]:
    """Float32 matrix products at bfloat16 speed with float32's accuracy, inside a ``with`` block.

    On the CPU, where oneDNN's ``"bf16"`` float32 products were verified float32-accurate in this process and the
    user left ``torch.backends.mkldnn.matmul.fp32_precision`` at its default, the block computes every float32
    ``matmul``/``bmm``/``linear`` that way (see the module docstring of :mod:`sqpoptim._fast_float32`); elsewhere,
    or on other devices, it changes nothing. Yields whether the fast products are on. The mixed-precision ENFORCE
    layer uses it for its own products; wrap a constraint function's large float32 products in it the same way::

        with sqpoptim.fast_float32_products(y.device):
            P = y @ weights.T
    """
    device = torch.device(device)
    backend = _backend() if device.type == "cpu" else None
    if backend is None or backend.fp32_precision != "none" or not float32_products_verified():
        yield backend is not None and backend.fp32_precision == "bf16"
        return
    backend.fp32_precision = "bf16"
    try:
        yield True
    finally:
        backend.fp32_precision = "none"


def fast_products_on(t: Tensor) -> bool:
    """Whether float32 products of ``t`` now take oneDNN's bfloat16 path (for a choice between product shapes)."""
    if t.dtype != torch.float32 or t.device.type != "cpu":
        return False
    backend = _backend()
    return backend is not None and backend.fp32_precision == "bf16"
