r"""Reused float64 buffers for the dense solver's matrices on the CPU.

A dense step forms and factors up to four ``m × m`` float64 matrices: :math:`G`, its Cholesky factor, the
damped :math:`G + \mu I` and its factor. Allocated afresh every step, each is paid again in page faults on first
touch, because the C allocator serves blocks this large by ``mmap`` and unmaps them when freed. At m = 1,000
(8 MB a matrix) that was a tenth of the step: ``torch.zeros`` of :math:`G` 4 ms and the out-of-place ``tril``
inside ``torch.linalg.cholesky_ex`` 6 ms, against 0.1 ms and 0.4 ms in memory touched before (BENCHMARKS.md).
The float64 copies of the layer factors that the Gram matrix is formed from (``[m, d]``, 1.8 MB each at
m = 1,000, d = 225; about 3,000 page faults a step for the seven of the scaling benchmark's network) and the two
Hadamard factors of its row blocks (``[rows, m]``) are kept the same way (:meth:`Workspace.buffer`).

The optimizer keeps one :class:`Workspace`, and its step's dense solver writes these matrices into it. Nothing
computed from them outlives the step: the factors are rebuilt from the next step's Jacobian. On CUDA the caching
allocator already hands back the same blocks, so the workspace holds nothing there and every caller allocates as
before; nor does it below ``MIN_M`` rows, where a matrix comes from the heap (glibc maps blocks of 128 KiB and
more) and writing into a kept buffer costs more than a fresh one (a small Gram matrix's factorisation: 20 µs
against 15 µs at m = 3).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MIN_M", "Workspace"]

MIN_M = 128  # smallest m whose float64 m x m matrix (128 KiB) the allocator maps afresh


class Workspace:
    """Named float64 ``m × m`` buffers (and the int32 status of a factorisation), reallocated when m changes, and
    named float64 buffers of any shape (:meth:`buffer`)."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def matrix(self, name: str, m: int, device: torch.device, *, column_major: bool = False) -> Tensor | None:
        """The buffer ``name`` (``None`` off the CPU and below ``MIN_M``). ``column_major``: Fortran order, the
        layout LAPACK writes a factor in, so that ``torch.linalg.cholesky_ex(..., out=...)`` factors in place
        without a copy (a name keeps the layout it was first asked with)."""
        if device.type != "cpu" or m < MIN_M:
            return None
        buf = self._buffers.get(name)
        if buf is None or buf.shape != (m, m) or buf.device != device:
            buf = torch.empty((m, m), dtype=torch.float64, device=device)
            buf = buf.mT if column_major else buf
            self._buffers[name] = buf
        return buf

    def buffer(self, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor | None:
        """The contiguous float64 buffer ``name`` of ``shape`` (``None`` off the CPU), reallocated when the shape
        changes; its content is whatever was written last."""
        if device.type != "cpu":
            return None
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.device != device:
            buf = torch.empty(shape, dtype=torch.float64, device=device)
            self._buffers[name] = buf
        return buf

    def cholesky_out(self, name: str, m: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """``out=`` for ``torch.linalg.cholesky_ex``: a column-major factor buffer and its status."""
        L = self.matrix(name, m, device, column_major=True)
        if L is None:
            return None
        key = name + ".info"
        info = self._buffers.get(key)
        if info is None or info.device != device:
            info = torch.zeros((), dtype=torch.int32, device=device)
            self._buffers[key] = info
        return L, info

    def clear(self) -> None:
        """Release every buffer."""
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
