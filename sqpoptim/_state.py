"""Typed optimizer state that is not tied to one parameter, and its plain-tensor form in ``state_dict``.

Per-parameter state (moments, momentum buffers) lives in ``optimizer.state[p]`` as in ``torch.optim``. What
belongs to the whole optimizer — the step count k, the count of refused non-finite steps, the damping of the
normal step, a method's own scalars — is a dataclass here, read and written only by the optimizer. In
``state_dict()`` it becomes a nested dict of tensors under ``state["global"]`` (loadable with
``torch.load(..., weights_only=True)``); ``load_state_dict`` turns it back into the dataclass, and also reads the
flat string-keyed form that sqpoptim 0.1 wrote. Diagnostics of the last step are not state: they are kept apart
and never checkpointed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["GLOBAL_KEY", "DampingState", "OptimizerState"]

GLOBAL_KEY = "global"  # key of the optimizer-wide state inside state_dict()["state"]


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, copy=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


@dataclass
class DampingState:
    r"""State of the Levenberg–Marquardt normal step (:mod:`sqpoptim._damping`).

    ``nu`` (ν, relative damping) and ``escalation`` (factor applied to ν on the next failure) are 0-d float64;
    ``model`` is ``[‖c_k‖, ‖c_k + J_kδ_k‖, normal part dominated]`` of the last step (float64 ``[3]``), ``None``
    before the first; ``x_accepted`` the point the last accepted step was taken from ``[n]``, with the loss and
    c the closure gave there (``accepted_loss``, ``accepted_c``: what ``step`` returns after moving back);
    ``retry`` (0-d bool) says the last step was rejected, so the next one retakes it from the same point;
    ``rejected_steps`` counts rejections."""

    nu: Tensor
    escalation: Tensor
    model: Tensor | None = None
    x_accepted: Tensor | None = None
    accepted_loss: Tensor | None = None
    accepted_c: Tensor | None = None
    retry: Tensor | None = None
    rejected_steps: Tensor | None = None


@dataclass
class OptimizerState:
    """Optimizer-wide state shared by every constrained optimizer; methods with more derive from it.

    ``step`` is k, the number of steps taken (a 0-d float64 device tensor; refused and rejected steps do not
    count), ``nonfinite_steps`` the number of steps refused for non-finite inputs in sync-free mode, ``krylov`` the
    matrix-free solver's warm starts (``{"multipliers": {slot: λ}, "penalty": π}``, :mod:`sqpoptim._krylov`). With
    inequality constraints, ``inequality_active`` and ``projection_active`` (``[m]`` bool) are the working sets
    of the last step's QP and gradient projection, the warm start of the next step (:mod:`sqpoptim._inequality`).
    """

    step: Tensor | None = None
    nonfinite_steps: Tensor | None = None
    damping: DampingState | None = None
    krylov: dict[str, Any] | None = None
    inequality_active: Tensor | None = None
    projection_active: Tensor | None = None

    #: sqpoptim 0.1's flat ``state["global"]`` keys -> (field, damping field) of this form.
    _LEGACY: ClassVar[dict[str, tuple[str, str | None]]] = {
        "damping": ("damping", "nu"),
        "damping_escalation": ("damping", "escalation"),
        "damping_model": ("damping", "model"),
        "damping_x": ("damping", "x_accepted"),
        "rejected_steps": ("damping", "rejected_steps"),
    }

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of tensors (``None`` fields left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = (
                {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
                if dataclasses.is_dataclass(value)
                else value
            )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], device: torch.device) -> OptimizerState:
        """The inverse of :meth:`to_dict` (tensors moved to ``device``); unknown keys are an error."""
        data = _to_device(dict(data), device)
        data.pop("diagnostics", None)  # 0.1 checkpointed the last step's diagnostics; they are not state
        damping: dict[str, Any] = {}
        if isinstance(data.get("damping"), dict):
            damping = data.pop("damping")
        for old, (_, sub) in cls._LEGACY.items():
            if old in data and not (old == "damping" and isinstance(data[old], dict)):
                damping[sub] = data.pop(old)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown entries {unknown} in the optimizer-wide state of a {cls.__name__} state_dict")
        state = cls(**data)
        if damping:
            if "nu" not in damping or "escalation" not in damping:
                raise ValueError("incomplete damping state in state_dict (needs 'nu' and 'escalation')")
            state.damping = DampingState(**damping)
        return state
