r"""Primal–dual gradient method on the Lagrangian, one multiplier per constraint."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._agreement import LocalInputs
from ._closure import parse_closure_output
from ._distributed import strip_sharded
from ._exchange import exchange, form_locally
from ._hyperparameters import check_nonnegative
from ._layout import FlatLayout, as_real
from ._optimizer import ConstrainedOptimizer, _as_returned
from ._state import OptimizerState

__all__ = ["PrimalDual"]


@dataclass
class PrimalDualState(OptimizerState):
    """:class:`PrimalDual`'s optimizer-wide state: the multipliers λ ``[m]`` (``None`` before the first step)
    and, for constraints sharded over ranks, each rank's row count (int64 ``[P]``)."""

    multipliers: Tensor | None = None
    multiplier_counts: Tensor | None = None  # sharded rows: how many of the multipliers each rank owns


class PrimalDual(ConstrainedOptimizer):
    r"""Gradient descent–ascent on :math:`\mathcal L(x, \lambda) = f(x) + \lambda^\top c(x)`.

    .. math::
        \lambda_{k+1} = \lambda_k + \eta_\lambda\, c(x_k),\qquad
        x_{k+1} = \mathrm{inner}\big(x_k,\ \nabla_x f(x_k) + J_k^\top \lambda_{k+1}\big)

    The dual step comes first, using the c the closure just returned, so the primal step sees the updated
    multipliers: the alternating (Arrow–Hurwicz) order. Simultaneous updates,
    :math:`\lambda_{k+1} = \lambda_k + \eta_\lambda c(x_k)` *after* a primal step with :math:`\lambda_k`, are
    unstable unless :math:`\eta < q/(q^2/4 + \sigma^2)` (q a curvature of f, σ a singular value of J): on the
    test QP of ``tests/test_convergence.py`` they diverge already at η = 0.05, where the alternating order
    converges. Both cost one closure evaluation per step.

    ``inner`` is any ``torch.optim`` optimizer (``torch.optim.Adam`` by default) fed the Lagrangian
    gradient through ``p.grad``; :math:`J_k^\top\lambda_k` comes from the same backward pass as
    :math:`\nabla f` (no Jacobian is formed). The multipliers are :attr:`multipliers` (and part of
    ``state_dict``); the number of constraints must stay fixed. Unlike the penalty method it can reach c = 0
    with a bounded weight, but it only converges as fast as the multipliers do.

    Inequalities (the closure returns ``(loss, Constraints(eq=c_E, ineq=c_I))``, :math:`c_I \le 0`; one
    process): their multipliers are kept nonnegative by projected ascent, :math:`\lambda_{I,k+1} = \max(0,
    \lambda_{I,k} + \eta_\lambda c_I(x_k))`, the Arrow–Hurwicz method for :math:`\min_x \max_{\lambda_I \ge 0}
    \mathcal L`; a satisfied constraint's multiplier decays to zero and stops acting on x.

    Non-finite values always raise here (one host read per step): the inner optimizer's state cannot be
    rolled back on the device.

    Args:
        params: iterable of parameters or param-group dicts (shared with the inner optimizer).
        lr: the inner optimizer's learning rate.
        dual_lr: η_λ ≥ 0.
        inner: a ``torch.optim.Optimizer`` class, or its name in ``torch.optim`` (``"SGD"``).
        process_group: see :class:`~sqpoptim.ProjectedHeavyBallSQP`. The multipliers of all rows, sharded or
            not, are kept on every rank, so one rank's ``state_dict`` is the whole state. A parameter that no
            rank's Lagrangian reaches gets a zero gradient rather than ``None``.
        **inner_kwargs: passed to ``inner``.
    """

    _state_type = PrimalDualState
    _global: PrimalDualState

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        dual_lr: float = 1e-2,
        inner: type[torch.optim.Optimizer] | str = torch.optim.Adam,
        *,
        process_group: Any = None,
        **inner_kwargs: Any,
    ) -> None:
        self._check_group(dict(lr=lr, dual_lr=dual_lr))
        if isinstance(inner, str):  # a torch.optim class by name ("Adam", "SGD", ...), e.g. from a command line
            name = inner
            inner = getattr(torch.optim, name, None)
            if not (isinstance(inner, type) and issubclass(inner, torch.optim.Optimizer)):
                raise ValueError(f"Invalid inner optimizer {name!r}: not a torch.optim optimizer")
        super().__init__(params, dict(lr=lr, dual_lr=dual_lr), sync_free=False, process_group=process_group)
        # The inner optimizer shares the param-group dicts, so schedulers acting on this optimizer reach it.
        self.inner = inner(self.param_groups, lr=lr, **inner_kwargs)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonnegative(group["lr"], "learning rate")
        check_nonnegative(group["dual_lr"], "dual_lr")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if closure is None:
            raise RuntimeError("PrimalDual.step() needs a closure returning (loss, c)")
        layout = self._layout()
        if self._ranks is not None:
            return self._distributed_step(closure, layout)
        self._check_groups()
        with torch.enable_grad():
            raw = strip_sharded(closure())[0]
            inputs = parse_closure_output(raw, layout)
            loss, c = inputs.loss, inputs.c
            m = c.shape[0]
            if m and not c.requires_grad:
                raise ValueError("the constraints c do not depend on any parameter (c has no autograd graph)")
            lam = self._global.multipliers
            if lam is None:
                lam = torch.zeros(m, dtype=c.dtype, device=c.device)
            elif lam.shape[0] != m:
                raise ValueError(f"the number of constraints changed from {lam.shape[0]} to {m}")
            # Dual step first, with this iterate's c (alternating / Arrow-Hurwicz order; see the class docstring).
            lam = lam + self._dual_lr() * c.detach()
            if inputs.num_ineq:  # projected ascent keeps the inequalities' multipliers nonnegative
                ineq = torch.arange(m, device=c.device) >= m - inputs.num_ineq
                lam = torch.where(ineq, lam.clamp_min(0.0), lam)
            flat, grads = self._lagrangian_gradient(loss, c, lam, 1, layout)
        self._guard.check(loss.detach(), c.detach(), flat, None, sync_free=False)
        returned = self._primal_step(layout, flat, grads, loss.detach(), c.detach(), lam, inputs.num_ineq)
        return _as_returned(returned, raw)

    def _dual_lr(self) -> float:
        return max(g["dual_lr"] for g in self.param_groups)

    @staticmethod
    def _lagrangian_gradient(
        loss: Tensor, c: Tensor, lam: Tensor, weight: int, layout: FlatLayout
    ) -> tuple[Tensor, list[Tensor | None]]:
        r"""The gradient of :math:`f + w\,\lambda^\top c` (one backward pass, no Jacobian), flat and per
        parameter (``None`` where a parameter does not reach it)."""
        lagrangian = loss + weight * (lam * c).sum() if c.shape[0] else loss
        grads = (
            torch.autograd.grad(lagrangian, layout.params, allow_unused=True)
            if lagrangian.requires_grad
            else [None] * len(layout.params)
        )
        for gp in grads:
            if gp is not None and gp.is_sparse:
                raise ValueError("sparse gradients are not supported")
        flat = torch.cat(
            [
                as_real(gp).reshape(-1) if gp is not None else v.new_zeros(v.numel())
                for gp, v in zip(grads, layout.views)
            ]
        )
        return flat, list(grads)

    def _primal_step(
        self,
        layout: FlatLayout,
        flat: Tensor,
        grads: list[Tensor | None],
        loss: Tensor,
        c: Tensor,
        lam: Tensor,
        num_ineq: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Hand the Lagrangian gradient to the inner optimizer through ``p.grad`` and record the step (``c_inf``:
        the largest violation, max(0, c_i) for the last ``num_ineq`` rows)."""
        for p, gp in zip(layout.params, grads):
            p.grad = None if gp is None else gp.detach()
        self.inner.step()
        self._global.multipliers = lam
        self._global.step = self._next_step_count(None, layout.device)
        m = c.shape[0]
        violation = torch.cat([c[: m - num_ineq].abs(), c[m - num_ineq :].clamp_min(0.0)]) if num_ineq else c.abs()
        self._diagnostics = {
            "c_inf": violation.max() if m else c.new_zeros(()),
            "multiplier_inf": lam.abs().max() if m else c.new_zeros(()),
            "g_norm": torch.linalg.vector_norm(flat),  # the Lagrangian gradient given to the inner optimizer
        }
        return loss, c

    def _distributed_step(self, closure: Callable[[], Any], layout: FlatLayout) -> tuple[Tensor, Tensor]:
        r"""The step across ranks. Rank r differentiates :math:`f_r + w\,\lambda_{k+1,r}^\top c_r` with the
        updated multipliers of its own rows (:math:`w = P` for sharded rows, 1 for replicated ones), so that the
        averaged gradient is :math:`\nabla f + J^\top\lambda_{k+1}` of the union; then every rank updates the
        multipliers of all rows alike from the gathered c, and keeps them whole (one checkpoint serves all)."""
        ranks = self._ranks
        assert ranks is not None
        lam_all, counts_before = self._global.multipliers, self._global.multiplier_counts

        def form() -> LocalInputs:
            self._check_groups()
            out, sharded = strip_sharded(closure())
            inputs = parse_closure_output(out, layout)
            if inputs.num_ineq:
                raise ValueError("inequality constraints are not supported by PrimalDual across several processes")
            loss, c = inputs.loss, inputs.c
            m = c.shape[0]
            if m and not c.requires_grad:
                raise ValueError("the constraints c do not depend on any parameter (c has no autograd graph)")
            lam = torch.zeros(m, dtype=c.dtype, device=c.device)
            if lam_all is not None:
                start, count = 0, lam_all.shape[0]
                if sharded and counts_before is not None:
                    owned = counts_before.tolist()
                    start, count = sum(owned[: ranks.rank]), owned[ranks.rank]
                if count != m:
                    raise ValueError(f"the number of constraints changed from {count} to {m} on this rank")
                lam = lam_all[start : start + m]
            lam = lam + self._dual_lr() * c.detach()
            flat, _ = self._lagrangian_gradient(loss, c, lam, ranks.world if sharded else 1, layout)
            return LocalInputs(loss.detach(), c.detach(), flat, None, sharded)

        with torch.enable_grad():
            local, error = form_locally(form)
        shared = exchange(ranks, local, error, layout.params, layout.n)
        assert local is not None
        m = shared.c.shape[0]
        if lam_all is not None and lam_all.shape[0] != m:
            raise ValueError(f"the number of constraints changed from {lam_all.shape[0]} to {m}")
        lam_all = (lam_all if lam_all is not None else shared.c.new_zeros(m)) + self._dual_lr() * shared.c
        self._guard.check(shared.loss, shared.c, shared.g, None, sync_free=False)
        self._global.multiplier_counts = torch.tensor(shared.counts) if local.sharded else None
        # the averaged gradient as p.grad (a parameter no rank's Lagrangian reaches gets zeros, not None)
        grads = [
            torch.view_as_complex(g) if p.is_complex() else g for p, g in zip(layout.params, layout.split(shared.g))
        ]
        return self._primal_step(layout, shared.g, grads, shared.loss, shared.c, lam_all)

    @property
    def multipliers(self) -> Tensor | None:
        """λ after the last step (``[m]``), or ``None`` before the first."""
        return self._global.multipliers

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["inner"] = self.inner.state_dict()["state"]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        # torch's load_state_dict keeps the saved "step" tensors, which the inner optimizer then increments in
        # place: copy, so that training on never writes into the checkpoint.
        inner_state = copy.deepcopy(state_dict.pop("inner", {}))
        super().load_state_dict(state_dict)
        self.inner.load_state_dict({"state": inner_state, "param_groups": state_dict["param_groups"]})
        self.inner.param_groups = self.param_groups  # share the group dicts again
