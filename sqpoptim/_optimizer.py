r"""The base class of the constrained optimizers: one ``step()`` that orchestrates, and nothing of an algorithm.

A step reads

1. **parse** the closure's output against the contract (:mod:`sqpoptim._step_inputs`, :mod:`sqpoptim._closure`);
2. **judge** the last step when the normal step is damped (:mod:`sqpoptim._damping`), and in exact mode undo it
   at once if it failed (:mod:`sqpoptim._rejection`);
3. **form** the constraint Jacobian J as an operator (:mod:`sqpoptim._jacobian_path`: per-sample layer factors,
   an explicit matrix or autograd products), then the objective's gradient g (:mod:`sqpoptim._gradient`) —
   J first, so that the objective's backward retains no graph unless the operator still needs ``c``'s — and
   the solver over J: dense (one float64 Gram factorisation) or matrix-free (MINRES with inexact-SQP termination
   tests), chosen by :func:`sqpoptim._solver_choice.make_solver` (``solver="auto"``); always dense when the
   closure gave inequalities, whose step QP is solved in its dual on the Gram matrix (:mod:`sqpoptim._inequality`);
4. **check** that the inputs are finite, J's rows read off the solver (:mod:`sqpoptim._finite`);
5. **direction**: the subclass turns (g, c, the solver) and its state into the displacement δ (``_direction``);
6. **admit** δ: in sync-free mode mask a refused step into a no-op, in exact mode refuse an overflowing one;
   count the step and keep the warm starts of the next;
7. **record** the damping model for the next judgement (which, in sync-free mode, may turn δ into the move back
   from a rejected step), the step's diagnostics and what it says about feasibility (:mod:`sqpoptim._feasibility`);
8. **update** x ← x + δ on the flat parameter vector (:mod:`sqpoptim._layout`).

With a ``process_group`` each rank first parses its own closure and forms its own g and J, then the ranks
exchange them (:mod:`sqpoptim._exchange`: one agreement round, the averaged gradient and loss, the rows of
sharded constraints); the later phases run on the same numbers on every rank.

Optimizer-wide state (step count, refused steps, damping, a method's own scalars) is a typed object
(:mod:`sqpoptim._state`) serialised into ``state_dict()``; :meth:`ConstrainedOptimizer.diagnostics` reports the
last step and is never checkpointed.

Synchronisation: ``sync_free=False`` (the default on CPU) checks inputs with one host read per step and handles
rank deficiency exactly; ``sync_free=True`` (the default on CUDA) never waits for the device — refused or
rejected steps are masked no-ops and non-finite inputs are reported at a later step. Exact mode also takes the
step's scalar decisions on the host (the damping's judgement, the finiteness screens, a small Gram matrix's
condition number): on the CPU a read costs about as much as one 0-d tensor operation, and a small step's
bookkeeping was otherwise hundreds of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _damping
from ._closure import StepInputs, parse_closure_output
from ._constraint_solver import ConstraintSolver
from ._constraints import Constraints
from ._feasibility import (
    FeasibilityMonitor,
    InfeasibilityWarning,
    RankDeficiencyWarning,
    predicted_violation,
    stationarity_cosine,
    violation,
    zero_rows_error,
)
from ._finite import FiniteGuard, ZeroJacobianRows, all_finite
from ._gradient import flat_gradient
from ._hyperparameters import check_step_options, in_group
from ._inequality import InequalityWarmStart
from ._inequality_policy import damping_for, keep_partitions, solver_for
from ._layout import FlatLayout, FlatState, build_layout, layout_key, per_coordinate
from ._linalg import default_rank_tol
from ._rejection import move_back, record_step
from ._solver_choice import make_solver
from ._state import GLOBAL_KEY, DampingState, OptimizerState
from ._step_inputs import InputReader, warn_if_distributed
from ._workspace import Workspace

__all__ = ["ConstrainedOptimizer", "InfeasibilityWarning", "RankDeficiencyWarning", "StepContext"]


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


@dataclass
class _Report:
    """What the last step reports besides its diagnostics (never checkpointed). A field of this object rather
    than an attribute of the optimizer: an attribute assigned anew inside the step is lost when dynamo
    (``torch.compile`` of the step) resumes after a graph break, while mutations of an object are replayed."""

    multipliers: Tensor | None = None


@dataclass
class _Step:
    """A step in progress: what each phase of :meth:`ConstrainedOptimizer.step` leaves for the next."""

    layout: FlatLayout
    sync_free: bool
    sent: int  # bytes this rank had sent before the step (process group)
    inputs: StepInputs = None  # type: ignore[assignment]  # phase 1 on
    c_out: Tensor = None  # type: ignore[assignment]
    raw: Any = None
    recorder: Any = None
    returned: tuple[Tensor, Tensor] = None  # type: ignore[assignment]
    m: int = 0
    num_ineq: int = 0
    solver_mode: str = "auto"
    nu0: float | None = None
    damping: DampingState | None = None
    verdict: _damping.Verdict | None = None
    c_norm: Tensor | None = None  # ‖c‖ in float64, formed once
    g: Tensor | None = None
    loss: Tensor = None  # type: ignore[assignment]  # phase 3 on
    c: Tensor = None  # type: ignore[assignment]
    J: ConstraintSolver | None = None
    bad: Tensor | None = None
    ok: Tensor | None = None
    reject: Tensor | None = None
    stats: Tensor | None = None
    ctx: StepContext | None = None
    applied: Tensor | None = None


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
        reader = InputReader(jacobian, chunk_size, process_group)  # validates jacobian
        krylov_options = check_step_options(
            solver=solver, krylov=krylov, chunk_size=chunk_size, rank_tol=rank_tol, normal_damping=normal_damping
        )
        super().__init__(params, defaults)
        self.normal_damping = None if normal_damping is None else float(normal_damping)
        self.jacobian_mode = jacobian
        self.solver_mode = solver
        self.krylov_options = krylov_options
        self._reader = reader
        self._jacobian_path = reader.path
        self.chunk_size = chunk_size
        self.rank_tol = rank_tol
        self.sync_free = sync_free
        self._global: OptimizerState = self._state_type()
        self._diagnostics: dict[str, Any] = {}
        self._report = _Report()
        self._guard = FiniteGuard()
        self._flat = FlatState(self._flat_state_names)
        self._layout_cache: FlatLayout | None = None
        self._monitor = FeasibilityMonitor()
        self._workspace = Workspace()  # the dense solver's m x m matrices, reused from step to step
        self.process_group = process_group
        self._ranks = reader.ranks
        if process_group is None:
            warn_if_distributed(type(self).__name__)

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
        self._report = _Report()
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
        s = self._begin()
        with torch.enable_grad():
            self._parse(s, closure)
            if self._judge(s):  # exact mode: the last step failed and the parameters went back; nothing else
                return _as_returned(s.returned, s.raw)
            self._form(s)
            self._check(s)
        s.ctx = self._context(s)
        delta, info = self._direction(s.ctx)
        delta = self._admit(s, delta, info)
        delta = self._record(s, delta, info)
        s.layout.add_(delta)
        return _as_returned(s.returned, s.raw)

    def _begin(self) -> _Step:
        layout = self._layout()
        sync_free = self.sync_free if self.sync_free is not None else layout.device.type == "cuda"
        return _Step(layout, sync_free, sent=0 if self._ranks is None else self._ranks.sent_bytes)

    def _parse(self, s: _Step, closure: Callable[[], Any]) -> None:
        """Phase 1: read the closure (every rank's, exchanged, with a process group) and settle what this step
        does with the constraints it gave; refusals here change nothing."""
        read = self._reader.read(
            closure, s.layout, check=self._check_groups, parse=self._read_closure, record=self._forms_jacobian
        )
        s.inputs, s.c_out, s.raw, s.recorder, s.g = read.inputs, read.c_out, read.raw, read.recorder, read.g
        s.returned = (s.inputs.loss.detach(), s.c_out)
        s.m, s.num_ineq = s.inputs.c.shape[0], s.inputs.num_ineq
        s.c_norm = torch.linalg.vector_norm(s.inputs.c.detach().double()) if s.m else None  # (used four times)
        s.solver_mode = solver_for(self.solver_mode, s.num_ineq)
        s.nu0 = damping_for(self.normal_damping, s.num_ineq)

    def _judge(self, s: _Step) -> bool:
        """Phase 2: judge the last damped step from this closure's values; in exact mode a failed one is undone
        here (``True``: the step ends). In sync-free mode the verdict travels as a device flag."""
        if s.nu0 is None or not s.m:
            return False
        s.damping = self._global.damping or _damping.initial_state(s.nu0, s.layout.device)
        s.verdict = _damping.judge(
            s.damping, s.inputs.loss.detach(), s.inputs.c.detach(), s.layout.n, host=not s.sync_free, c_norm=s.c_norm
        )
        if s.sync_free or not bool(s.verdict.reject):  # one host read (exact mode only)
            return False
        self._global.damping, s.returned, diagnostics = move_back(
            s.layout, s.damping, s.verdict, s.inputs.loss.detach(), s.c_out, self._diagnostics
        )
        self._diagnostics.clear()  # in place, as in _record
        self._diagnostics.update(diagnostics)
        return True

    def _form(self, s: _Step) -> None:
        """Phase 3: J as an operator and its solver, then g (J first: c's graph is retained by its backward when
        the objective shares it, and the objective's backward then frees its own graph unless the operator still
        needs c's); in ``jacobian="joint"`` mode both from one backward."""
        given = self._reader.given_jacobian(s.inputs, s.layout)
        joint = None
        if given is None and s.g is None:
            joint = self._jacobian_path.joint(s.inputs.loss, s.inputs.c, s.layout)
        if joint is not None:
            s.g, op = joint
        else:
            op, keep_graph = self._jacobian_path.operator(s.inputs.c, given, s.layout, s.recorder, solver=s.solver_mode)
            if s.g is None:
                s.g = flat_gradient(s.inputs.loss, s.layout, retain_graph=keep_graph)
        s.loss, s.c = s.inputs.loss.detach(), s.inputs.c.detach()
        s.J = make_solver(
            op,
            s.solver_mode,
            rank_tol=self._rank_tol(s.layout),
            sync_free=s.sync_free,
            options=self.krylov_options,
            state={} if self._global.krylov is None else self._global.krylov,
            needs_gram=self._factors_gram(),
            workspace=self._workspace,
        )

    def _check(self, s: _Step) -> None:
        """Phase 4: the inputs finite and J's rows usable (exact mode raises; sync-free mode gets device flags),
        then which parts of the step may change the state: ``ok`` (apply it), ``reject`` (it moves back from a
        rejected step instead) and ``stats`` (feed this gradient to the statistics and count the step)."""
        satisfied = None  # a zero gradient is harmless for a satisfied inequality (c_i < 0): it stays out of the
        if s.num_ineq:  # working set
            satisfied = (torch.arange(s.m, device=s.c.device) >= s.m - s.num_ineq) & (s.c < 0)
        try:
            rows = s.J.row_check() if s.m else None
            s.bad = self._guard.check(s.loss, s.c, s.g, rows, sync_free=s.sync_free, satisfied=satisfied)
        except ZeroJacobianRows as err:
            step_norm = self._diagnostics.get("step_norm")
            raise zero_rows_error(
                err.rows,
                s.inputs.c,
                given=s.inputs.J is not None and not s.inputs.c.requires_grad,
                last_step_norm=None if step_norm is None else float(step_norm),
                x_norm=float(torch.linalg.vector_norm(s.layout.gather().detach())),
            ) from None
        s.ok = None if s.bad is None else ~s.bad.any()
        if s.verdict is not None and s.ok is not None:  # sync-free: a rejected step is a no-op on the state ...
            s.reject = s.verdict.reject & s.ok  # (non-finite inputs are never rejected: the usual refusal)
            s.ok = s.ok & ~s.verdict.reject
        # the statistics (moments, step count) are fed only by a fresh gradient: not again after a rejection,
        # when this step retakes the rejected one from the same point with a larger damping
        retry = None if s.damping is None else s.damping.retry
        if retry is not None and s.ok is None and not bool(retry):  # exact mode (one host read): nothing to mask
            retry = None
        s.stats = s.ok if retry is None else (~retry if s.ok is None else s.ok & ~retry)

    def _context(self, s: _Step) -> StepContext:
        assert s.J is not None and s.g is not None
        ctx = StepContext(
            s.layout, s.loss, s.g, s.c, s.J, s.ok, s.stats, self._next_step_count(s.stats, s.layout.device), s.sync_free
        )
        ctx.damping = None if s.verdict is None else s.verdict.nu
        if s.num_ineq:
            ctx.num_ineq = s.num_ineq
            ctx.warm = InequalityWarmStart(self._global.inequality_active, self._global.projection_active)
        return ctx

    def _admit(self, s: _Step, delta: Tensor, info: dict[str, Any]) -> Tensor:
        """Phase 6: in sync-free mode mask a refused step (non-finite inputs, or a displacement that could not be
        formed) into a no-op; in exact mode refuse an overflowing displacement before anything changes. Then count
        the step and keep what warm-starts the next one (dual partitions, Krylov multipliers)."""
        formed = info.pop("formed", None)
        partitions = (info.pop("active_set", None), info.pop("projection_active_set", None))
        if s.sync_free:
            formed = delta.isfinite().all() if formed is None else formed & delta.isfinite().all()
            self._guard.commit(self._global, s.bad, formed, s.reject)
            s.applied = formed if s.ok is None else s.ok & formed
            delta = torch.where(s.applied, delta, torch.zeros_like(delta))
            counted = formed if s.stats is None else s.stats & formed
        else:
            if not all_finite(delta):  # from finite inputs and a finite projected gradient: overflow
                raise FloatingPointError(
                    "the step could not be formed: non-finite displacement from finite inputs (an overflowing "
                    "linear system); the step was refused and the parameters are unchanged"
                )
            counted = s.stats
        assert s.ctx is not None
        self._commit_step(s.ctx, counted)
        if s.num_ineq:
            keep_partitions(self._global, partitions, s.applied)
            if self._global.damping is not None:  # the last damped step's model no longer predicts this point
                self._global.damping = dataclasses.replace(self._global.damping, model=None, retry=None)
        assert s.J is not None
        if s.J.kind == "krylov" and (s.ok is None or bool(s.applied)):  # (the matrix-free solver syncs anyway)
            s.J.commit()
            self._global.krylov = s.J.state  # (kept only once a step is applied: a refused step changes no state)
        return delta

    def _record(self, s: _Step, delta: Tensor, info: dict[str, Any]) -> Tensor:
        """Phase 7: the damping model for the next judgement (which in sync-free mode may turn δ into the move
        back from a rejected step), the diagnostics, the multipliers and the feasibility watch (exact mode).
        Returns the displacement to apply."""
        J, m, num_ineq = s.J, s.m, s.num_ineq
        assert J is not None
        self._monitor.rank(info, m)
        known = info.pop("Jdelta", None)  # J δ where the solver knows it without a product (exact mode)
        Jdelta = None
        if m and not num_ineq and (s.verdict is not None or s.sync_free or info.get("truncated") or not J.exact(info)):
            Jdelta = J.op.mv(delta) if known is None else known
        # ‖c + Jδ‖, shared by the predicted violation and the damping model
        left = None if Jdelta is None else torch.linalg.vector_norm(s.c.double() + Jdelta.double())
        if m and "c_predicted" not in info:  # the inequality path reports its own (of the QP step, before any α)
            gamma = self._normal_step_sizes(s.layout)
            info["c_predicted"] = predicted_violation(
                s.c, Jdelta, float(gamma.max()) if isinstance(gamma, Tensor) else gamma, s.c_norm, left
            )
        if s.verdict is not None:
            assert s.damping is not None and Jdelta is not None
            self._global.damping, delta, s.returned = record_step(
                s.damping,
                s.verdict,
                layout=s.layout,
                J=J,
                delta=delta,
                Jdelta=Jdelta,
                gamma=self._normal_step_sizes(s.layout),
                returned=s.returned,
                loss=s.loss,
                c=s.c,
                info=info,
                applied=None if s.ok is None else s.applied,
                reject=s.reject,
                c_norm=s.c_norm,
                residual_norm=left if s.reject is None else None,  # (a sync-free move back has another J δ)
            )
        info["step_norm"] = torch.linalg.vector_norm(delta)
        multipliers = info.pop("multipliers", None)
        if multipliers is not None:
            if s.ok is not None:  # a refused step keeps the last estimates (NaN when there are none of this size)
                last = self._report.multipliers
                if last is None or last.shape != multipliers.shape:
                    last = torch.full_like(multipliers, float("nan"))
                multipliers = torch.where(s.applied, multipliers, last)
            self._report.multipliers = multipliers
        # the solver reported max|c| of the same values unless the step returns others (a sync-free move back)
        if m and not num_ineq and not ("c_inf" in info and s.returned[1] is s.c_out):
            info["c_inf"] = s.returned[1].abs().max()
        info["g_norm"] = torch.linalg.vector_norm(s.g)
        if m:
            info.update(J.info(), jacobian=self._jacobian_path.used)
        if self._ranks is not None:
            info["comm_bytes"] = self._ranks.sent_bytes - s.sent
        # in place: a new dict assigned to the attribute is lost when dynamo (torch.compile of the step) resumes
        # after a graph break inside this method; mutating the existing dict is replayed
        self._diagnostics.clear()
        self._diagnostics.update(info)
        if m and not s.sync_free:
            self._watch_feasibility(s, info["c_predicted"])
        return delta

    def _watch_feasibility(self, s: _Step, predicted: Tensor) -> None:
        """Exact mode, before the parameters move (J's products are those of this iterate): feed the monitor and,
        on a stall, test the violation's stationarity (:mod:`sqpoptim._feasibility`)."""
        assert s.J is not None
        v = violation(s.c, s.num_ineq)
        c_norm = float(s.c_norm) if s.c_norm is not None and not s.num_ineq else None  # ‖violation‖ = ‖c‖
        if self._monitor.stalled(v, predicted, c_norm):
            op = s.J.op
            self._monitor.judge_stall(stationarity_cosine(v.to(s.layout.dtype), op.mv, op.rmv))

    def _read_closure(self, out: Any, layout: FlatLayout) -> tuple[StepInputs, Tensor]:
        """The step's inputs and the ``c`` that ``step`` returns (the same, detached, for constrained methods;
        equalities first when the closure returned a :class:`~sqpoptim.Constraints`)."""
        inputs = parse_closure_output(out, layout, max_constraints=layout.n)
        return inputs, inputs.c.detach()

    def _factors_gram(self) -> bool:
        """Whether the method factors the unweighted Gram matrix JJᵀ (then the inputs are validated from its
        diagonal instead of another pass over J)."""
        return True

    def _direction(self, ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:  # pragma: no cover - abstract
        """δ with x_{k+1} = x_k + δ, and the step's diagnostics (at least ``v_norm`` and ``u_norm``)."""
        raise NotImplementedError

    def _next_step_count(self, counted: Tensor | None, device: torch.device) -> Tensor:
        """k for this step: the steps counted so far plus this one if ``counted`` (``None``: counted)."""
        k = self._global.step
        k = torch.zeros((), dtype=torch.float64, device=device) if k is None else k
        return k + (1.0 if counted is None else counted.to(k.dtype))

    def _commit_step(self, ctx: StepContext, counted: Tensor | None) -> None:
        """Store the step count once the step is known to be taken (``counted``: as in
        :meth:`_next_step_count`); subclasses with per-parameter counts extend this."""
        self._global.step = self._next_step_count(counted, ctx.layout.device)

    def _evaluate(self, closure: Callable[[], Any], layout: FlatLayout) -> tuple[StepInputs, Tensor, Tensor]:
        """``(inputs, g, J)`` at the current parameters — every rank's, exchanged, with a process group — for
        extra evaluations of the closure within a step (:meth:`sqpoptim._step_inputs.InputReader.evaluate`)."""
        return self._reader.evaluate(closure, layout, check=self._check_groups, parse=self._read_closure)

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
        return self._report.multipliers

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
        this warns once with :class:`~sqpoptim.InfeasibilityWarning`, in exact mode), ``jacobian`` (how J was formed:
        ``"layers"``, ``"batched"``, ``"loop"``, ``"autograd"``, ``"given"``), ``solver`` (``"dense"`` or
        ``"krylov"``; the matrix-free solver adds ``krylov_iterations``, ``krylov_converged``, ``krylov_test`` —
        1 or 2 for the termination test that stopped the step's solve, 0 for ``rtol``, -1 when capped —,
        ``krylov_residual`` (‖γc + Js‖/‖b‖), ``krylov_cauchy`` (the damped normal step was replaced by its Cauchy
        point, :func:`sqpoptim._krylov.cauchy_safeguard`) and the merit penalty ``penalty``; its one-solve step leaves
        ``v_norm`` and ``u_norm`` NaN), with ``normal_damping`` also ``damping`` (ν), ``damping_ratio`` (ρ),
        ``rejected`` and ``rejected_steps`` (the count so far), plus method-specific entries. As Python numbers
        (waits for the device), or with ``sync=False`` as the device
        tensors themselves (for logging without a synchronisation)."""
        if not sync:
            return dict(self._diagnostics)
        return {k: (v.item() if isinstance(v, Tensor) else v) for k, v in self._diagnostics.items()}


def _as_returned(returned: tuple[Tensor, Tensor], raw: Any) -> tuple[Tensor, Tensor | Constraints]:
    """``(loss, c)`` as ``step`` returns it: c a tensor, or a :class:`~sqpoptim.Constraints` of its detached parts
    when the closure returned one."""
    loss, c = returned
    if not (isinstance(raw, (tuple, list)) and len(raw) >= 2 and isinstance(raw[1], Constraints)):
        return loss, c
    m_eq = c.shape[0] - raw[1].num_ineq
    return loss, Constraints(eq=c[:m_eq], ineq=c[m_eq:])
