r"""bfloat16 NP steps: the far-from-feasible start of ENFORCE's mixed-precision iteration.

From an untrained backbone the NP iteration spends its first steps far from the constraint set, where a step's
quality is set by the nonlinearity of :math:`c`, not by the arithmetic. On the C3 benchmark (200 outputs, 150
quadratic rows, batch 200) the batch mean of :math:`|c|` goes 36 → 200 → 50 → 23 → 11 → 2.4 in the first five
steps and converges quadratically only after that; bfloat16 steps retrace that path to within a few per cent of
:math:`|c|` (the float32 path: 200, 50, 23, 11, 2.4). These steps are taken in bfloat16 and the float32 phase of
:mod:`sqpoptim.layers._mixed_np` continues from where they stop:

.. math::

    \tilde y \leftarrow \tilde y - \mathrm{bf}(B)^\top\, (L L^\top)^{-1}\, \mathrm{bf}(c), \qquad
    L L^\top = \mathrm{fl}_{32}\big(\mathrm{bf}(\mathrm{bf}(B)\, \mathrm{bf}(B)^\top)\big) + \delta I

* :math:`c` and :math:`B` are evaluated at :math:`(\mathrm{bf}(x), \mathrm{bf}(\tilde y))`, the Gram matrix is a
  bfloat16 product, its Cholesky factor is float32 (LAPACK has no bfloat16 factorisation), :math:`B^\top w` is a
  bfloat16 product and the step is added to the float64 iterate. The regularisation :math:`\delta` is
  :mod:`sqpoptim.layers._linalg`'s.
* **When a sample leaves.** Rounding :math:`\tilde y` to bfloat16 changes :math:`c_i` by up to
  :math:`\varphi = \epsilon_{\mathrm{bf16}}\, \max_i \|B_i\|_2\, \|\tilde y\|_2` (the floor of
  :mod:`sqpoptim.layers._mixed_np` with bfloat16's :math:`\epsilon = 2^{-7}`), so a sample leaves for the float32
  phase once :math:`\max_i |c_i| \le \varphi`: below it bfloat16 cannot tell a step's progress. On C3 the
  evaluation error measured 1.5 against :math:`\varphi \approx 17`, and the samples cross :math:`\varphi` after
  five steps, at max :math:`|c| \approx 7` (float32: 6.9). A sample also leaves at once when its factor is
  singular to bfloat16's accuracy (squared pivot ratio below :math:`\epsilon_{\mathrm{bf16}}`: the rounding of
  the Gram matrix may then exceed its smallest eigenvalue), when :math:`c` or the step is not finite there
  (the step is not taken), or when its :math:`\max_i |c_i|` has grown in two steps running: a safeguard for
  constraints whose bfloat16 evaluation errors exceed :math:`\varphi` (large terms that cancel), where the
  residual would otherwise wander at bfloat16's noise until ``max_iter``. The paper's iteration may grow
  :math:`|c|` once from far away (on C3 the first step does, 136 → 672), not twice in a row.
* The whole batch steps while at least half of it is still above its floor (the others take the step with
  :math:`c` replaced by 0, so they stay where they are, bit for bit); then the phase ends for every sample. A
  bfloat16 value never ends the projection: the float32 phase decides convergence.

The output is a point of the constraint set reached by a slightly different path from the float32 iteration's,
not the same point: on C3 the two outputs differ by 0.8 in norm on average (outputs of norm 10). The NP map is
that sensitive to its input: rounding :math:`\hat y` itself to bfloat16's precision moves the float32
iteration's output by 0.18 on average (and float32's precision by 8e-5).

Speed (CPU with AVX512-BF16, one thread, torch 2.13): the ``[200, 200] x [200, 30000]`` product of C3's
:math:`A_i y` takes 6.5 ms in bfloat16 against 28 ms in IEEE float32 (12.8 ms with the float32-accurate split
products of :func:`sqpoptim.fast_float32_products`), the ``150 x 200`` Gram matrices of the batch 4.9 against 23
(10.5) ms; the float32 Cholesky factorisation, 13-14 ms, is the same in both. On a CPU without native bfloat16
arithmetic these products are emulated and far slower than float32 (an AVX2-only AMD EPYC, torch 2.13: the
product above 1.24 s against 54 ms, the Gram matrices 373 against 33 ms, a C3 training step 5.4 against 1.1 s):
the option is for hardware that has it (x86 CPUs with AVX512-BF16 or AMX, GPUs), and
:class:`~sqpoptim.layers.EnforceProjection` warns where an x86 CPU has neither (:func:`native_bfloat16`).
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import torch
from torch import Tensor

from ._linalg import _regularised_cholesky_, cholesky_apply, transpose_apply

__all__ = ["bf16_np", "native_bfloat16"]

EPS = torch.finfo(torch.bfloat16).eps
_X86 = ("x86_64", "amd64", "i386", "i686")


def native_bfloat16(device: torch.device) -> bool | None:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: ``True`` for non-CPU devices and for x86 CPUs
    with AVX512-BF16 or AMX, ``False`` for x86 CPUs with neither (PyTorch then emulates bfloat16 products), and
    ``None`` where PyTorch offers no probe (other CPU architectures, older PyTorch)."""
    if device.type != "cpu":
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() not in _X86 or any(probe is None for probe in probes):
        return None
    return any(probe() for probe in probes)


def bf16_np(evaluate: Callable[[Tensor], tuple[Tensor, Tensor]], y: Tensor, max_iter: int) -> tuple[Tensor, int]:
    """bfloat16 NP steps from ``y`` (float64, ``[B, n]``) as in the module docstring, at most ``max_iter``.

    ``evaluate(y_bf16) -> (c [B, m], B [B, m, n])`` evaluates the constraints at bfloat16 inputs (its outputs may
    be bfloat16 or wider). Returns the float64 iterate and the number of steps taken.
    """
    batch = y.shape[0]
    active = torch.ones(batch, dtype=torch.bool, device=y.device)
    err_prev = torch.full((batch,), float("inf"), device=y.device)
    grew = torch.zeros_like(active)  # max |c| grew in the last step
    work = None
    steps = 0
    while steps < max_iter:
        c, J = evaluate(y.to(torch.bfloat16))
        c32 = c.float()
        err = c32.abs().amax(dim=-1)
        rows = torch.linalg.vector_norm(J, dim=-1).amax(dim=-1).float()  # in J's dtype: an estimate suffices
        floor = EPS * rows * torch.linalg.vector_norm(y, dim=-1)
        grows = err > err_prev
        active = active & (err > floor) & torch.isfinite(err) & ~(grew & grows)
        err_prev, grew = err, grows
        if 2 * int(active.sum()) < batch:  # one host read per step
            break
        m = c.shape[-1]
        if work is None:
            work = torch.empty(batch, m, m, dtype=torch.float32, device=y.device)
        G = work.copy_(J @ J.mT)  # the bfloat16 product, in float32 for LAPACK
        L, flagged = _regularised_cholesky_(G.mT, G.diagonal(dim1=-2, dim2=-1).clone(), 0.0, EPS, in_place=True)
        active = active & ~flagged
        w = cholesky_apply(L, c32 * active[:, None])
        step = transpose_apply(J, w.to(J.dtype)).double()
        ok = torch.isfinite(step).all(dim=-1)
        active = active & ok
        y = y - torch.where(ok[:, None], step, 0.0)
        steps += 1
    return y, steps
