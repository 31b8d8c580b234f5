r"""Carrying out the damping's verdict on the parameters: moving back from a rejected step, and recording the
step just taken for the next judgement.

:mod:`sqpoptim._damping` decides (pure functions on :class:`~sqpoptim._state.DampingState`); this module acts on
the flat parameter vector. A rejected step is undone in one of two ways:

* exact mode (:func:`move_back`): at once, before anything else of the step — the parameters go back to
  :math:`x_{\text{accepted}}`, ν escalates, and ``step`` returns the loss and c the closure gave there; the next
  call retakes the step from that point with the larger ν;
* sync-free mode (:func:`record_step`): without a host read, as this step's displacement — where the device
  flag says "rejected", δ becomes :math:`x_{\text{accepted}} - x` — so the state moves in the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _damping
from ._constraint_solver import ConstraintSolver
from ._layout import FlatLayout
from ._state import DampingState

__all__ = ["move_back", "record_step", "rejected_count"]


def rejected_count(damping: DampingState) -> Tensor | int:
    return 0 if damping.rejected_steps is None else damping.rejected_steps


def move_back(
    layout: FlatLayout,
    damping: DampingState,
    verdict: _damping.Verdict,
    loss: Tensor,
    c: Tensor,
    diagnostics: dict[str, Any],
) -> tuple[DampingState, tuple[Tensor, Tensor], dict[str, Any]]:
    """Exact mode: move the parameters back to the last accepted point; returns the damping state after the
    rejection, the values at that point, and the diagnostics. These keep their keys: no displacement was formed
    (``v_norm`` and ``u_norm`` are 0); ``rank``, ``gram_cond`` and ``g_norm`` are those of the last formed
    step."""
    assert damping.x_accepted is not None
    with torch.no_grad():  # called from inside the closure's enable_grad block; the real views of complex
        x_rejected = layout.gather()  # parameters were made without grad mode and may not be read with it
        layout.assign(damping.x_accepted)
    state = _damping.rejected(damping, verdict)
    loss, c = _damping.values_after(damping, None, loss, c)
    zero = torch.zeros((), dtype=layout.dtype, device=layout.device)
    diagnostics = {
        **diagnostics,
        "c_inf": c.abs().max(),
        "v_norm": zero,
        "u_norm": zero,
        "step_norm": torch.linalg.vector_norm(damping.x_accepted - x_rejected),
        "rejected": True,
        "damping": verdict.nu,
        "damping_ratio": verdict.rho,
        "rejected_steps": rejected_count(state),
    }
    return state, (loss, c), diagnostics


def record_step(
    damping: DampingState,
    verdict: _damping.Verdict,
    *,
    layout: FlatLayout,
    J: ConstraintSolver,
    delta: Tensor,
    Jdelta: Tensor,
    gamma: float | Tensor,
    returned: tuple[Tensor, Tensor],
    loss: Tensor,
    c: Tensor,
    info: dict[str, Any],
    applied: Tensor | None,
    reject: Tensor | None,
    c_norm: Tensor | None = None,
    residual_norm: Tensor | None = None,
) -> tuple[DampingState, Tensor, tuple[Tensor, Tensor]]:
    """The damping state after this step, the displacement to apply and the values ``step`` returns.

    Sync-free mode (``reject`` a device flag): a rejected last step turns this step's displacement into the move
    back to the accepted point (and the returned values into that point's); ``applied`` says whether this step's
    displacement is applied at all. Exact mode (both ``None``): the step is accepted. ``info`` gains the
    damping's diagnostics (``rejected``, ``damping``, ``damping_ratio``, ``rejected_steps``); ``c_norm`` and
    ``residual_norm`` are ‖c‖ and ‖c + J δ‖ (float64) where the caller has them."""
    x = layout.gather()
    x_prev = damping.x_accepted
    if reject is not None and x_prev is not None and x_prev.numel() == x.numel():
        delta = torch.where(reject, x_prev - x, delta)
        Jdelta = J.op.mv(delta)
        returned = _damping.values_after(damping, reject, loss, returned[1])
        for key in ("v_norm", "u_norm"):
            info[key] = torch.where(reject, torch.zeros_like(info[key]), info[key])
    gamma = gamma.max().double() if isinstance(gamma, Tensor) else gamma
    state = _damping.record(
        damping,
        verdict,
        loss=loss,
        c=c,
        Jdelta=Jdelta,
        normal_norm=gamma * info["v_norm"].double(),
        u_norm=info["u_norm"],
        x=x,
        ok=applied,
        reject=reject,
        c_norm=c_norm,
        residual_norm=residual_norm,
    )
    info.update(
        rejected=False if reject is None else reject,
        damping=verdict.nu,
        damping_ratio=verdict.rho,
        rejected_steps=rejected_count(state),
    )
    return state, delta, returned
