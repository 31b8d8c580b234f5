"""What a training method is to the runner: parse its options, then set up a model, an optimizer and a closure.

A :class:`Method` turns typed, validated options (:mod:`problems.methods.options`) into a :class:`Training`:
the model to train (the problem's model, or a backbone wrapped by an output layer), the optimizer over its
parameters, and ``closure(batch)``, which returns the closure ``optimizer.step`` calls for one batch. Every
setting a closure uses lives in the closure or in :attr:`Training.settings`, never on the model.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.problem import Batch, Problem

__all__ = ["Method", "Training"]


@dataclass
class Training:
    """A method set up on one problem: what the runner's loop steps."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    closure: Callable[[Batch | None], Callable[[], Any]]
    """``closure(batch)`` is the closure for one step on ``batch`` (``None``: the full batch)."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """The method's resolved settings (options with the problem's defaults filled in), recorded with results."""


class Method(abc.ABC):
    """A training method: a registry name, the paper's label, and how to parse options and set up training."""

    name: str
    """The registry name, used on the command line (``sqp-adam``)."""
    label: str
    """The label of the papers' tables and of the figures (``SQP-Adam(con)``)."""
    constrained: bool
    """Whether the optimizer is handed c's Jacobian and enforces ``c = 0`` (else ``c`` is only logged)."""
    needs_output_constraints: ClassVar[bool] = False
    """Output-layer methods: only for :class:`~problems.output_tasks.task.LayerProblem` tasks."""

    @property
    @abc.abstractmethod
    def implementation(self) -> str:
        """The sqpoptim class (or classes) that does the work, for the table of names."""

    @abc.abstractmethod
    def parse_options(self, options: Mapping[str, Any], lr: float = 1e-3) -> Any:
        """Typed, validated options (a frozen dataclass); ``ValueError`` naming the method otherwise. ``lr`` is
        the learning rate the options will be used with (some checks depend on it)."""

    @abc.abstractmethod
    def setup(
        self, problem: Problem, model: nn.Module, lr: float, options: Any, *, process_group: Any = None
    ) -> Training:
        """The :class:`Training` of ``model`` on ``problem`` with parsed ``options``. With a ``process_group``
        the optimizer steps as one across its ranks (``sqpoptim``'s ``process_group``), each rank's closure
        being given its own share of the batch; a method that cannot run so raises ``ValueError``."""

    def check_problem(self, problem: type[Problem]) -> None:  # noqa: B027 (every problem, unless overridden)
        """Refuse a problem this method cannot train (checked on the class, before any data are built)."""
