r"""The baselines of the SQP paper under the same closure contract: Adam(con), Adam(unc) and the penalty method.

* :class:`ConstrainedAdam` — Adam(con) of Márquez-Neila, Salzmann, Fua (2017, arXiv:1706.02025): Adam moments
  of the *raw* gradients and the KKT step with the Adam metric. It is :class:`~sqpoptim.ProjectedAdamSQP`
  with ``projection="scaled"``, ``bias_correction="standard"`` and ``project_gradients=False``: the one
  difference from the ICLR-form SQP-Adam is the vector fed to the moments.
* :class:`AdamUnc` — Adam(unc), the soft-constrained baseline: Adam with ε inside the square root on the
  objective alone; constraints the closure returns are ignored (and returned for logging).
* :class:`PenaltyAdam` — Adam(unc) on :math:`f + \tfrac{\rho}{2}\|c\|^2` (inequalities through
  :math:`\max(0, c_I)^2`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._closure import StepInputs, parse_closure_output
from ._constraints import Constraints
from ._distributed import Sharded, strip_sharded
from ._layout import FlatLayout
from .adam import ProjectedAdamSQP

__all__ = ["AdamUnc", "ConstrainedAdam", "PenaltyAdam"]


class ConstrainedAdam(ProjectedAdamSQP):
    r"""Adam(con) (Márquez-Neila et al. 2017): moments of raw gradients, KKT step in the Adam metric.

    .. math::
        \begin{aligned}
        &m_k = \beta_1 m_{k-1} + (1-\beta_1) g_k,\quad w_k = \beta_2 w_{k-1} + (1-\beta_2) g_k^2,\quad
         \hat m_k = m_k/(1-\beta_1^k),\ \hat w_k = w_k/(1-\beta_2^k) \\
        &\begin{bmatrix}\operatorname{diag}\sqrt{\hat w_k + \epsilon} & J_k^\top \\ J_k & 0\end{bmatrix}
         \begin{bmatrix} s_k \\ \lambda_k\end{bmatrix} = -\begin{bmatrix}\hat m_k \\ c_k\end{bmatrix},\qquad
         x_{k+1} = x_k + \alpha s_k
        \end{aligned}

    solved by the same decomposition as :class:`~sqpoptim.ProjectedAdamSQP` (``normal_lr`` γ scales the
    normal part as there: the default γ = 1 takes the full feasibility step like every constrained optimizer
    here; ``normal_lr=None`` gives exactly the published :math:`x_k + \alpha s_k`). Like every constrained
    optimizer here its normal step is damped by default (``normal_damping``, see
    :class:`~sqpoptim.ProjectedAdamSQP`); ``normal_damping=None`` is the published step. The moments are not
    projected, so the tangential step carries momentum from directions that the constraints forbid; that is the
    difference the SQP paper measures.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        normal_lr: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            normal_lr,
            projection="scaled",
            bias_correction="standard",
            project_gradients=False,
            **kwargs,
        )


class AdamUnc(ProjectedAdamSQP):
    r"""Adam(unc): Adam with ε inside the square root, constraints ignored.

    .. math::
        m_k = \beta_1 m_{k-1} + (1-\beta_1)g_k,\quad w_k = \beta_2 w_{k-1} + (1-\beta_2)g_k^2,\quad
        x_{k+1} = x_k - \alpha \frac{m_k/(1-\beta_1^k)}{\sqrt{w_k/(1-\beta_2^k) + \epsilon}}

    ``torch.optim.Adam`` puts ε outside the square root (:math:`\sqrt{\hat w} + \epsilon`); the SQP paper's
    baselines use it inside, with ε = 1e-7. The closure may return ``loss`` or ``(loss, c)``; ``c`` is not
    used for the step, only returned (with a ``process_group``: all ranks' rows, for logging).
    ``process_group``: see :class:`~sqpoptim.ProjectedHeavyBallSQP`.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        *,
        sync_free: bool | None = None,
        process_group: Any = None,
    ) -> None:
        # no constraints reach the step: no normal step to damp
        super().__init__(
            params,
            lr,
            betas,
            eps,
            bias_correction="standard",
            sync_free=sync_free,
            normal_damping=None,
            process_group=process_group,
        )

    def _read_closure(self, out: Any, layout: FlatLayout) -> tuple[StepInputs, Tensor]:
        """The step sees the loss alone; ``c`` (if returned) is only passed back to the caller."""
        if isinstance(out, Tensor):
            out = (out, None)
        if isinstance(out, (tuple, list)) and len(out) in (2, 3):
            # J is not used; PointwiseConstraints are not evaluated, as nothing would use them
            c = out[1]
            if isinstance(c, Constraints):  # its tensor parts, stacked, are passed back (as a Constraints)
                parts = [p for p in (c.eq, c.ineq) if isinstance(p, Tensor)]
                c = torch.cat(parts) if parts else None
            out = (out[0], c if isinstance(c, Tensor) or c is None else None)
        inputs = parse_closure_output(out, layout)
        return StepInputs(inputs.loss, inputs.c.new_zeros(0), None), inputs.c.detach()


class PenaltyAdam(AdamUnc):
    r"""Adam(unc) on the quadratic penalty :math:`f(x) + \tfrac{\rho}{2}\|c(x)\|^2`.

    The soft approach the Lagrangian/SQP methods are compared against: the violation shrinks only like
    :math:`O(1/\rho)` and large ρ makes the problem ill-conditioned. ``step`` returns the *unpenalised*
    ``(loss, c)``; the penalised value is in :meth:`diagnostics` as ``penalized_loss``. With a
    ``process_group`` the penalty is that of all ranks' rows (a sharded rank weighs its own rows' penalty by the
    number of ranks, as the gradients are averaged) and the returned loss is the ranks' mean (one more
    all-reduce of a scalar). With ``(loss, Constraints(eq=c_E, ineq=c_I))`` (one process) the penalty is
    :math:`\tfrac{\rho}{2}(\|c_E\|^2 + \|\max(0, c_I)\|^2)`: a satisfied inequality costs nothing.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        rho: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        *,
        sync_free: bool | None = None,
        process_group: Any = None,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"Invalid rho: {rho} (expected rho >= 0)")
        super().__init__(params, lr, betas, eps, sync_free=sync_free, process_group=process_group)
        self.rho = rho

    def step(self, closure: Callable[[], Any] | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if closure is None:
            return super().step(closure)
        seen: dict[str, Tensor] = {}

        def penalised() -> tuple[Tensor, Any]:
            out, sharded = strip_sharded(closure())
            cons = out[1] if isinstance(out, (tuple, list)) and len(out) >= 2 else None
            if isinstance(cons, Constraints):
                if any(p is not None and not isinstance(p, Tensor) for p in (cons.eq, cons.ineq)):
                    raise TypeError(
                        "PenaltyAdam needs the residuals themselves; PointwiseConstraints are not supported"
                    )
                zero = out[0].new_zeros(0)
                c_eq = cons.eq if cons.eq is not None else zero
                c_in = cons.ineq if cons.ineq is not None else zero
                seen["loss"] = out[0]
                penalty = c_eq.square().sum() + c_in.clamp_min(0.0).square().sum()
                return out[0] + 0.5 * self.rho * penalty, cons
            if not isinstance(cons, Tensor):
                raise TypeError(
                    "PenaltyAdam's closure must return (loss, c) with c a 1-D tensor, or (loss, Constraints(...))"
                )
            loss, c = out[0], cons
            seen["loss"] = loss
            # Sharded rows: the union's penalty is the sum of the ranks' penalties while gradients are averaged
            # over the ranks, so each rank weighs its own penalty by their number.
            weight = self._ranks.world if (sharded and self._ranks is not None) else 1
            return loss + 0.5 * self.rho * weight * c.square().sum(), Sharded(c) if sharded else c

        penalized, c = super().step(penalised)
        self._diagnostics["penalized_loss"] = penalized
        loss = seen["loss"].detach()
        if self._ranks is not None:  # the mean over the ranks, like the penalised loss step() returned
            loss = self._ranks.average_(loss.reshape(1).clone())[0]
        return loss, c
