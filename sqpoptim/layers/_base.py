"""What every output layer shares: input checks, the solve dtype, diagnostics, the non-convergence policy.

A layer is an ``nn.Module`` whose ``forward(x, y_hat)`` returns the projected output and whose
``project(x, y_hat)`` returns a :class:`ProjectionResult` (the output plus diagnostics as values). Nothing is
stored on the module during a call, so a layer can be shared between models and threads.

Dtypes. ``y_hat`` (and a floating ``x``) are cast to ``solve_dtype`` (float64 by default) before the
iterations and the result is cast back to ``y_hat``'s dtype: a 1e-6 tolerance is not reliably reachable in
float32 once constraint values reach 1e2. The casts are differentiable, so a float32 network trains through a
float64 solve. ``solve_dtype=None`` solves in ``y_hat``'s dtype.

Host synchronisation. Input validation reads two flags once per call (finite inputs, consistent bounds); the
iterative layers read one scalar per convergence check (documented on each layer). Nothing else leaves the
device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._constraints import OutputConstraints

__all__ = ["ProjectionResult", "ProjectionWarning"]

_POLICIES = ("ignore", "warn", "raise")
_GRADIENTS = ("unrolled", "implicit")


class ProjectionWarning(UserWarning):
    """A layer in evaluation mode returned outputs that miss its tolerance (see ``nonconvergence``)."""


@dataclass(frozen=True)
class ProjectionResult:
    """A projected output with its diagnostics (all per sample except ``iterations``)."""

    y: Tensor
    """``[B, n]`` projected output, in ``y_hat``'s dtype."""
    iterations: int
    """Iterations (projection steps, Newton steps) the batch loop ran."""
    residual: Tensor
    """``[B]`` largest violation at ``y`` (``|h|``, distance of ``g`` to its bounds), in the solve dtype."""
    converged: Tensor
    """``[B]`` bool: the layer's stopping criterion holds for this sample."""
    regularized: Tensor
    """``[B]`` bool: some linear solve was (estimated) rank-deficient and solved regularised."""
    extras: Mapping[str, Tensor] = field(default_factory=dict)
    """Layer-specific values (KKT residual, multipliers, ...)."""


def as_constraints(constraints: OutputConstraints | Callable) -> OutputConstraints:
    """Accept an :class:`OutputConstraints` or a bare equality callable ``h(x, y)``."""
    if isinstance(constraints, OutputConstraints):
        return constraints
    if callable(constraints):
        return OutputConstraints(h=constraints)
    raise TypeError(f"constraints must be OutputConstraints or a callable h(x, y), got {type(constraints).__name__}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"Invalid {name} {value!r}: expected one of {', '.join(map(repr, choices))}")
    return value


class ProjectionLayer(nn.Module):
    """Base class: validation, casting, the non-convergence policy. Subclasses implement ``_project``."""

    def __init__(
        self,
        constraints: OutputConstraints | Callable,
        *,
        solve_dtype: torch.dtype | None = torch.float64,
        nonconvergence: str = "warn",
    ) -> None:
        super().__init__()
        self.constraints = as_constraints(constraints)
        if solve_dtype is not None and solve_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Invalid solve_dtype {solve_dtype}: expected torch.float32, torch.float64 or None")
        self.solve_dtype = solve_dtype
        self.nonconvergence = check_choice("nonconvergence", nonconvergence, _POLICIES)

    def forward(self, x: Tensor | None, y_hat: Tensor) -> Tensor:
        return self.project(x, y_hat).y

    def project(self, x: Tensor | None, y_hat: Tensor) -> ProjectionResult:
        """Project ``y_hat`` ([B, n]) onto the constraint set at inputs ``x`` ([B, ...] or None)."""
        xs, ys = self._prepare(x, y_hat)
        return self._finish(self._project(xs, ys), y_hat)

    def _finish(self, result: ProjectionResult, y_hat: Tensor) -> ProjectionResult:
        """Report an evaluation-mode result that missed the tolerance, and return it in ``y_hat``'s dtype."""
        if not self.training and self.nonconvergence != "ignore":
            self._report(result)
        return ProjectionResult(
            y=result.y.to(y_hat.dtype),
            iterations=result.iterations,
            residual=result.residual,
            converged=result.converged,
            regularized=result.regularized,
            extras=result.extras,
        )

    def _project(self, x: Tensor | None, y: Tensor) -> ProjectionResult:
        raise NotImplementedError

    def _prepare(self, x: Tensor | None, y_hat: Tensor) -> tuple[Tensor | None, Tensor]:
        if not isinstance(y_hat, Tensor):
            raise TypeError(f"y_hat must be a Tensor, got {type(y_hat).__name__}")
        if y_hat.dim() != 2 or not y_hat.is_floating_point():
            raise ValueError(f"y_hat must be a floating [B, n] tensor; got {y_hat.dtype} {list(y_hat.shape)}")
        if x is not None:
            if not isinstance(x, Tensor):
                raise TypeError(f"x must be a Tensor or None, got {type(x).__name__}")
            if x.dim() == 0 or x.shape[0] != y_hat.shape[0]:
                raise ValueError(
                    f"batch mismatch: x has shape {list(x.shape)}, y_hat {list(y_hat.shape)} (same leading B)"
                )
            if x.device != y_hat.device:
                raise ValueError(f"x is on {x.device} but y_hat on {y_hat.device}")
        finite = torch.isfinite(y_hat).all()
        if x is not None and x.is_floating_point():
            finite = finite & torch.isfinite(x).all()
        if not bool(finite):  # one host sync per call
            which = "y_hat" if not bool(torch.isfinite(y_hat).all()) else "x"
            raise ValueError(f"{which} contains NaN or inf")
        dtype = self.solve_dtype or y_hat.dtype
        ys = y_hat.to(dtype)
        xs = x.to(dtype) if x is not None and x.is_floating_point() else x
        return xs, ys

    def _report(self, result: ProjectionResult) -> None:
        if bool(result.converged.all()):
            return
        bad = int((~result.converged).sum())
        msg = (
            f"{type(self).__name__}: {bad} of {result.converged.numel()} samples missed the tolerance after "
            f"{result.iterations} iterations (largest violation {float(result.residual.max()):.3e}); "
            "the constraints may be infeasible or the raw output too far from the constraint set"
        )
        if self.nonconvergence == "raise":
            raise RuntimeError(msg)
        warnings.warn(msg, ProjectionWarning, stacklevel=3)


def check_bounds(lower: Tensor, upper: Tensor) -> None:
    """Raise on crossed bounds (an empty feasible set). One host sync."""
    if bool((lower > upper).any()):
        raise ValueError("infeasible bounds: lower > upper for some inequality constraint")


def finite_or_raise(value: Tensor, what: str) -> None:
    """Raise when constraint values at the raw output are not finite (outside the constraints' domain)."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} is not finite at the raw output (NaN/inf): outside the constraints' domain?")
