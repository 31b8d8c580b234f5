"""Machinery shared by the constrained optimizers: the closure contract, validation, the flat parameter layout,
flat state buffers, per-group hyperparameters, non-finite handling and diagnostics.

The closure contract
--------------------
``step(closure)`` calls ``closure()`` with gradients enabled. The closure returns ``(loss, c)`` or
``(loss, c, J)``: a scalar loss, a 1-D tensor ``c`` of equality-constraint residuals (``None`` or an empty
tensor when there are none; a :class:`~sqpoptim.PointwiseConstraints` for the ``torch.func`` path), and
optionally the Jacobian, dense ``[m, n]`` over the flattened parameters or a sequence of per-parameter tensors
``[m, *p.shape]``. The closure must *not* call ``backward()``: the optimizer forms the gradient of ``loss``
and the Jacobian of ``c`` itself (one backward pass for g, one batched pass for J), and ``p.grad`` is left
alone. ``step`` returns the detached ``(loss, c)`` it saw.

Flat layout
-----------
Trainable parameters (``requires_grad=True``), param group by param group, are viewed as one vector x of
length n (complex parameters through their real views). Per-parameter optimizer state (``exp_avg``, ...) is
stored as views into one flat buffer per state name, so the step works on whole vectors while
``optimizer.state[p]`` keeps the ``torch.optim`` layout (and ``state_dict`` its format).

Synchronisation
---------------
``sync_free=False`` (default on CPU): non-finite inputs raise at once, before anything is changed, and a
rank-deficient Jacobian switches to a truncated eigendecomposition; both decisions read a flag on the host.
``sync_free=True`` (default on CUDA): ``step()`` never waits for the device. A step with a non-finite loss,
gradient, c or J is applied as a no-op on the device (parameters and state bit-identical) and reported by a
``FloatingPointError`` at a later ``step()`` (as soon as the flag has reached the host, read without waiting)
or by :meth:`ConstrainedOptimizer.check_finite`; rank deficiency is handled by the shifted factorisation of
:mod:`sqpoptim._linalg`.

Globalised normal step (``normal_damping``)
-------------------------------------------
Each ``step`` first judges the previous one from the new c (:meth:`ConstrainedOptimizer._judge_last_step`). A
rejected step is undone: in exact mode ``step`` moves the parameters back and returns without forming g or J (one
host read decides it); in sync-free mode the same decision is a masked no-op on the device that moves the
parameters back. Either way the moments and the step count are untouched, ``diagnostics()["rejected"]`` says
so, and ``state["global"]["rejected_steps"]`` counts them. The last accepted point is kept (one extra copy of
the parameters).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._jacobian import PointwiseConstraints, flat_size, jacobian
from ._linalg import default_rank_tol

__all__ = ["ConstrainedOptimizer", "RankDeficiencyWarning", "StepContext"]

_GLOBAL = "global"  # key of the state that is not tied to one parameter
_FLAG_NAMES = ("loss", "constraint values c", "gradient", "Jacobian J")
# Range of the relative Levenberg–Marquardt damping ν (see ConstrainedOptimizer._judge_last_step).
_NU_MIN, _NU_MAX = 1e-6, 1e4
_NU_RELAX = 0.9  # ν's factor per step while the tangential step dominates (see _judge_last_step)


class RankDeficiencyWarning(UserWarning):
    """The constraint Jacobian was rank-deficient or ill-conditioned; the step used its independent part."""


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


@dataclass
class _Layout:
    key: tuple
    params: list[Tensor]
    views: list[Tensor]  # real views of params
    sizes: list[int]
    n: int
    group_bounds: list[tuple[int, int]]
    dtype: torch.dtype
    device: torch.device


@dataclass
class StepContext:
    """Everything a subclass needs to compute one step, all on the parameters' device."""

    layout: _Layout
    loss: Tensor
    g: Tensor  # [n] gradient of the loss
    c: Tensor  # [m]
    J: Tensor  # [m, n]
    ok: Tensor | None  # 0-d bool: inputs finite (sync_free mode only; None when already checked on the host)
    damping: Tensor | None = None  # ν of the Levenberg–Marquardt normal step (None: undamped)
    diagnostics: dict[str, Tensor] = field(default_factory=dict)


class ConstrainedOptimizer(Optimizer):
    """Base class. Subclasses set ``_flat_state_names`` and implement :meth:`_update`."""

    _flat_state_names: ClassVar[tuple[str, ...]] = ()
    _uses_constraints: ClassVar[bool] = True

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        jacobian: str = "batched",
        chunk_size: int | None = None,
        rank_tol: float | None = None,
        sync_free: bool | None = None,
        normal_damping: float | None = None,
    ) -> None:
        if jacobian not in ("batched", "loop"):
            raise ValueError(f"Invalid jacobian {jacobian!r}: expected 'batched' or 'loop'")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"Invalid chunk_size: {chunk_size!r} (a positive int or None)")
        if rank_tol is not None and not 0.0 < rank_tol < 1.0:
            raise ValueError(f"Invalid rank_tol: {rank_tol} (expected 0 < rank_tol < 1)")
        if normal_damping is not None and not (
            isinstance(normal_damping, (int, float)) and _NU_MIN <= normal_damping <= _NU_MAX
        ):
            raise ValueError(
                f"Invalid normal_damping: {normal_damping!r} (None, or the initial relative damping ν0 in "
                f"[{_NU_MIN:g}, {_NU_MAX:g}])"
            )
        super().__init__(params, defaults)
        self.normal_damping = None if normal_damping is None else float(normal_damping)
        self.jacobian_mode = jacobian
        self.chunk_size = chunk_size
        self.rank_tol = rank_tol
        self.sync_free = sync_free
        self._layout_cache: _Layout | None = None
        self._flat: dict[str, Tensor] | None = None
        self._flat_key: tuple | None = None
        self._jacobian_warned = [False]
        self._rank_warned = False
        self._pending: tuple[Tensor, Any] | None = None
        self._pending_host: Tensor | None = None
        self._nonfinite_seen = 0

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _check_lr(lr: float, name: str = "learning rate") -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"Invalid {name}: {lr}")

    @staticmethod
    def _check_beta(beta: float, name: str) -> None:
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid {name}: {beta} (expected 0 <= {name} < 1)")

    # ------------------------------------------------------------------ layout and state
    def _layout(self) -> _Layout:
        key = tuple((id(p), p.requires_grad) for g in self.param_groups for p in g["params"])
        if self._layout_cache is not None and self._layout_cache.key == key:
            return self._layout_cache
        params, bounds, off = [], [], 0
        for group in self.param_groups:
            start = off
            for p in group["params"]:
                if p.requires_grad:
                    params.append(p)
                    off += flat_size(p)
            bounds.append((start, off))
        if not params:
            raise ValueError("the optimizer has no parameter with requires_grad=True")
        dtypes = {_real(p).dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1:
            raise ValueError(f"all trainable parameters must share one dtype; got {sorted(map(str, dtypes))}")
        if len(devices) > 1:
            raise ValueError(f"all trainable parameters must be on one device; got {sorted(map(str, devices))}")
        views = [_real(p) for p in params]
        self._layout_cache = _Layout(
            key, params, views, [v.numel() for v in views], off, bounds, dtypes.pop(), devices.pop()
        )
        return self._layout_cache

    def _global_state(self) -> dict[str, Any]:
        return self.state[_GLOBAL]

    def _flat_state(self, layout: _Layout) -> dict[str, Tensor]:
        """Flat buffers of the per-parameter state; ``self.state[p][name]`` are views into them."""
        if self._flat is not None and self._flat_key == layout.key:
            return self._flat
        flat = {}
        for name in self._flat_state_names:
            buf = torch.zeros(layout.n, dtype=layout.dtype, device=layout.device)
            off = 0
            for p, size in zip(layout.params, layout.sizes):
                old = self.state[p].get(name) if p in self.state else None
                if old is not None:
                    if old.numel() != size:
                        raise ValueError(f"state {name!r} of a parameter has {old.numel()} entries, expected {size}")
                    buf[off : off + size].copy_(_real(old).reshape(-1))
                self.state[p][name] = buf[off : off + size].view(_real(p).shape)
                off += size
            flat[name] = buf
        # Parameters that left the layout (requires_grad turned off) keep a private copy of their state.
        live = {id(p) for p in layout.params}
        for p, st in self.state.items():
            if isinstance(p, Tensor) and id(p) not in live:
                for name in self._flat_state_names:
                    if name in st:
                        st[name] = st[name].clone()
        self._flat, self._flat_key = flat, layout.key
        return flat

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._layout_cache, self._flat, self._flat_key = None, None, None
        glob = self.state.get(_GLOBAL)
        self._pending = None
        self._nonfinite_seen = 0
        if glob:
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            self.state[_GLOBAL] = glob = _to_device(glob, device)
            if "nonfinite_steps" in glob:  # skips recorded before the checkpoint were reported then
                self._nonfinite_seen = int(glob["nonfinite_steps"])

    def _per_coordinate(self, layout: _Layout, values: Sequence[float]) -> float | Tensor:
        """A per-group hyperparameter as a scalar when all groups agree, else as a flat ``[n]`` tensor."""
        if all(v == values[0] for v in values):
            return float(values[0])
        out = torch.empty(layout.n, dtype=layout.dtype, device=layout.device)
        for (start, end), v in zip(layout.group_bounds, values):
            out[start:end] = v
        return out

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """One step; see the class docstring for the algorithm and the module docstring for the contract."""
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step() needs a closure returning (loss, c) or (loss, c, J)")
        self._raise_pending_nonfinite(wait=False)
        layout = self._layout()
        sync_free = self.sync_free if self.sync_free is not None else layout.device.type == "cuda"
        with torch.enable_grad():
            out = closure()
            loss, c, J = self._unpack(out, layout)
            if not self._uses_constraints:
                c_used, J_used = c.new_zeros(0), None
            else:
                c_used, J_used = c, J
            judged = None
            if self.normal_damping is not None and c_used.shape[0]:
                judged = self._judge_last_step(loss.detach(), c_used.detach(), layout.n)
                if not sync_free and bool(judged["reject"]):  # one host read (exact mode only)
                    return self._reject(layout, judged, loss.detach(), c.detach())
            # g first (its errors are the clearer ones, e.g. sparse gradients), keeping the graph for J
            g = self._form_gradient(loss, layout, retain_graph=J_used is None and c_used.shape[0] > 0)
            if J_used is None:
                J_used = self._form_jacobian(c_used, layout)
        ok = self._check_finite_inputs(loss, c_used.detach(), g, J_used, sync_free)
        reject = None
        if judged is not None and ok is not None:  # sync-free: a rejected step is a no-op on the state ...
            reject = judged["reject"] & ok  # (non-finite inputs are never rejected: the usual refusal)
            ok = ok & ~judged["reject"]
        ctx = StepContext(layout, loss.detach(), g, c_used.detach(), J_used, ok)
        if judged is not None:
            ctx.damping = judged["nu"]
        delta = self._update(ctx)
        if ok is not None:
            delta = torch.where(ok, delta, torch.zeros_like(delta))
        if judged is not None:
            x = torch.cat([v.reshape(-1) for v in layout.views])
            x_prev = self._global_state().get("damping_x")
            if reject is not None and x_prev is not None and x_prev.numel() == x.numel():
                # ... that moves the parameters back to the last accepted point
                delta = torch.where(reject, x_prev - x, delta)
            self._record_damping(ctx, judged, delta, x, reject)
        torch._foreach_add_(layout.views, [d.view_as(v) for d, v in zip(delta.split(layout.sizes), layout.views)])
        glob = self._global_state()
        ctx.diagnostics["g_norm"] = torch.linalg.vector_norm(g)
        glob["diagnostics"] = ctx.diagnostics
        return loss.detach(), c.detach()

    def _update(self, ctx: StepContext) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ closure output
    def _unpack(self, out: Any, layout: _Layout) -> tuple[Tensor, Tensor, Tensor | None]:
        if isinstance(out, Tensor) and not self._uses_constraints:
            out = (out, None)
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise TypeError(
                f"the closure must return (loss, c) or (loss, c, J); got {type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            )
        loss, c = out[0], out[1]
        J_given = out[2] if len(out) == 3 else None
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"the loss must be a scalar tensor; got {shape}")
        loss = loss.reshape(())
        J = None
        if isinstance(c, PointwiseConstraints):
            if J_given is not None:
                raise ValueError("give J either through PointwiseConstraints or as the third value, not both")
            c, J = c.evaluate(layout.params, layout.n) if self._uses_constraints else (loss.new_zeros(0), None)
        elif c is None:
            c = loss.new_zeros(0).detach()
        elif not isinstance(c, Tensor):
            raise TypeError(f"c must be a 1-D tensor, None or PointwiseConstraints; got {type(c).__name__}")
        if c.dim() != 1:
            raise ValueError(f"c must be a 1-D tensor of constraint residuals; got shape {tuple(c.shape)}")
        if c.device != layout.device:
            raise ValueError(f"c is on {c.device} but the parameters are on {layout.device}")
        if not (c.is_floating_point()):
            raise ValueError(f"c must be a floating-point tensor; got {c.dtype}")
        m = c.shape[0]
        if self._uses_constraints and m > layout.n:
            raise ValueError(
                f"more constraints than parameters: m = {m} > n = {layout.n}; the linearised constraints "
                "J d = -c cannot have full row rank"
            )
        if J_given is not None and self._uses_constraints:
            J = self._dense_jacobian(J_given, m, layout)
        return loss, c, J

    def _dense_jacobian(self, J: Any, m: int, layout: _Layout) -> Tensor:
        if isinstance(J, Tensor):
            if J.shape != (m, layout.n):
                raise ValueError(f"J must have shape [m, n] = [{m}, {layout.n}]; got {tuple(J.shape)}")
            blocks = [J]
        elif isinstance(J, (list, tuple)):
            if len(J) != len(layout.params):
                raise ValueError(f"J has {len(J)} blocks but there are {len(layout.params)} trainable parameters")
            blocks = []
            for i, (Jp, p) in enumerate(zip(J, layout.params)):
                if not isinstance(Jp, Tensor) or Jp.shape != (m, *p.shape):
                    shape = tuple(Jp.shape) if isinstance(Jp, Tensor) else type(Jp).__name__
                    raise ValueError(f"J block {i} must have shape {(m, *p.shape)}; got {shape}")
                blocks.append(_real(Jp).reshape(m, -1))
        else:
            raise TypeError(f"J must be a tensor or a sequence of tensors; got {type(J).__name__}")
        for Jp in blocks:
            if Jp.dtype != layout.dtype:
                raise ValueError(f"J has dtype {Jp.dtype} but the parameters have {layout.dtype}")
            if Jp.device != layout.device:
                raise ValueError(f"J is on {Jp.device} but the parameters are on {layout.device}")
            if Jp.is_sparse:
                raise ValueError("sparse Jacobians are not supported; pass a dense tensor")
        return blocks[0].detach() if len(blocks) == 1 else torch.cat([b.detach() for b in blocks], dim=1)

    def _form_jacobian(self, c: Tensor, layout: _Layout) -> Tensor:
        return jacobian(
            c,
            layout.params,
            layout.n,
            mode=self.jacobian_mode,
            chunk_size=self.chunk_size,
            warned=self._jacobian_warned,
        )

    @staticmethod
    def _form_gradient(loss: Tensor, layout: _Layout, retain_graph: bool = False) -> Tensor:
        if not loss.requires_grad:  # e.g. a pure feasibility problem: f is constant
            return torch.zeros(layout.n, dtype=layout.dtype, device=layout.device)
        grads = torch.autograd.grad(loss, layout.params, allow_unused=True, retain_graph=retain_graph)
        parts = []
        for gp, v in zip(grads, layout.views):
            if gp is None:
                parts.append(torch.zeros(v.numel(), dtype=v.dtype, device=v.device))
                continue
            if gp.is_sparse:
                raise ValueError("sparse gradients are not supported (use a dense embedding, sparse=False)")
            parts.append(_real(gp).reshape(-1))
        return torch.cat(parts)

    # ------------------------------------------------------------------ non-finite handling
    def _check_finite_inputs(self, loss: Tensor, c: Tensor, g: Tensor, J: Tensor, sync_free: bool) -> Tensor | None:
        bad = torch.stack([~loss.isfinite(), ~c.isfinite().all(), ~g.isfinite().all(), ~J.isfinite().all()])
        if sync_free:
            glob = self._global_state()
            count = glob.get("nonfinite_steps")
            count = torch.zeros((), dtype=torch.long, device=g.device) if count is None else count
            glob["nonfinite_steps"] = count + bad.any().long()
            glob["nonfinite_flags"] = bad
            self._post_pending(torch.cat([glob["nonfinite_steps"].reshape(1), bad.long()]))
            return ~bad.any()
        m = c.shape[0]
        zero_rows = (J == 0).all(dim=1) if m else torch.zeros(0, dtype=torch.bool, device=g.device)
        flags = torch.cat([bad, zero_rows]).tolist()  # the one host read of this step's checks
        if any(flags[:4]):
            raise FloatingPointError(self._nonfinite_message(flags[:4], deferred=False))
        if any(flags[4:]):
            rows = [i for i, z in enumerate(flags[4:]) if z][:10]
            raise ValueError(
                f"constraint(s) {rows} do not depend on the parameters (all-zero Jacobian rows); "
                "remove them or check that c is computed from the model"
            )
        return None

    @staticmethod
    def _nonfinite_message(flags: Sequence[bool], *, deferred: bool) -> str:
        what = ", ".join(name for name, f in zip(_FLAG_NAMES, flags) if f) or "inputs"
        when = "an earlier step" if deferred else "this step"
        return (
            f"non-finite values (NaN or inf) in the {what} at {when}; the step was refused and the parameters "
            "and optimizer state are unchanged"
        )

    def _post_pending(self, record: Tensor) -> None:
        if record.device.type == "cuda":
            # One pinned buffer, reused: a later record overwrites an unread one, which is fine because the
            # first entry is the cumulative count of skipped steps.
            if self._pending_host is None or self._pending_host.shape != record.shape:
                self._pending_host = torch.empty(record.shape, dtype=record.dtype, pin_memory=True)
            host = self._pending_host
            host.copy_(record, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        else:
            self._pending = (record, None)

    def _raise_pending_nonfinite(self, *, wait: bool) -> None:
        if self._pending is None:
            return
        host, event = self._pending
        if event is not None and not wait and not event.query():
            return  # not on the host yet; checked at a later step
        if event is not None:
            event.synchronize()
        record = host.tolist()
        self._pending = None
        if record[0] > self._nonfinite_seen:
            self._nonfinite_seen = record[0]
            raise FloatingPointError(self._nonfinite_message(record[1:], deferred=True))

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` if a step since the last check was skipped for non-finite inputs
        (``sync_free`` mode). Waits for the device."""
        self._raise_pending_nonfinite(wait=True)

    # ------------------------------------------------------------------ shared numerics
    def _rank_tol(self, layout: _Layout) -> float:
        return self.rank_tol if self.rank_tol is not None else default_rank_tol(layout.dtype)

    def _normal_step_sizes(self, layout: _Layout) -> float | Tensor:
        """γ per group: ``normal_lr``, or the group's ``lr`` where it is ``None``."""
        return self._per_coordinate(
            layout, [g["lr"] if g["normal_lr"] is None else g["normal_lr"] for g in self.param_groups]
        )

    def _judge_last_step(self, loss: Tensor, c: Tensor, n: int) -> dict[str, Tensor]:
        r"""Judge the last step from the new residual c and return ν for this step (device tensors, no host
        synchronisation): ``nu``, ``escalation``, ``rho`` and ``reject``.

        After step k the linear model predicted :math:`\|c_k + J_k\delta_k\|` (δ_k the whole step taken) and
        this closure gives the actual :math:`\|c_{k+1}\|`;
        :math:`\rho = (\|c_k\| - \|c_{k+1}\|)/(\|c_k\| - \|c_k + J_k\delta_k\|)`. ν follows Nielsen's
        Levenberg–Marquardt rule (1999): on success (ρ ≥ 0) :math:`\nu \leftarrow \nu\max(1/3, 1 - (2\rho-1)^3)`
        (a third for an exact model, doubled as ρ → 0) and the escalation factor resets to 2; on failure (ρ < 0:
        the violation grew) the step is **rejected** — the parameters go back
        to :math:`x_k`, the moments are not touched — and ν is multiplied by the escalation factor, which doubles
        (2, 4, 8, ... on consecutive failures). ν stays in [1e-6, 1e4]: the floor bounds the amplification of
        the near-null directions of J (:math:`\|v\| \le \|c\|/(2\sqrt{\mu})`), which is where the overshoots
        of piecewise-linear networks come from, whose linear model is exact until a step crosses a kink.

        The model's error is second order in the *whole* step, so ρ only judges the normal step when that step
        was the larger part (:math:`\|\gamma v_k\| > \|u_k\|`). Otherwise nothing is rejected (damping the
        normal step cannot shrink an error made by the tangential step, and rejecting it would repeat it
        forever) and ν relaxes by 10 % per step: a damped normal step is small, so without this it would never be
        judged again, ν would stay where a failure left it and c would drift or converge slowly (measured on
        Darcy: max |c| 0.26 after 300 steps against 5e-4 undamped). A relaxed step that overshoots is rejected
        like any other. (Halving ν at each such step relaxed too fast: 775 of 5,000 steps rejected on C1, and
        worse fits.) A step whose model predicted no decrease
        (and the step after a rejection, taken from the same point) is not judged and leaves ν alone. Non-finite
        values are not a failure of this kind: they are refused with the parameters and state unchanged, as
        without damping (see the module docstring)."""
        glob = self._global_state()
        dev = c.device
        nu = glob.get("damping")
        nu = torch.full((), self.normal_damping, dtype=torch.float64, device=dev) if nu is None else nu
        escalation = glob.get("damping_escalation")
        escalation = torch.full_like(nu, 2.0) if escalation is None else escalation
        model = glob.get("damping_model")
        x_prev = glob.get("damping_x")
        if x_prev is not None and x_prev.numel() != n:  # the trainable parameters changed: start afresh
            model = None
        if model is None:
            no = torch.zeros((), dtype=torch.bool, device=dev)
            return {"nu": nu, "escalation": escalation, "rho": torch.full_like(nu, math.nan), "reject": no}
        before, predicted, normal_dominates = model[0], model[1], model[2] > 0
        actual = torch.linalg.vector_norm(c.double())
        pred = before - predicted
        rho = (before - actual) / torch.where(pred > 0, pred, 1.0)
        finite = actual.isfinite() & loss.isfinite()  # non-finite values are refused as without damping
        judged = (pred > 0) & normal_dominates & finite
        failure = judged & (rho < 0)
        success = judged & (rho >= 0)
        nielsen = (1.0 - (2.0 * rho - 1.0) ** 3).clamp_min(1.0 / 3.0)
        # not judged because the tangential step dominated: relax ν by half, or a damped (hence small) normal step
        # would never be judged again and c would drift; a relaxed step that overshoots is rejected
        relax = finite & (pred > 0) & ~normal_dominates
        factor = torch.where(
            failure,
            escalation,
            torch.where(success, nielsen, torch.where(relax, torch.full_like(nu, _NU_RELAX), torch.ones_like(nu))),
        )
        return {
            "nu": (nu * factor).clamp(_NU_MIN, _NU_MAX),
            "escalation": torch.where(
                failure, (2.0 * escalation).clamp_max(2.0**20), torch.where(success, 2.0, escalation)
            ),
            "rho": torch.where(judged, rho, torch.full_like(rho, math.nan)),
            "reject": failure,
        }

    def _reject(self, layout: _Layout, judged: dict[str, Tensor], loss: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """Exact mode: move the parameters back to the last accepted point and keep the escalated ν."""
        glob = self._global_state()
        x_prev = glob["damping_x"]
        with torch.no_grad():  # called from inside the closure's enable_grad block
            torch._foreach_copy_(layout.views, [x.view_as(v) for x, v in zip(x_prev.split(layout.sizes), layout.views)])
        glob["damping"], glob["damping_escalation"] = judged["nu"], judged["escalation"]
        glob["damping_model"] = _unjudged(glob["damping_model"])
        glob["rejected_steps"] = glob.get("rejected_steps", 0) + 1
        glob["diagnostics"] = {
            "c_inf": c.abs().max(),
            "rejected": True,
            "damping": judged["nu"],
            "damping_ratio": judged["rho"],
        }
        return loss, c

    def _record_damping(
        self, ctx: StepContext, judged: dict[str, Tensor], delta: Tensor, x: Tensor, reject: Tensor | None
    ) -> None:
        """After a step: store ν, the point x_k and the model (‖c_k‖, ‖c_k + J_k δ_k‖, whether the normal step
        dominated) for the next step's judgement."""
        glob = self._global_state()
        c64 = ctx.c.double()
        gamma = self._normal_step_sizes(ctx.layout)
        gamma = gamma.max().double() if isinstance(gamma, Tensor) else gamma
        normal = gamma * ctx.diagnostics["v_norm"].double()
        model = torch.stack(
            [
                torch.linalg.vector_norm(c64),
                torch.linalg.vector_norm(c64 + (ctx.J @ delta).double()),
                (normal > ctx.diagnostics["u_norm"].double()).double(),
            ]
        )
        nu, escalation = judged["nu"], judged["escalation"]
        if reject is None:  # exact mode: this step was accepted (x is a fresh copy of x_k, not a view)
            glob["damping_x"] = x
            ctx.diagnostics["rejected"] = False
        else:  # sync-free: an accepted, rejected or refused (non-finite) step, decided on the device
            old_model, old_nu = glob.get("damping_model"), glob.get("damping", nu)
            old_escalation = glob.get("damping_escalation", escalation)
            accepted = ctx.ok
            if old_model is not None:
                model = torch.where(accepted, model, torch.where(reject, _unjudged(old_model), old_model))
            keep = ~(accepted | reject)  # refused for non-finite inputs: ν unchanged
            nu = torch.where(keep, old_nu, nu)
            escalation = torch.where(keep, old_escalation, escalation)
            x_prev = glob.get("damping_x")
            fresh = x_prev is None or x_prev.numel() != x.numel()
            glob["damping_x"] = x if fresh else torch.where(accepted, x, x_prev)
            glob["rejected_steps"] = glob.get("rejected_steps", torch.zeros((), dtype=torch.long, device=x.device))
            glob["rejected_steps"] = glob["rejected_steps"] + reject.long()
            ctx.diagnostics["rejected"] = reject
        glob["damping_model"] = model
        glob["damping"], glob["damping_escalation"] = nu, escalation
        ctx.diagnostics["damping"] = nu
        ctx.diagnostics["damping_ratio"] = judged["rho"]

    def _finish(self, ctx: StepContext, delta: Tensor, info: dict[str, Any]) -> Tensor:
        """Record the step's diagnostics (warning once about a truncated Jacobian) and pass ``delta`` on."""
        self._warn_if_truncated(info, ctx.c.shape[0])
        ctx.diagnostics.update(info)
        return delta

    def _warn_if_truncated(self, info: dict[str, Any], m: int) -> None:
        if info.get("truncated") and not self._rank_warned:
            self._rank_warned = True
            warnings.warn(
                f"the constraint Jacobian is rank-deficient or ill-conditioned (rank used {int(info['rank'])} "
                f"of {m}); steps use its independent part (see optimizer.diagnostics())",
                RankDeficiencyWarning,
                stacklevel=4,
            )

    def _next_step_count(self, ctx: StepContext) -> Tensor:
        """Increment and return the global step count k (a device tensor; skipped steps do not count)."""
        glob = self._global_state()
        k = glob.get("step")
        k = torch.zeros((), dtype=torch.float64, device=ctx.g.device) if k is None else k
        k = k + (1.0 if ctx.ok is None else ctx.ok.to(k.dtype))
        glob["step"] = k
        return k

    def diagnostics(self) -> dict[str, float]:
        """The last step's diagnostics as Python numbers (waits for the device): ``c_inf`` (max |c|),
        ``v_norm`` (‖v_k‖, the unscaled normal step), ``u_norm`` (‖u_k‖, the tangential displacement taken),
        ``rank`` (rank of J used; -1 when a deficient J was regularised on the device), ``gram_cond``
        (estimated condition number of the Gram matrix), ``g_norm`` (‖g_k‖, the objective gradient the closure
        produced), plus method-specific entries."""
        diag = self._global_state().get("diagnostics", {})
        return {k: (v.item() if isinstance(v, Tensor) else v) for k, v in diag.items()}


def _unjudged(model: Tensor) -> Tensor:
    """The damping model after a rejection: no predicted decrease, so the next step neither judges nor relaxes
    ν (it is taken from the same point with the escalated ν)."""
    return torch.stack([model[0], model[0], torch.zeros_like(model[0])])


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, copy=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj
