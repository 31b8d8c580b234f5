"""Non-finite inputs: refuse the step and leave parameters and state as they were.

``sync_free=False`` (the default on CPU): the step's inputs (loss, c, g, J) are checked with one host read and
a ``FloatingPointError`` is raised at once, before anything is changed; all-zero Jacobian rows are refused in
the same read. ``sync_free=True`` (the default on CUDA): ``step()`` never waits for the device, so the check
yields a device flag that turns the step into an exact no-op (the optimizers mask their updates with it); the
flags are copied to pinned host memory without waiting and reported by a ``FloatingPointError`` at a later
``step()`` (as soon as they have reached the host) or by :meth:`FiniteGuard.raise_pending` with ``wait=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._state import OptimizerState

__all__ = ["FiniteGuard"]

_FLAG_NAMES = ("loss", "constraint values c", "gradient", "Jacobian J")


def nonfinite_message(flags: Sequence[bool], *, deferred: bool) -> str:
    what = ", ".join(name for name, f in zip(_FLAG_NAMES, flags) if f) or "inputs"
    when = "an earlier step" if deferred else "this step"
    return (
        f"non-finite values (NaN or inf) in the {what} at {when}; the step was refused and the parameters "
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
        self, state: OptimizerState, loss: Tensor, c: Tensor, g: Tensor, J: Tensor | None, *, sync_free: bool
    ) -> Tensor | None:
        """Exact mode: raise on non-finite inputs or all-zero Jacobian rows and return ``None``. Sync-free
        mode: return the 0-d device flag "inputs finite" and count refused steps in ``state``."""
        flags = [~loss.isfinite(), ~c.isfinite().all(), ~g.isfinite().all()]
        flags.append(~J.isfinite().all() if J is not None else torch.zeros_like(flags[0]))
        bad = torch.stack(flags)
        if sync_free:
            count = state.nonfinite_steps
            count = torch.zeros((), dtype=torch.long, device=g.device) if count is None else count
            state.nonfinite_steps = count + bad.any().long()
            self._post(torch.cat([state.nonfinite_steps.reshape(1), bad.long()]))
            return ~bad.any()
        m = c.shape[0]
        zero_rows = (J == 0).all(dim=1) if J is not None and m else torch.zeros(0, dtype=torch.bool, device=g.device)
        host = torch.cat([bad, zero_rows]).tolist()  # the one host read of this step's checks
        if any(host[:4]):
            raise FloatingPointError(nonfinite_message(host[:4], deferred=False))
        if any(host[4:]):
            rows = [i for i, z in enumerate(host[4:]) if z][:10]
            raise ValueError(
                f"constraint(s) {rows} do not depend on the parameters (all-zero Jacobian rows); "
                "remove them or check that c is computed from the model"
            )
        return None

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
