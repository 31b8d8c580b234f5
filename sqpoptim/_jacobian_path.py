r"""Which Jacobian a step uses, chosen without the user's help: ``jacobian="auto"`` (the default).

In order of preference:

1. given: ``J`` returned by the closure, or by a :class:`~sqpoptim.PointwiseConstraints` (per-point
   ``torch.func``, the path for residuals with input derivatives);
2. ``"layers"``: per-sample factors of the ``nn.Linear`` layers the constraints pass through, from one backward
   pass over the m points (:mod:`sqpoptim._linear_factors`), when the probes confirm that the constraints are
   pointwise in the batch and reach the parameters only through those layers;
3. ``"autograd"``: no J at all, products by autograd (:class:`~sqpoptim._jacobian_operator.AutogradJacobian`),
   when the matrix-free solver is requested or an explicit J would exceed ``AUTO_DENSE_BYTES``;
4. ``"batched"`` (one vectorised backward over the rows, ``chunk_size`` rows at a time), falling back to
   ``"loop"`` (one backward per row) where the batched pass raises.

``jacobian="joint"`` forms g and an explicit J together (:func:`~sqpoptim._jacobian.joint_gradient_and_jacobian`)
for closures whose constraints are read off the objective's own pass; it is never chosen by ``"auto"``, which
cannot see from the graphs whether the objective has a large part of its own (the case where it costs more).
``jacobian="layers"`` insists on 2 (a ``ValueError`` says why it does not apply); ``"batched"`` and ``"loop"``
are the explicit paths themselves (no recording). Once the layer factors have failed their checks, recording
stops for the rest of the run (it would only cost time). The graph of ``c`` is kept after the operator is formed
only when the operator still needs it (3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from ._jacobian import jacobian, joint_gradient_and_jacobian
from ._jacobian_operator import AutogradJacobian, DenseJacobian, JacobianOperator
from ._layout import FlatLayout
from ._linear_factors import VERIFY_EVERY, LinearCallRecorder, layer_factors
from ._solver_choice import AUTO_DENSE_BYTES

__all__ = ["JACOBIAN_MODES", "JacobianPath"]

JACOBIAN_MODES = ("auto", "layers", "batched", "loop", "joint")


class JacobianPath:
    """Per-optimizer choice of the Jacobian operator (see the module docstring)."""

    def __init__(self, mode: str, chunk_size: int | None) -> None:
        if mode not in JACOBIAN_MODES:
            raise ValueError(f"Invalid jacobian {mode!r}: expected one of {JACOBIAN_MODES}")
        self.mode, self.chunk_size = mode, chunk_size
        self.layers_off: str | None = None  # why the layer factors do not apply (recording stopped)
        self._verified: tuple | None = None
        self._since_verified = 0
        self._warned = [False]
        self.used = ""  # the path of the last step, for diagnostics

    def reset(self) -> None:
        """Verify the layer factors again at the next step (after ``load_state_dict``)."""
        self._verified, self._since_verified = None, 0

    @contextlib.contextmanager
    def recording(self, enabled: bool) -> Iterator[LinearCallRecorder | None]:
        """Record the closure's ``nn.Linear`` calls while it runs, when the layer factors may apply."""
        if not enabled or self.mode in ("batched", "loop", "joint") or self.layers_off is not None:
            yield None
            return
        with LinearCallRecorder() as rec:
            yield rec

    def joint(self, loss: Tensor, c: Tensor, layout: FlatLayout) -> tuple[Tensor, JacobianOperator] | None:
        """``(g, operator)`` from one backward over ``(loss, c)`` in ``"joint"`` mode (``None`` in the other modes,
        or when there are no constraints); a batched pass that raises falls back to the separate passes
        (:meth:`operator`: the batched Jacobian, or the per-row loop with its one-time warning)."""
        if self.mode != "joint" or c.shape[0] == 0:
            return None
        try:
            g, J = joint_gradient_and_jacobian(loss, c, layout.params, layout.n, chunk_size=self.chunk_size)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            return None  # the graphs are intact (nothing was freed by a pass that raised): the separate passes
        self.used = "joint"
        return g, DenseJacobian(J)

    def operator(
        self,
        c: Tensor,
        J: Tensor | None,
        layout: FlatLayout,
        recorder: LinearCallRecorder | None,
        *,
        solver: str,
    ) -> tuple[JacobianOperator, bool]:
        """``(operator, keep_graph)``: this step's Jacobian operator, and whether it still needs ``c``'s graph
        (then the objective's backward must retain a graph it may share)."""
        m = c.shape[0]
        if J is not None or m == 0:
            self.used = "given" if m else ""
            return DenseJacobian(c.new_zeros((0, layout.n), dtype=layout.dtype) if J is None else J), False
        if recorder is not None:
            calls = [call for call in recorder.calls if call.input.dim() == 2 and call.input.shape[0] == m]
            recorder.calls = []
            signature = (layout.key, m, tuple((id(call.module), tuple(call.input.shape)) for call in calls))
            verify = signature != self._verified or self._since_verified >= VERIFY_EVERY
            factors = layer_factors(c, calls, layout, verify=verify, seed=self._since_verified)
            if not isinstance(factors, str):
                if verify:
                    self._verified, self._since_verified = signature, 0
                self._since_verified += 1
                self.used = "layers"
                return factors, False
            if self.mode == "layers":
                raise ValueError(f"jacobian='layers' does not apply to this closure: {factors}")
            self.layers_off = factors
        explicit_bytes = m * layout.n * layout.views[0].element_size()
        if solver == "krylov" or (solver == "auto" and explicit_bytes > AUTO_DENSE_BYTES):
            self.used = "autograd"
            return AutogradJacobian(c, layout.params, layout.n), True
        mode = "loop" if self.mode == "loop" else "batched"  # ("joint" lands here when its pass raised)
        J = jacobian(c, layout.params, layout.n, mode=mode, chunk_size=self.chunk_size, warned=self._warned)
        self.used = mode
        return DenseJacobian(J), False
