r"""The base class of the constrained optimizers: one ``step()`` that orchestrates, and nothing of an algorithm.

A step reads

1. **parse** the closure's output against the contract (:mod:`sqpoptim._closure`);
2. **judge** the last step when the normal step is damped, and undo it if it failed (:mod:`sqpoptim._damping`);
3. **form** the constraint Jacobian J as an operator (:mod:`sqpoptim._jacobian_path`: per-sample layer factors,
   an explicit matrix or autograd products), then the objective's gradient g (:mod:`sqpoptim._gradient`) —
   J first, so that the objective's backward retains no graph unless the operator still needs ``c``'s;
4. **solver**: dense (one float64 Gram factorisation) or matrix-free (MINRES with inexact-SQP termination
   tests), chosen by :func:`sqpoptim._constraint_solver.make_solver` (``solver="auto"``); always dense when the
   closure gave inequalities, whose step QP is solved in its dual on the Gram matrix (:mod:`sqpoptim._inequality`);
5. **check** that the inputs are finite, J's rows read off the solver (:mod:`sqpoptim._finite`);
6. **direction**: the subclass turns (g, c, the solver) and its state into the displacement δ (``_direction``);
7. **update** x ← x + δ on the flat parameter vector (:mod:`sqpoptim._layout`);
8. **record** the damping model for the next judgement, the matrix-free solver's warm starts and the step's
   diagnostics (``jacobian``: the path used; ``solver``; for the matrix-free solver ``krylov_iterations``,
   ``krylov_converged``, ``krylov_test``, ``krylov_residual`` and the merit penalty ``penalty``).

With a ``process_group`` each rank first parses its own closure and forms its own g and J (steps 1 and 3), then
the ranks exchange them (:mod:`sqpoptim._exchange`: one agreement round, the averaged gradient and loss, the
rows of sharded constraints); steps 2 and 4–7 then run on the same numbers on every rank.

Optimizer-wide state (step count, refused steps, damping, a method's own scalars) is a typed object
(:mod:`sqpoptim._state`) serialised into ``state_dict()``; :meth:`ConstrainedOptimizer.diagnostics` reports the
last step and is never checkpointed.

Synchronisation: ``sync_free=False`` (the default on CPU) checks inputs with one host read per step and handles
rank deficiency exactly; ``sync_free=True`` (the default on CUDA) never waits for the device — refused or
rejected steps are masked no-ops and non-finite inputs are reported at a later step.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _damping
from ._agreement import LocalInputs
from ._closure import StepInputs, parse_closure_output
from ._constraint_solver import SOLVER_MODES, ConstraintSolver, make_solver
from ._constraints import Constraints
from ._distributed import RankGroup, strip_sharded
from ._exchange import exchange, form_locally
from ._finite import FiniteGuard, ZeroJacobianRows
from ._gradient import flat_gradient
from ._hyperparameters import in_group
from ._inequality import InequalityWarmStart
from ._jacobian import jacobian
from ._jacobian_path import JacobianPath
from ._krylov import KrylovOptions
from ._layout import FlatLayout, FlatState, build_layout, layout_key, per_coordinate
from ._linalg import default_rank_tol
from ._state import GLOBAL_KEY, DampingState, OptimizerState
from ._warnings import warn_user

__all__ = ["ConstrainedOptimizer", "InfeasibilityWarning", "RankDeficiencyWarning", "StepContext"]


class RankDeficiencyWarning(UserWarning):
    """The constraint Jacobian was rank-deficient or ill-conditioned; the step used its independent part."""


class InfeasibilityWarning(UserWarning):
    """The constraint violation stalled while the linearised constraints could not reduce it."""


@dataclass
class StepContext:
    """What a direction needs, all on the parameters' device: g ``[n]``, c ``[m]``, J (the constraint solver over
    this step's Jacobian, :mod:`sqpoptim._constraint_solver`; the direction functions also take an explicit
    ``[m, n]`` tensor); ``ok`` (sync-free
    mode: 0-d bool "this step may be applied"; ``None`` when the inputs were checked on the host); ``stats``
    (0-d bool "feed this gradient to the statistics — moments, momentum — and count the step"; ``None``: yes);
    k, this step's count (0-d float64); ``sync_free``; ν of the damped normal step (``None``: undamped); the last
    ``num_ineq`` rows of c and J are inequalities :math:`c_i \\le 0`, ``warm`` the last step's dual partitions."""

    layout: FlatLayout
    loss: Tensor
    g: Tensor
    c: Tensor
    J: ConstraintSolver
    ok: Tensor | None
    stats: Tensor | None
    step: Tensor
    sync_free: bool
    damping: Tensor | None = None
    num_ineq: int = 0
    warm: InequalityWarmStart | None = None


class ConstrainedOptimizer(Optimizer):
    """Base class. Subclasses set ``_flat_state_names`` (per-parameter state kept as flat buffers), optionally
    ``_state_type`` (their optimizer-wide state), and implement :meth:`_direction`."""

    _flat_state_names: ClassVar[tuple[str, ...]] = ()
    _state_type: ClassVar[type[OptimizerState]] = OptimizerState
    _forms_jacobian: ClassVar[bool] = True  # False: the method ignores the constraints (no layer recording)

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        jacobian: str = "auto",
        chunk_size: int | None = None,
        rank_tol: float | None = None,
        sync_free: bool | None = None,
        normal_damping: float | None = None,
        solver: str = "auto",
        krylov: dict[str, Any] | None = None,
        process_group: Any = None,
    ) -> None:
        path = JacobianPath(jacobian, chunk_size)  # validates jacobian
        if solver not in SOLVER_MODES:
            raise ValueError(f"Invalid solver {solver!r}: expected one of {SOLVER_MODES}")
        if krylov is not None and not isinstance(krylov, dict):
            raise TypeError(f"krylov must be a dict of matrix-free solver options; got {type(krylov).__name__}")
        try:
            krylov_options = KrylovOptions(**(krylov or {}))
        except TypeError as err:
            raise ValueError(f"Invalid krylov options {krylov!r}: {err}") from None
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"Invalid chunk_size: {chunk_size!r} (a positive int or None)")
        if rank_tol is not None and not 0.0 < rank_tol < 1.0:
            raise ValueError(f"Invalid rank_tol: {rank_tol} (expected 0 < rank_tol < 1)")
        if normal_damping is not None and not (
            isinstance(normal_damping, (int, float)) and _damping.NU_MIN <= normal_damping <= _damping.NU_MAX
        ):
            raise ValueError(
                f"Invalid normal_damping: {normal_damping!r} (None, or the initial relative damping ν0 in "
                f"[{_damping.NU_MIN:g}, {_damping.NU_MAX:g}])"
            )
        super().__init__(params, defaults)
        self.normal_damping = None if normal_damping is None else float(normal_damping)
        self.jacobian_mode = jacobian
        self.solver_mode = solver
        self.krylov_options = krylov_options
        self._jacobian_path = path
        self.chunk_size = chunk_size
        self.rank_tol = rank_tol
        self.sync_free = sync_free
        self._global: OptimizerState = self._state_type()
        self._diagnostics: dict[str, Any] = {}
        self._multipliers: Tensor | None = None
        self._guard = FiniteGuard()
        self._flat = FlatState(self._flat_state_names)
        self._layout_cache: FlatLayout | None = None
        self._jacobian_warned = [False]
        self._rank_warned = False
        self._violations: deque[tuple[float, float]] = deque(maxlen=20)
        self._violation_peak = 0.0  # the largest ‖c‖ seen
        self._infeasibility_warned = False
        self.process_group = process_group
        self._ranks = None if process_group is None else RankGroup(process_group)
        if process_group is None:
            _warn_if_distributed(type(self).__name__)

    # ------------------------------------------------------------------ hyperparameters
    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for a hyperparameter of ``group`` the method cannot use (subclasses)."""

    def _check_groups(self) -> None:
        """Check every param group, at the start of every step and before anything changes (hyperparameters
        can be changed after construction); subclasses add checks across groups."""
        for i, group in enumerate(self.param_groups):
            try:
                self._check_group(group)
            except ValueError as err:
                raise in_group(i, group, err) from None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError as err:
            self.param_groups.pop()  # refused: the optimizer is as it was
            raise in_group(len(self.param_groups), param_group, err) from None

    # ------------------------------------------------------------------ layout and state
    def _layout(self) -> FlatLayout:
        key = layout_key(self.param_groups)
        if self._layout_cache is None or self._layout_cache.key != key:
            self._layout_cache = build_layout(self.param_groups)
        return self._layout_cache

    def _flat_state(self, layout: FlatLayout) -> dict[str, Tensor]:
        """Flat ``[n]`` buffers of the per-parameter state; ``self.state[p][name]`` are views into them."""
        return self._flat.buffers(layout, self.state)

    @property
    def global_state(self) -> OptimizerState:
        """The optimizer-wide state (typed; read it, do not write it)."""
        return self._global

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        glob = self._global.to_dict()
        if glob:
            sd["state"] = {**sd["state"], GLOBAL_KEY: glob}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        state = dict(state_dict["state"])
        glob = state.pop(GLOBAL_KEY, None) or {}
        state_dict["state"] = state
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        new_global = self._state_type.from_dict(glob, device)  # before anything changes: may raise
        super().load_state_dict(state_dict)
        self._global = new_global
        self._layout_cache = None
        self._flat.invalidate()
        self._diagnostics = {}
        self._multipliers = None
        self._jacobian_path.reset()
        # refused steps recorded before the checkpoint were reported then
        seen = new_global.nonfinite_steps
        self._guard.reset(0 if seen is None else int(seen))

    def _per_coordinate(self, layout: FlatLayout, values: list[float]) -> float | Tensor:
        return per_coordinate(layout, values)

    def _rank_tol(self, layout: FlatLayout) -> float:
        return self.rank_tol if self.rank_tol is not None else default_rank_tol(layout.dtype)

    def _normal_step_sizes(self, layout: FlatLayout) -> float | Tensor:
        """γ per group: ``normal_lr``, or the group's ``lr`` where it is ``None``."""
        return per_coordinate(
            layout, [g["lr"] if g["normal_lr"] is None else g["normal_lr"] for g in self.param_groups]
        )

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """One step; see the class docstring for the algorithm and :mod:`sqpoptim._closure` for the contract.

        Returns the detached ``(loss, c)`` at the point the step was taken from — as ``torch.optim`` returns
        the closure's loss —, except after a rejected damped step, when the parameters went back to the last
        accepted point: then the values at that point."""
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step() needs a closure returning (loss, c) or (loss, c, J)")
        # With a process group every rank must decide alike, so it waits for the flag (the agreement round waits
        # for the device anyway).
        self._guard.raise_pending(wait=self._ranks is not None)
        layout = self._layout()
        sync_free = self.sync_free if self.sync_free is not None else layout.device.type == "cuda"
        sent = 0 if self._ranks is None else self._ranks.sent_bytes
        g: Tensor | None = None
        with torch.enable_grad():
            raw, recorder = None, None
            if self._ranks is None:
                self._check_groups()
                with self._jacobian_path.recording(self._forms_jacobian) as recorder:
                    out = closure()
                raw = strip_sharded(out)[0]
                inputs, c_out = self._read_closure(raw, layout)
            else:  # every rank's inputs exchanged: the same g, c and J on every rank (:mod:`sqpoptim._exchange`)
                inputs, c_out, g = self._exchanged_inputs(closure, layout)
            m = inputs.c.shape[0]
            num_ineq = inputs.num_ineq
            solver_mode = self._solver_for(num_ineq)
            nu0 = self._damping_for(num_ineq)
            damping, verdict = None, None
            if nu0 is not None and m:
                damping = self._global.damping or _damping.initial_state(nu0, layout.device)
                verdict = _damping.judge(damping, inputs.loss.detach(), inputs.c.detach(), layout.n)
                if not sync_free and bool(verdict.reject):  # one host read (exact mode only)
                    rejected = self._reject_last_step(layout, damping, verdict, inputs.loss.detach(), c_out)
                    return _as_returned(rejected, raw)
            # J first: c's graph is retained by its backward when the objective shares it, and the objective's
            # backward then frees its own graph unless the operator still needs c's
            op, keep_graph = self._jacobian_path.operator(
                inputs.c, self._given_jacobian(inputs, layout), layout, recorder, solver=solver_mode
            )
            if g is None:
                g = flat_gradient(inputs.loss, layout, retain_graph=keep_graph)
            loss, c = inputs.loss.detach(), inputs.c.detach()
            J = make_solver(
                op,
                solver_mode,
                rank_tol=self._rank_tol(layout),
                sync_free=sync_free,
                options=self.krylov_options,
                state={} if self._global.krylov is None else self._global.krylov,
                needs_gram=self._factors_gram(),
            )
            # a zero gradient is harmless for a satisfied inequality (c_i < 0): it stays out of the working set
            satisfied = None
            if num_ineq:
                satisfied = (torch.arange(m, device=c.device) >= m - num_ineq) & (c < 0)
            try:
                rows = J.row_check() if m else None
                bad = self._guard.check(loss, c, g, rows, sync_free=sync_free, satisfied=satisfied)
            except ZeroJacobianRows as err:
                raise self._zero_rows_error(err.rows, inputs, layout) from None
        ok = None if bad is None else ~bad.any()  # sync-free: apply this step at all
        reject = None
        if verdict is not None and ok is not None:  # sync-free: a rejected step is a no-op on the state ...
            reject = verdict.reject & ok  # (non-finite inputs are never rejected: the usual refusal)
            ok = ok & ~verdict.reject
        # the statistics (moments, step count) are fed only by a fresh gradient: not again after a rejection,
        # when this step retakes the rejected one from the same point with a larger damping
        retry = None if damping is None else damping.retry
        stats = ok if retry is None else (~retry if ok is None else ok & ~retry)
        ctx = StepContext(layout, loss, g, c, J, ok, stats, self._next_step_count(stats, layout.device), sync_free)
        ctx.damping = None if verdict is None else verdict.nu
        if num_ineq:
            ctx.num_ineq = num_ineq
            ctx.warm = InequalityWarmStart(self._global.inequality_active, self._global.projection_active)
        delta, info = self._direction(ctx)
        formed = info.pop("formed", None)
        partitions = (info.pop("active_set", None), info.pop("projection_active_set", None))
        if sync_free:
            formed = delta.isfinite().all() if formed is None else formed & delta.isfinite().all()
            self._guard.commit(self._global, bad, formed, reject)
            applied = formed if ok is None else ok & formed
            delta = torch.where(applied, delta, torch.zeros_like(delta))
            counted = formed if stats is None else stats & formed
        else:
            if not bool(delta.isfinite().all()):  # from finite inputs and a finite projected gradient: overflow
                raise FloatingPointError(
                    "the step could not be formed: non-finite displacement from finite inputs (an overflowing "
                    "linear system); the step was refused and the parameters are unchanged"
                )
            counted = stats
        self._commit_step(ctx, counted)
        if num_ineq:
            self._commit_partitions(partitions, None if not sync_free else applied)
            if self._global.damping is not None:  # the last damped step's model no longer predicts this point
                self._global.damping = dataclasses.replace(self._global.damping, model=None, retry=None)
        if J.kind == "krylov" and (ok is None or bool(applied)):  # (the matrix-free solver synchronises anyway)
            J.commit()
            self._global.krylov = J.state  # (kept only once a step is applied: a refused step changes no state)
        self._warn_if_truncated(info, m)
        returned = (loss, c_out)
        Jdelta = None
        if m and not num_ineq and (verdict is not None or sync_free or info.get("truncated") or not J.exact(info)):
            Jdelta = J.op.mv(delta)
        if m and "c_predicted" not in info:  # the inequality path reports its own (of the QP step, before any α)
            info["c_predicted"] = self._predicted_violation(layout, c, Jdelta)
        if verdict is not None:
            assert damping is not None and Jdelta is not None
            x = layout.gather()
            x_prev = damping.x_accepted
            if reject is not None and x_prev is not None and x_prev.numel() == x.numel():
                delta = torch.where(reject, x_prev - x, delta)  # ... that moves back to the last accepted point
                Jdelta = J.op.mv(delta)
                returned = _damping.values_after(damping, reject, loss, c_out)
                for key in ("v_norm", "u_norm"):
                    info[key] = torch.where(reject, torch.zeros_like(info[key]), info[key])
            gamma = self._normal_step_sizes(layout)
            gamma = gamma.max().double() if isinstance(gamma, Tensor) else gamma
            self._global.damping = _damping.record(
                damping,
                verdict,
                loss=loss,
                c=c,
                Jdelta=Jdelta,
                normal_norm=gamma * info["v_norm"].double(),
                u_norm=info["u_norm"],
                x=x,
                ok=None if ok is None else applied,
                reject=reject,
            )
            info.update(
                rejected=False if reject is None else reject,
                damping=verdict.nu,
                damping_ratio=verdict.rho,
                rejected_steps=_rejected_count(self._global.damping),
            )
        layout.add_(delta)
        info["step_norm"] = torch.linalg.vector_norm(delta)
        multipliers = info.pop("multipliers", None)
        if multipliers is not None:
            if ok is not None:  # a refused step keeps the last estimates (NaN when there are none of this size)
                last = self._multipliers
                if last is None or last.shape != multipliers.shape:
                    last = torch.full_like(multipliers, float("nan"))
                multipliers = torch.where(applied, multipliers, last)
            self._multipliers = multipliers
        if m and not num_ineq:
            info["c_inf"] = returned[1].abs().max()
        info["g_norm"] = torch.linalg.vector_norm(g)
        if m:
            info.update(J.info(), jacobian=self._jacobian_path.used)
        if self._ranks is not None:
            info["comm_bytes"] = self._ranks.sent_bytes - sent
        self._diagnostics = info
        if m and not sync_free:
            self._watch_feasibility(_violation(c, num_ineq), info["c_predicted"])
        return _as_returned(returned, raw)

    def _solver_for(self, num_ineq: int) -> str:
        """The solver mode of this step: the one asked for, but always the dense solver with inequalities (the
        step QP is solved in its dual on the explicit Gram matrix, and the gradient mapping too); the matrix-free
        solver asked for explicitly is refused then, before anything changes."""
        if not num_ineq:
            return self.solver_mode
        if self.solver_mode == "krylov":
            raise ValueError(
                "solver='krylov' (matrix-free) is not available with inequality constraints: the step QP is solved "
                "in its dual on the m x m Gram matrix of the explicit Jacobian; pass solver='dense' or 'auto' (which "
                "takes the dense solver whenever inequalities are given)"
            )
        return "dense"

    def _damping_for(self, num_ineq: int) -> float | None:
        """ν0 of this step's damped normal step, or ``None`` (undamped). A step with inequalities is one QP with
        no separate normal step: the default ν0 globalises the steps without inequalities and leaves it
        undamped, and any other value, asked for explicitly, is refused before anything changes."""
        if not num_ineq or self.normal_damping is None:
            return self.normal_damping
        if self.normal_damping != _damping.DEFAULT_NU0:
            raise ValueError(
                f"normal_damping={self.normal_damping:g} is not available with inequality constraints: the step with "
                "inequalities is one QP, with no separate normal step to damp; leave normal_damping at its default "
                f"({_damping.DEFAULT_NU0:g}, which damps only the steps without inequalities) or pass None, and use "
                "normal_lr < 1 to shorten the feasibility step"
            )
        return None

    def _given_jacobian(self, inputs: StepInputs, layout: FlatLayout) -> Tensor | None:
        """J when the closure supplied it, whole or by parts (a :class:`~sqpoptim.Constraints` with only one of
        ``eq_jac``/``ineq_jac``: the other part formed from its values here); ``None``: the step's Jacobian path
        forms it."""
        if inputs.J_parts is None:
            return inputs.J
        m_eq = inputs.c.shape[0] - inputs.num_ineq
        J_eq, J_in = inputs.J_parts
        J_eq = J_eq if J_eq is not None else self._form_jacobian(inputs.c[:m_eq], layout)
        J_in = J_in if J_in is not None else self._form_jacobian(inputs.c[m_eq:], layout)
        return torch.cat([J_eq, J_in])

    def _commit_partitions(self, partitions: tuple[Tensor | None, Tensor | None], applied: Tensor | None) -> None:
        """Keep the step's dual partitions (the warm start of the next step); a refused step keeps the old ones."""
        names = ("inequality_active", "projection_active")
        for name, new in zip(names, partitions):
            if new is None:
                continue
            old = getattr(self._global, name)
            if applied is not None:
                old = torch.zeros_like(new) if old is None or old.shape != new.shape else old
                new = torch.where(applied, new, old)
            setattr(self._global, name, new)

    def _predicted_violation(self, layout: FlatLayout, c: Tensor, Jdelta: Tensor | None) -> Tensor:
        r""":math:`\|c_k + J_k\delta_k\| / \|c_k\|`, the part of the violation the linearised step leaves (0 for
        the full Gauss–Newton step of a full-rank J; near 1 when the linearisation cannot reduce c). Without
        ``Jdelta`` the step is undamped and full rank, so :math:`J\delta = -\gamma_{\max} c` exactly."""
        c64 = c.double()
        c_norm = torch.linalg.vector_norm(c64)
        if Jdelta is None:
            gamma = self._normal_step_sizes(layout)
            gamma = float(gamma.max()) if isinstance(gamma, Tensor) else gamma
            return torch.full_like(c_norm, abs(1.0 - gamma))
        left = torch.linalg.vector_norm(c64 + Jdelta.double())
        return torch.where(c_norm > 0, left / torch.where(c_norm > 0, c_norm, 1.0), torch.zeros_like(left))

    def _watch_feasibility(self, c: Tensor, predicted: Tensor) -> None:
        """Exact mode: warn once when ‖c‖ has stalled for a window of steps while the linearised step could not
        remove most of it — infeasible constraints, or an iterate near a stationary point of ‖c‖² (Jᵀc ≈ 0).
        Not where ‖c‖ has already fallen by three orders of magnitude from its largest value: there the damped
        normal step leaves what lies along J's near-null directions (σ² below μ), which is no infeasibility."""
        c_norm = float(torch.linalg.vector_norm(c.double()))
        self._violations.append((c_norm, float(predicted)))
        self._violation_peak = max(self._violation_peak, c_norm)
        window = self._violations
        if self._infeasibility_warned or len(window) < window.maxlen:
            return
        first, last = window[0][0], window[-1][0]
        stalled = last > 1e-6 and last > 1e-3 * self._violation_peak and last > 0.99 * first
        if stalled and all(p > 0.5 for _, p in window):
            self._infeasibility_warned = True
            warn_user(
                f"the constraint violation has stalled at ‖c‖ = {last:.3g} for {len(window)} steps while the "
                f"linearised constraints cannot remove it (‖c + Jδ‖/‖c‖ = {window[-1][1]:.2f}): the constraints "
                "may be infeasible, or the iterate is near a stationary point of ‖c‖² (see "
                "optimizer.diagnostics()['c_predicted'])",
                InfeasibilityWarning,
            )

    def _read_closure(self, out: Any, layout: FlatLayout) -> tuple[StepInputs, Tensor]:
        """The step's inputs and the ``c`` that ``step`` returns (the same, detached, for constrained methods;
        equalities first when the closure returned a :class:`~sqpoptim.Constraints`)."""
        inputs = parse_closure_output(out, layout, max_constraints=layout.n)
        return inputs, inputs.c.detach()

    def _factors_gram(self) -> bool:
        """Whether the method factors the unweighted Gram matrix JJᵀ (then the inputs are validated from its
        diagonal instead of another pass over J)."""
        return True

    def _exchanged_inputs(self, closure: Callable[[], Any], layout: FlatLayout) -> tuple[StepInputs, Tensor, Tensor]:
        """This rank's loss, c, g and J from its closure, then the exchange that gives every rank the same ones
        (:mod:`sqpoptim._exchange`): ``(inputs, c to return, g)`` with the mean loss and gradient and the rows
        of every rank. Whatever fails on one rank (a param group's settings, the closure, its parsing, g, J) is
        raised on every rank, and nothing has changed when it is."""
        assert self._ranks is not None

        def form() -> LocalInputs:
            self._check_groups()
            out, sharded = strip_sharded(closure())
            inputs, c_out = self._read_closure(out, layout)
            if inputs.num_ineq:
                raise ValueError("inequality constraints are not supported across several processes (process_group)")
            uses_c = inputs.c.shape[0] == c_out.shape[0]  # Adam(unc) only reports c
            m = inputs.c.shape[0]
            g = flat_gradient(inputs.loss, layout, retain_graph=inputs.J is None and m > 0)
            J = inputs.J if inputs.J is not None or not uses_c else self._form_jacobian(inputs.c, layout)
            return LocalInputs(inputs.loss.detach(), c_out, g, J, sharded, uses_c)

        local, error = form_locally(form)
        shared = exchange(self._ranks, local, error, layout.params, layout.n)
        assert local is not None
        if not local.uses_c:
            return StepInputs(shared.loss, shared.c.new_zeros(0), None), shared.c, shared.g
        if shared.c.shape[0] > layout.n:  # sharded rows: only now is m known (the same decision on every rank)
            raise ValueError(
                f"more constraints than parameters: m = {shared.c.shape[0]} > n = {layout.n} over all ranks; "
                "the linearised constraints J d = -c cannot have full row rank"
            )
        return StepInputs(shared.loss, shared.c, shared.J), shared.c, shared.g

    def _evaluate(self, closure: Callable[[], Any], layout: FlatLayout) -> tuple[StepInputs, Tensor, Tensor]:
        """``(inputs, g, J)`` at the current parameters — every rank's, exchanged, with a process group — for
        extra evaluations of the closure within a step (the inputs as parsed, J formed when not given)."""
        if self._ranks is not None:
            inputs, _, g = self._exchanged_inputs(closure, layout)
            J = inputs.J if inputs.J is not None else self._form_jacobian(inputs.c, layout)
            return inputs, g, J
        inputs = parse_closure_output(strip_sharded(closure())[0], layout, max_constraints=layout.n)
        J = self._given_jacobian(inputs, layout)
        J = self._form_jacobian(inputs.c, layout) if J is None else J
        return inputs, flat_gradient(inputs.loss, layout), J

    def _direction(self, ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:  # pragma: no cover - abstract
        """δ with x_{k+1} = x_k + δ, and the step's diagnostics (at least ``v_norm`` and ``u_norm``)."""
        raise NotImplementedError

    def _form_jacobian(self, c: Tensor, layout: FlatLayout) -> Tensor:
        return jacobian(
            c,
            layout.params,
            layout.n,
            mode=self.jacobian_mode,
            chunk_size=self.chunk_size,
            warned=self._jacobian_warned,
        )

    def _next_step_count(self, counted: Tensor | None, device: torch.device) -> Tensor:
        """k for this step: the steps counted so far plus this one if ``counted`` (``None``: counted)."""
        k = self._global.step
        k = torch.zeros((), dtype=torch.float64, device=device) if k is None else k
        return k + (1.0 if counted is None else counted.to(k.dtype))

    def _commit_step(self, ctx: StepContext, counted: Tensor | None) -> None:
        """Store the step count once the step is known to be taken (``counted``: as in
        :meth:`_next_step_count`); subclasses with per-parameter counts extend this."""
        self._global.step = self._next_step_count(counted, ctx.layout.device)

    def _reject_last_step(
        self, layout: FlatLayout, damping: DampingState, verdict: _damping.Verdict, loss: Tensor, c: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Exact mode: move the parameters back to the last accepted point, keep the escalated ν and return the
        values at that point. The diagnostics keep their keys: no displacement was formed (``v_norm`` and
        ``u_norm`` are 0); ``rank``, ``gram_cond`` and ``g_norm`` are those of the last formed step."""
        assert damping.x_accepted is not None
        with torch.no_grad():  # called from inside the closure's enable_grad block; the real views of complex
            x_rejected = layout.gather()  # parameters were made without grad mode and may not be read with it
            layout.assign(damping.x_accepted)
        self._global.damping = _damping.rejected(damping, verdict)
        loss, c = _damping.values_after(damping, None, loss, c)
        zero = torch.zeros((), dtype=layout.dtype, device=layout.device)
        self._diagnostics = {
            **self._diagnostics,
            "c_inf": c.abs().max(),
            "v_norm": zero,
            "u_norm": zero,
            "step_norm": torch.linalg.vector_norm(damping.x_accepted - x_rejected),
            "rejected": True,
            "damping": verdict.nu,
            "damping_ratio": verdict.rho,
            "rejected_steps": _rejected_count(self._global.damping),
        }
        return loss, c

    def _zero_rows_error(self, rows: list[int], inputs: StepInputs, layout: FlatLayout) -> ValueError:
        """Say why Jacobian rows of unsatisfied constraints can be zero: c_i does not depend on the parameters
        (autograd cannot tell this apart from a zero derivative: a row of ``torch.cat`` has a graph to every
        part), or c_i is stationary here — an infeasible constraint at a minimum of |c_i|, or units saturated,
        typically by the optimizer's own large previous step, which the message then names."""
        shown = rows[:10]
        values = ", ".join(f"{inputs.c[i].item():.3g}" for i in shown)
        moved = ""
        if "step_norm" in self._diagnostics:
            step_norm = float(self._diagnostics["step_norm"])
            x_norm = float(torch.linalg.vector_norm(layout.gather().detach()))
            if step_norm > 0.5 * max(x_norm, 1e-12):
                moved = (
                    f" The optimizer's previous step moved the parameters by ‖δ‖ = {step_norm:.3g} against "
                    f"‖x‖ = {x_norm:.3g}, which can saturate units: globalise the normal step (normal_damping) "
                    "or lower normal_lr."
                )
        given = " (in the given J)" if inputs.J is not None and not inputs.c.requires_grad else ""
        return ValueError(
            f"constraint(s) {shown} cannot be reduced from this point: all-zero Jacobian rows{given} while "
            f"c = [{values}]. Either they do not depend on the parameters at all (remove them, or check that "
            "c is computed from the model), or they are stationary here: an infeasible constraint at a local "
            f"minimum of |c_i|, or units saturated by a large step.{moved} The step was refused and the "
            "parameters and optimizer state are unchanged."
        )

    def _warn_if_truncated(self, info: dict[str, Any], m: int) -> None:
        if info.get("truncated") and not self._rank_warned:
            self._rank_warned = True
            warn_user(
                f"the constraint Jacobian is rank-deficient or ill-conditioned (rank used {int(info['rank'])} "
                f"of {m}); steps use its independent part (see optimizer.diagnostics())",
                RankDeficiencyWarning,
            )

    # ------------------------------------------------------------------ reporting
    @property
    def multipliers(self) -> Tensor | None:
        r"""Least-squares Lagrange multiplier estimates of the last step, ``[m]`` float64:
        :math:`\lambda_k = -(J_kJ_k^\top)^{-1}J_kg_k`, the λ that minimises :math:`\|g_k + J_k^\top\lambda\|`
        (so :math:`g_k + J_k^\top\lambda_k` is the projected gradient). At a solution
        :math:`\nabla f + J^\top\lambda = 0`: if constraint i were relaxed to :math:`c_i(x) = \varepsilon_i`,
        the optimal loss would change by :math:`-\lambda_i\varepsilon_i` to first order. From mini-batch
        gradients they are as noisy as g. ``None`` before the first step. Methods that form no Euclidean Gram
        matrix (``projection="scaled"`` with unprojected gradients, i.e. :class:`~sqpoptim.ConstrainedAdam`)
        estimate λ in their own metric W, :math:`-(JWJ^\top)^{-1}JWg`, which agrees at a KKT point."""
        return self._multipliers

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` if a step since the last check was refused for non-finite inputs
        (``sync_free`` mode). Waits for the device."""
        self._guard.raise_pending(wait=True)

    def diagnostics(self, *, sync: bool = True) -> dict[str, Any]:
        r"""The last step's diagnostics: ``c_inf`` (max |c|), ``v_norm`` (‖v_k‖, the unscaled normal step),
        ``u_norm`` (‖u_k‖, the tangential displacement taken), ``rank`` (rank of J used; -1 when a deficient J
        was regularised, or with the matrix-free solver), ``gram_cond`` (estimated condition number of the Gram
        matrix; NaN with the matrix-free solver), ``g_norm`` (‖g_k‖, the objective gradient the closure
        produced), ``step_norm`` (‖δ_k‖, the displacement applied), ``c_predicted``
        (:math:`\|c_k + J_k\delta_k\|/\|c_k\|`, the part of the violation the linearised step leaves: 0 for a
        full Gauss–Newton step, near 1 when the constraints cannot be reduced from here — with a stalling ‖c‖
        this warns once with :class:`InfeasibilityWarning`, in exact mode), ``jacobian`` (how J was formed:
        ``"layers"``, ``"batched"``, ``"loop"``, ``"autograd"``, ``"given"``), ``solver`` (``"dense"`` or
        ``"krylov"``; the matrix-free solver adds ``krylov_iterations``, ``krylov_converged``, ``krylov_test`` —
        1 or 2 for the termination test that stopped the step's solve, 0 for ``rtol``, -1 when capped —,
        ``krylov_residual`` (‖γc + Js‖/‖b‖) and the merit penalty ``penalty``; its one-solve step leaves
        ``v_norm`` and ``u_norm`` NaN), with ``normal_damping`` also ``damping`` (ν), ``damping_ratio`` (ρ),
        ``rejected`` and ``rejected_steps`` (the count so far), plus method-specific entries. As Python numbers
        (waits for the device), or with ``sync=False`` as the device
        tensors themselves (for logging without a synchronisation)."""
        if not sync:
            return dict(self._diagnostics)
        return {k: (v.item() if isinstance(v, Tensor) else v) for k, v in self._diagnostics.items()}


def _warn_if_distributed(name: str) -> None:
    """Without a process group every rank steps on its own: say so where that is likely a mistake."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            warn_user(
                f"torch.distributed is initialised with {world} ranks but {name} was given no process_group: "
                "each rank steps on its own gradient and constraints, and replicas drift apart (wrapping the "
                "model in DistributedDataParallel does not average the gradients this optimizer forms); pass "
                "process_group=torch.distributed.group.WORLD to step together",
                UserWarning,
            )


def _rejected_count(damping: DampingState) -> Tensor | int:
    return 0 if damping.rejected_steps is None else damping.rejected_steps


def _violation(c: Tensor, num_ineq: int) -> Tensor:
    """:math:`[c_E; \\max(c_I, 0)]`: the constraint violations (``c`` itself without inequalities)."""
    if not num_ineq:
        return c
    m_eq = c.shape[0] - num_ineq
    return torch.cat([c[:m_eq], c[m_eq:].clamp_min(0.0)])


def _as_returned(returned: tuple[Tensor, Tensor], raw: Any) -> tuple[Tensor, Tensor | Constraints]:
    """``(loss, c)`` as ``step`` returns it: c a tensor, or a :class:`~sqpoptim.Constraints` of its detached parts
    when the closure returned one."""
    loss, c = returned
    if not (isinstance(raw, (tuple, list)) and len(raw) >= 2 and isinstance(raw[1], Constraints)):
        return loss, c
    m_eq = c.shape[0] - raw[1].num_ineq
    return loss, Constraints(eq=c[:m_eq], ineq=c[m_eq:])
