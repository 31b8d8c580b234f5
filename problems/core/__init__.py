"""The problem contract and the parts every family of tasks shares.

* :mod:`problems.core.problem` — :class:`Problem` (the interface), :class:`ProblemDefaults`, ``Batch``,
  ``Size``, the declared ``prediction_kind`` and :func:`batch_indices`;
* :mod:`problems.core.data` — deterministic data generation with a checksummed on-disk cache;
* :mod:`problems.core.files` — atomic file writes;
* :mod:`problems.core.nets` — seeded MLPs (tanh and ReLU);
* :mod:`problems.core.autodiff` — derivatives of a model's outputs with respect to its inputs;
* :mod:`problems.core.fno` — a two-dimensional Fourier neural operator.
"""

from .problem import (
    PREDICTION_KINDS,
    Batch,
    PredictionKind,
    Problem,
    ProblemDefaults,
    Size,
    batch_indices,
    require_keys,
)

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
