"""Validation of hyperparameters, shared by the constructors and by the per-step check of the param groups.

``torch.optim`` reads hyperparameters from ``param_groups`` at every step, so a value can change after
construction (a scheduler, a user writing ``param_groups[0]["lr"]``, ``add_param_group``). The optimizers
check every group at the start of every step, before anything changes, with these functions; each check is a
few Python comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from . import _damping
from ._krylov import KrylovOptions
from ._solver_choice import SOLVER_MODES

__all__ = [
    "check_beta",
    "check_betas",
    "check_eps",
    "check_nonnegative",
    "check_optional_nonnegative",
    "check_step_options",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_nonnegative(value: Any, name: str) -> None:
    """A finite number ≥ 0 (learning rates, step sizes, multipliers' rates)."""
    if not (_is_number(value) and math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number >= 0)")


def check_optional_nonnegative(value: Any, name: str) -> None:
    if value is not None:
        check_nonnegative(value, name)


def check_beta(value: Any, name: str) -> None:
    """A number in [0, 1) (moment decay rates, momentum)."""
    if not (_is_number(value) and 0.0 <= value < 1.0):
        raise ValueError(f"Invalid {name}: {value!r} (expected 0 <= {name} < 1)")


def check_betas(value: Any) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"Invalid betas: {value!r} (expected a pair)")
    check_beta(value[0], "beta1")
    check_beta(value[1], "beta2")


def check_eps(value: Any) -> None:
    if not (_is_number(value) and math.isfinite(value) and value > 0.0):
        raise ValueError(f"Invalid eps: {value!r} (expected a finite number > 0)")


def in_group(index: int, group: Mapping[str, Any], err: ValueError) -> ValueError:
    """``err`` prefixed with the param group it was found in."""
    return ValueError(f"param group {index}: {err}")


def check_step_options(
    *, solver: str, krylov: Any, chunk_size: Any, rank_tol: Any, normal_damping: Any
) -> KrylovOptions:
    """Check the constrained optimizers' own constructor options (fixed for the optimizer's life, so checked
    once); returns the matrix-free solver's options."""
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
    return krylov_options
