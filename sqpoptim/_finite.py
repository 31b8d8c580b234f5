"""Non-finite inputs: refuse the step and leave parameters and state as they were.

``sync_free=False`` (the default on CPU): the step's inputs (loss, c, g, J) are checked with one host read and
a ``FloatingPointError`` is raised at once, before anything is changed; all-zero Jacobian rows are refused in
the same read. ``sync_free=True`` (the default on CUDA): ``step()`` never waits for the device, so the check
yields a device flag that turns the step into an exact no-op (the optimizers mask their updates with it); the
flags are copied to pinned host memory without waiting and reported by a ``FloatingPointError`` at a later
``step()`` (as soon as they have reached the host) or by :meth:`FiniteGuard.raise_pending` with ``wait=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._state import OptimizerState

__all__ = ["FiniteGuard", "ZeroJacobianRows", "all_finite", "require_finite"]

_FLAG_NAMES = (
    "loss",
    "constraint values c",
    "gradient",
    "Jacobian J",
    "Jacobian (all-zero rows of unsatisfied constraints)",
    "step (a singular or overflowing linear system)",
)


class ZeroJacobianRows(ValueError):
    """Exact mode: constraints with ``c_i != 0`` whose Jacobian rows are all zero (``rows``: their indices); the
    optimizer turns this into a message that says why (:func:`sqpoptim._feasibility.zero_rows_error`)."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__(f"constraint(s) {rows} have all-zero Jacobian rows")
        self.rows = rows


def nonfinite_message(flags: Sequence[bool], *, deferred: bool) -> str:
    what = ", ".join(name for name, f in zip(_FLAG_NAMES, flags) if f) or "inputs"
    if deferred:
        return (
            f"non-finite values (NaN or inf) or an unusable {what} at an earlier step; that step was refused and "
            "the parameters and optimizer state were left unchanged"
        )
    return (
        f"non-finite values (NaN or inf) in the {what} at this step; the step was refused and the parameters "
        "and optimizer state are unchanged"
    )


class FiniteGuard:
    """Checks a step's inputs; in sync-free mode keeps the last unread record of refused steps."""

    def __init__(self) -> None:
        self._pending: tuple[Tensor, torch.cuda.Event | None] | None = None
        self._pending_host: Tensor | None = None
        self._seen = 0  # refused steps already reported

    def reset(self, seen: int = 0) -> None:
        """Forget unread records; ``seen`` refused steps count as reported (after ``load_state_dict``)."""
        self._pending, self._seen = None, seen

    def check(
        self,
        loss: Tensor,
        c: Tensor,
        g: Tensor,
        rows: Tensor | None,
        *,
        sync_free: bool,
        satisfied: Tensor | None = None,
    ) -> Tensor | None:
        """Exact mode: raise on non-finite inputs (``FloatingPointError``) or on all-zero Jacobian rows of
        unsatisfied constraints (:class:`ZeroJacobianRows`) and return ``None``. Sync-free mode: return the
        device flags ``[5]`` of what is wrong (all False: the step may go on); report them with :meth:`commit`.

        A zero row of a satisfied constraint (c_i = 0, e.g. c = x² at x = 0) is not an error: the constraint is
        dropped from this step's linearisation like any dependent row; nor is one of a row marked ``satisfied`` (an
        inequality with c_i < 0). ``rows`` (float64 ``[m]``) stands for J: zero exactly at its all-zero rows and
        non-finite exactly at rows with a non-finite entry — the diagonal of JJᵀ, read off the Gram matrix when the
        solver forms it (no other pass over J); ``None`` when m = 0."""
        if not sync_free:
            return self._check_on_host(loss, c, g, rows, satisfied)
        flags = [~loss.isfinite(), ~c.isfinite().all(), ~g.isfinite().all()]
        no = torch.zeros_like(flags[0])
        flags.append(~rows.isfinite().all() if rows is not None else no)
        zero_rows = (rows == 0) & (c != 0) if rows is not None and c.shape[0] else None
        if zero_rows is not None and satisfied is not None:
            zero_rows = zero_rows & ~satisfied
        flags.append(zero_rows.any() if zero_rows is not None else no)
        return torch.stack(flags)

    @staticmethod
    def _check_on_host(loss: Tensor, c: Tensor, g: Tensor, rows: Tensor | None, satisfied: Tensor | None) -> None:
        """Exact mode in one host read of the small inputs: loss, c, the rows' check values, whether each row
        is satisfied, and the sum of g, which is finite when g is (a sum that overflows only sends the check to
        the entrywise test)."""
        m = c.shape[0]
        parts = [loss.reshape(1).double(), g.sum(dtype=torch.float64).reshape(1), c.double()]
        if rows is not None:
            parts.append(rows.double())
            if satisfied is not None:
                parts.append(satisfied.double())
        host = torch.cat(parts).tolist()  # the one host read
        loss_v, g_sum, c_v, rows_v = host[0], host[1], host[2 : 2 + m], host[2 + m : 2 + 2 * m]
        finite = math.isfinite(loss_v) and all(map(math.isfinite, c_v)) and all(map(math.isfinite, rows_v))
        if not (finite and math.isfinite(g_sum)):
            flags = [
                not math.isfinite(loss_v),
                not all(map(math.isfinite, c_v)),
                not bool(g.isfinite().all()),
                not all(map(math.isfinite, rows_v)),
            ]
            if any(flags):
                raise FloatingPointError(nonfinite_message(flags, deferred=False))
        if rows is not None and m and 0.0 in rows_v:  # (the scan for a zero is C; the loop below only then)
            skip = host[2 + 2 * m :] if satisfied is not None else [0.0] * m
            zero = [i for i, (r, ci, sat) in enumerate(zip(rows_v, c_v, skip)) if r == 0 and ci != 0 and not sat]
            if zero:
                raise ZeroJacobianRows(zero)
        return None

    def commit(self, state: OptimizerState, bad: Tensor, formed: Tensor, rejected: Tensor | None) -> None:
        """Sync-free mode: count this step in ``state.nonfinite_steps`` if it was refused (``bad`` inputs, or a
        step not ``formed`` from them unless it was ``rejected`` anyway) and post the record for a later report."""
        not_formed = ~formed if rejected is None else ~formed & ~rejected
        flags = torch.cat([bad, not_formed.reshape(1) & ~bad.any()])
        refused = flags.any()
        count = state.nonfinite_steps
        count = torch.zeros((), dtype=torch.long, device=bad.device) if count is None else count
        state.nonfinite_steps = count + refused.long()
        self._post(torch.cat([state.nonfinite_steps.reshape(1), flags.long()]))

    def _post(self, record: Tensor) -> None:
        if record.device.type == "cuda":
            # One pinned buffer, reused: a later record overwrites an unread one, which is fine because the
            # first entry is the cumulative count of refused steps.
            if self._pending_host is None or self._pending_host.shape != record.shape:
                self._pending_host = torch.empty(record.shape, dtype=record.dtype, pin_memory=True)
            host = self._pending_host
            host.copy_(record, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        else:
            self._pending = (record, None)

    def raise_pending(self, *, wait: bool) -> None:
        """Raise ``FloatingPointError`` if a step since the last report was refused (sync-free mode); without
        ``wait``, only when the record has already reached the host."""
        if self._pending is None:
            return
        host, event = self._pending
        if event is not None and not wait and not event.query():
            return  # not on the host yet; checked at a later step
        if event is not None:
            event.synchronize()
        record = host.tolist()
        self._pending = None
        if record[0] > self._seen:
            self._seen = record[0]
            raise FloatingPointError(nonfinite_message(record[1:], deferred=True))


_DOT_DTYPES = (torch.float32, torch.float64)


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite, with one host read of its float64 sum: a sum is finite when every
    entry is, and only a sum that is not goes on to the entrywise test (an overflowing sum of finite entries).
    On the CPU ``isfinite().all()`` costs 5-50 times the sum (measured at n = 2e3 and 1e5)."""
    return math.isfinite(x.sum(dtype=torch.float64).item()) or bool(x.isfinite().all())


def require_finite(*, sync_free: bool, **named: Tensor) -> Tensor | None:
    """Intermediate quantities of a direction (a projected gradient, a normal step) that must be finite before
    they touch the optimizer's state; non-finite ones come from finite inputs only through a singular system or
    an overflow. Exact mode: raise ``FloatingPointError`` naming them (one host read) and return ``None``.
    Sync-free mode: return "all finite" as a 0-d bool on the device.

    A value is "finite" here when its square is: moments store squares, and a float32 entry above ~1.8e19
    would write inf into them. Exact mode screens the values by their squared norms (finite when every square
    is) in one host read, and tests entry by entry only when a norm overflows."""
    live = [value for value in named.values() if value.numel()]
    if not sync_free and live and all(value.dim() == 1 and value.dtype in _DOT_DTYPES for value in live):
        squares = torch.stack([torch.dot(value, value).double() for value in live]).tolist()  # the one host read
        if all(map(math.isfinite, squares)):
            return None
    flags = [value.abs().amax() < torch.finfo(value.dtype).max ** 0.5 for value in named.values() if value.numel()]
    if not flags:
        return None if not sync_free else torch.ones((), dtype=torch.bool, device=next(iter(named.values())).device)
    good = torch.stack(flags).all()
    if sync_free:
        return good
    if not bool(good):
        bad = [name.replace("_", " ") for name, f in zip(named, flags) if not bool(f)]
        raise FloatingPointError(
            f"the step could not be formed: non-finite or overflowing {', '.join(bad)} from finite inputs "
            "(a singular or overflowing linear system); the step was refused and the parameters and optimizer "
            "state are unchanged"
        )
    return None


def both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a & b`` where ``None`` means True."""
    if a is None:
        return b
    return a if b is None else a & b
