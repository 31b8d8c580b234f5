r"""The flat parameter layout and the flat state buffers of the constrained optimizers.

Trainable parameters (``requires_grad=True``), param group by param group, are viewed as one vector
:math:`x \in \mathbb{R}^n` (complex parameters through their real views, real and imaginary parts interleaved).
Every step works on whole vectors (g, the rows of J, the moments); per-parameter optimizer state
(``exp_avg``, ...) is stored as views into one flat buffer per state name, so that ``optimizer.state[p]``
keeps the ``torch.optim`` layout and ``state_dict`` its format.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["FlatLayout", "FlatState", "as_real", "build_layout", "flat_size", "per_coordinate"]


def as_real(t: Tensor) -> Tensor:
    """``t`` itself, or its real view when it is complex."""
    return torch.view_as_real(t) if t.is_complex() else t


def flat_size(p: Tensor) -> int:
    """Number of real entries ``p`` contributes to the flat parameter vector."""
    return p.numel() * (2 if p.is_complex() else 1)


@dataclass(frozen=True)
class FlatLayout:
    """Where each trainable parameter sits in the flat vector x (rebuilt when the trainable set changes)."""

    key: tuple
    params: list[Tensor]
    views: list[Tensor]  # real views of params
    sizes: list[int]
    n: int
    group_bounds: list[tuple[int, int]]  # [start, end) of each param group's coordinates
    dtype: torch.dtype
    device: torch.device

    def gather(self) -> Tensor:
        """A fresh copy of x, ``[n]``."""
        return torch.cat([v.reshape(-1) for v in self.views])

    def assign(self, x: Tensor) -> None:
        """Write the flat vector ``x`` into the parameters."""
        torch._foreach_copy_(self.views, self.split(x))

    def add_(self, delta: Tensor) -> None:
        """x ← x + δ, in place on the parameters."""
        torch._foreach_add_(self.views, self.split(delta))

    def split(self, x: Tensor) -> list[Tensor]:
        """``x`` cut into per-parameter views shaped like the real views of the parameters."""
        return [part.view_as(v) for part, v in zip(x.split(self.sizes), self.views)]


def layout_key(param_groups: Sequence[Mapping[str, Any]]) -> tuple:
    """Identifies the trainable set: a new key means the layout (and the flat buffers) must be rebuilt."""
    return tuple((id(p), p.requires_grad) for g in param_groups for p in g["params"])


def build_layout(param_groups: Sequence[Mapping[str, Any]]) -> FlatLayout:
    """The layout of the trainable parameters of ``param_groups``; one dtype and one device are required."""
    params, bounds, off = [], [], 0
    for group in param_groups:
        start = off
        for p in group["params"]:
            if p.requires_grad:
                params.append(p)
                off += flat_size(p)
        bounds.append((start, off))
    if not params:
        raise ValueError("the optimizer has no parameter with requires_grad=True")
    dtypes = {as_real(p).dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1:
        raise ValueError(f"all trainable parameters must share one dtype; got {sorted(map(str, dtypes))}")
    if len(devices) > 1:
        raise ValueError(f"all trainable parameters must be on one device; got {sorted(map(str, devices))}")
    views = [as_real(p) for p in params]
    return FlatLayout(
        layout_key(param_groups), params, views, [v.numel() for v in views], off, bounds, dtypes.pop(), devices.pop()
    )


def per_coordinate(layout: FlatLayout, values: Sequence[float]) -> float | Tensor:
    """A per-group hyperparameter as a Python float when all groups agree, else as a flat ``[n]`` tensor."""
    if all(v == values[0] for v in values):
        return float(values[0])
    out = torch.empty(layout.n, dtype=layout.dtype, device=layout.device)
    for (start, end), v in zip(layout.group_bounds, values):
        out[start:end] = v
    return out


class FlatState:
    """Flat ``[n]`` buffers of the per-parameter state named ``names``; ``state[p][name]`` are views into them.

    Built lazily for a layout; existing per-parameter entries (after ``load_state_dict``, or of parameters that
    were trainable before) are copied in. Parameters that leave the layout keep a private copy of their state.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(names)
        self._buffers: dict[str, Tensor] | None = None
        self._key: tuple | None = None

    def invalidate(self) -> None:
        self._buffers, self._key = None, None

    def buffers(self, layout: FlatLayout, state: dict[Any, dict[str, Any]]) -> dict[str, Tensor]:
        if self._buffers is not None and self._key == layout.key:
            return self._buffers
        flat = {}
        for name in self.names:
            buf = torch.zeros(layout.n, dtype=layout.dtype, device=layout.device)
            off = 0
            for p, size in zip(layout.params, layout.sizes):
                old = state[p].get(name) if p in state else None
                if old is not None:
                    if old.numel() != size:
                        raise ValueError(f"state {name!r} of a parameter has {old.numel()} entries, expected {size}")
                    buf[off : off + size].copy_(as_real(old).reshape(-1))
                state[p][name] = buf[off : off + size].view(as_real(p).shape)
                off += size
            flat[name] = buf
        live = {id(p) for p in layout.params}
        for p, st in state.items():
            if isinstance(p, Tensor) and id(p) not in live:
                for name in self.names:
                    if name in st:
                        st[name] = st[name].clone()
        self._buffers, self._key = flat, layout.key
        return flat


class StepCounts:
    r"""Per-parameter step counts ``state[p]["step"]`` (0-d float64, ``torch.optim``'s layout) for bias
    corrections: a parameter added later (``add_param_group``, ``requires_grad`` turned on) starts from its own
    first step, not from the optimizer's. Kept as views of one ``[P]`` buffer; while every trainable parameter
    has taken the same number of steps (read once, when the trainable set changes) the count is a 0-d tensor,
    otherwise a per-coordinate ``[n]`` tensor."""

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self._key: tuple | None = None
        self._uniform = True
        self._sizes: Tensor | None = None

    def invalidate(self) -> None:
        self._buffer, self._key = None, None

    def _counts(self, layout: FlatLayout, state: dict[Any, dict[str, Any]]) -> Tensor:
        if self._buffer is not None and self._key == layout.key:
            return self._buffer
        buf = torch.zeros(len(layout.params), dtype=torch.float64, device=layout.device)
        for i, p in enumerate(layout.params):
            old = state[p].get("step") if p in state else None
            if old is not None:
                buf[i] = torch.as_tensor(old, dtype=torch.float64).to(layout.device)
            state[p]["step"] = buf[i]
        self._uniform = bool((buf == buf[0]).all())  # one host read, only when the trainable set changes
        self._sizes = torch.tensor(layout.sizes, device=layout.device)
        self._buffer, self._key = buf, layout.key
        return buf

    def step_for(self, layout: FlatLayout, state: dict[Any, dict[str, Any]], counted: Tensor | None) -> Tensor:
        """k of this step (counts so far, plus one if ``counted``; ``None``: counted): 0-d or ``[n]``."""
        k = self._counts(layout, state) + (1.0 if counted is None else counted.double())
        if self._uniform:
            return k[0]
        return k.repeat_interleave(self._sizes, output_size=layout.n)

    def advance(self, layout: FlatLayout, state: dict[Any, dict[str, Any]], counted: Tensor | None) -> None:
        """Add this step to every trainable parameter's count."""
        self._counts(layout, state).add_(1.0 if counted is None else counted.double())
