"""The problem interface shared by every task in the suite.

A :class:`Problem` is a hard-constrained training task and nothing else: it builds a model, evaluates the
objective on a batch, evaluates the hard-constraint residuals ``c`` over the model, samples mini-batches from a
seeded generator, and computes metrics and predictions for plots. It knows nothing about optimizers; the runner
(:mod:`problems.runner`) pairs problems with methods.

Conventions
-----------
* ``objective(model, batch)`` returns a scalar tensor with a graph to the model parameters. ``batch=None`` is
  the full batch. Terms that need derivatives with respect to the model *inputs* build them with
  ``torch.autograd.grad(..., create_graph=True)``.
* ``constraints(model)`` returns a 1-D tensor of length :attr:`Problem.num_constraints` (the residuals at the fixed
  constraint points; the constrained methods drive it to zero). Constraints are deterministic: never
  subsampled.
* ``sample_batch(generator)`` returns an opaque :class:`Batch` (named index tensors into the problem's data).
  Only objective terms are subsampled.
* One "epoch" in the papers' budgets is one iteration (one batch, one optimizer step), as in the authors' code.
* Data are generated locally and deterministically, cached with a checksum (:mod:`problems.core.data`).
* ``size`` selects the data scale: ``"paper"`` (the papers' settings), ``"small"`` (the ``--quick`` runs: same
  problem, smaller data where the paper's is large) and ``"tiny"`` (unit tests: seconds on a CPU).
* ``prediction_kind`` declares what :meth:`Problem.prediction` returns, and so which figure draws it:

  - ``"series"``: curves over a 1-D coordinate: ``t`` ``[T]``, ``u_true`` and ``u_pred`` ``[T]`` or ``[T, k]``;
    optional ``t_fit``/``u_fit`` (data points, drawn as markers) and ``t_constraint`` (vertical lines);
  - ``"field"``: 2-D fields ``u_true`` and ``u_pred`` ``[n_1, n_2]``; optional ``x`` ``[n_2]`` and ``t``
    ``[n_1]`` (axis extents) and ``nu`` (an input field, drawn beside the truth);
  - ``"manifold"``: 2-D outputs ``y_pred`` ``[N, 2]`` on a curve, with ``y_data`` (the samples) ``[M, 2]``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "PREDICTION_KINDS",
    "Batch",
    "PredictionKind",
    "Problem",
    "ProblemDefaults",
    "Size",
    "batch_indices",
    "require_keys",
]

Size = Literal["paper", "small", "tiny"]
PredictionKind = Literal["series", "field", "manifold"]
PREDICTION_KINDS: tuple[str, ...] = ("series", "field", "manifold")

#: A mini-batch: named index tensors (or masks) into the problem's data sets. Opaque to the runner.
Batch = Mapping[str, Tensor]


@dataclass(frozen=True)
class ProblemDefaults:
    """The paper's settings for a problem; the runner uses them unless told otherwise."""

    lrs: tuple[float, ...]
    """The two fixed learning rates of the paper."""
    iterations_full: int
    """Budget of full-batch runs (the papers' "epochs" are iterations)."""
    iterations_mini: int
    """Budget of mini-batch runs."""
    quick_iterations: int
    """Budget of ``--quick`` runs (with ``size="small"``): ends in well under two minutes on a laptop CPU."""
    mini_batch_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    extra: Mapping[str, object] = field(default_factory=dict)
    """Problem-specific settings worth recording with results (weights, point counts, ...)."""


class Problem(abc.ABC):
    """A hard-constrained training task. See the module docstring for the conventions."""

    name: ClassVar[str]
    defaults: ClassVar[ProblemDefaults]
    prediction_kind: ClassVar[PredictionKind]
    """What :meth:`prediction` returns (see the module docstring); the plots dispatch on it."""
    constraints_in_objective: ClassVar[bool] = False
    """Whether :meth:`objective_and_constraints` reads c off the objective's own pass (every constraint point is
    an objective point). The SQP methods then form g and J by one backward (``jacobian="joint"`` in place of the
    default ``"auto"``)."""

    def __init__(
        self,
        size: Size = "paper",
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | Path | None = None,
    ) -> None:
        if size not in ("paper", "small", "tiny"):
            raise ValueError(f"Invalid size {size!r}: expected 'paper', 'small' or 'tiny'")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Invalid dtype {dtype}: expected torch.float32 or torch.float64")
        self.size: Size = size
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache_dir = cache_dir

    # --- model -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def make_model(self, seed: int) -> nn.Module:
        """A freshly initialised model (seeded, on ``self.device`` in ``self.dtype``)."""

    # --- training terms ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def objective(self, model: nn.Module, batch: Batch | None = None) -> Tensor:
        """Scalar objective on ``batch`` (``None``: full batch), with a graph to the parameters."""

    @abc.abstractmethod
    def constraints(self, model: nn.Module) -> Tensor:
        """Hard-constraint residuals ``c`` at the fixed constraint points, shape ``[num_constraints]``."""

    def objective_and_constraints(self, model: nn.Module, batch: Batch | None = None) -> tuple[Tensor, Tensor]:
        """``(objective(model, batch), constraints(model))`` — what a constrained method's closure returns.
        Problems whose constraint points are also objective points override it to evaluate them in one pass
        (the two then share a graph, which the optimizers allow)."""
        return self.objective(model, batch), self.constraints(model)

    @property
    @abc.abstractmethod
    def num_constraints(self) -> int:
        """m, the number of hard constraints."""

    @abc.abstractmethod
    def sample_batch(self, generator: torch.Generator) -> Batch:
        """A mini-batch drawn with ``generator`` (a CPU ``torch.Generator``)."""

    # --- evaluation --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def metrics(self, model: nn.Module) -> dict[str, float]:
        """At least ``objective`` (full batch), ``test_mse`` and ``max_abs_c`` (max |c| at the constraint
        points), as Python floats."""

    @abc.abstractmethod
    def prediction(self, model: nn.Module) -> dict[str, np.ndarray]:
        """Arrays for the prediction-vs-truth plot (problem-specific keys, documented by each problem)."""

    # --- conveniences ------------------------------------------------------------------------------------
    def describe(self) -> dict[str, object]:
        """The exact settings of this instance, recorded with every result."""
        return {
            "problem": self.name,
            "prediction_kind": self.prediction_kind,
            "size": self.size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "num_constraints": self.num_constraints,
            **{k: v for k, v in self.defaults.extra.items()},
        }


def require_keys(batch: Mapping[str, Tensor], keys: tuple[str, ...], problem: str) -> None:
    """Refuse a batch that is not a mapping with ``keys`` (as ``sample_batch`` makes them), naming ``problem``;
    no look at the values, so no host synchronisation."""
    if not isinstance(batch, Mapping) or any(k not in batch for k in keys):
        raise ValueError(f"{problem}: a batch must be a mapping with keys {keys} (from sample_batch); got {batch!r}")


def batch_indices(batch: Mapping[str, Tensor], key: str, n: int, problem: str, device: torch.device) -> Tensor:
    """``batch[key]``: a 1-D integer index tensor into ``n`` points, moved to ``device``; a wrong batch fails with
    an error naming ``problem``."""
    if not isinstance(batch, Mapping) or key not in batch:
        raise ValueError(f"{problem}: a batch must be a mapping with key {key!r} (from sample_batch); got {batch!r}")
    idx = batch[key]
    if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{problem}: batch[{key!r}] must be a 1-D integer tensor, got {idx!r}")
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"{problem}: batch[{key!r}] must be non-empty with indices in [0, {n})")
    return idx.to(device)
