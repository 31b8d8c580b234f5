"""Problems whose constraints act on the model's *outputs*: the tasks of the output-layer papers.

A :class:`LayerProblem` is a :class:`~problems.Problem` (so every optimizer in the runner can train on it)
that also exposes what an output layer needs: the inputs of a batch, the task loss of given outputs, and the
constraint description ``h(x, y) = 0``, ``lower <= g(x, y) <= upper`` shared with :mod:`sqpoptim.layers`.

* Layer methods wrap the backbone: ``y = layer(x, backbone(x))`` (:class:`LayeredModel`) and minimise
  :meth:`LayerProblem.output_loss` of the projected output.
* Training-time constrained methods (the SQP family) impose the *equalities* at a fixed set of training inputs,
  :meth:`LayerProblem.constraint_inputs`: ``c = h(x_c, model(x_c))`` flattened, which is exactly what
  :meth:`LayerProblem.constraints` returns. (Inequalities are the layers' business; the SQP methods handle
  equalities only.)
* :func:`forward_seconds` times a model's forward pass (the output layer's projection included), the papers'
  "inference time" of one batch; :func:`backbone_output` is the raw output ŷ of a :class:`LayeredModel`
  (``None`` for a plain network), so metrics can report how far the backbone alone is from the constraint set.
* Metrics report the violation on held-out inputs, where the layers are judged: ``max_abs_c`` keeps its meaning
  of max |c| at the constraint points, ``test_max_violation`` and ``test_mean_violation`` are over the test
  inputs.
"""

from __future__ import annotations

import abc
import time
from typing import ClassVar

import torch
from torch import Tensor, nn

from sqpoptim.layers import OutputConstraints

from ..core.problem import Batch, Problem

__all__ = ["LayerProblem", "LayeredModel", "backbone_output", "forward_seconds"]


class LayerProblem(Problem):
    """A task with constraints on the outputs (see the module docstring)."""

    prediction_kind = "series"
    soft_rho: ClassVar[float] = 1.0
    """The weight of the mean squared violation in the ``soft`` method's loss (the paper's penalty weight)."""
    activation_penalty: ClassVar[float] = 0.0
    """Weight of mean ‖h‖ in ENFORCE's activation-rule loss measure (App. D.2 of the ENFORCE paper: 0 for
    regression, a constraint penalty for optimisation tasks)."""

    # --- what output layers need -------------------------------------------------------------------------
    @abc.abstractmethod
    def inputs(self, batch: Batch | None = None) -> Tensor:
        """Training inputs of ``batch`` (``None``: all), ``[B, d]``."""

    @abc.abstractmethod
    def output_loss(self, x: Tensor, y: Tensor, batch: Batch | None = None) -> Tensor:
        """Scalar task loss of outputs ``y`` ``[B, n]`` at inputs ``x`` (supervised error or a self-supervised
        objective), with a graph through ``y``."""

    @abc.abstractmethod
    def output_constraints(self) -> OutputConstraints:
        """The constraint set the outputs must lie in."""

    @abc.abstractmethod
    def constraint_inputs(self) -> Tensor:
        """The fixed training inputs at which training-time methods impose ``h = 0``, ``[k, d]``."""

    # --- the Problem interface in those terms -----------------------------------------------------------
    def objective(self, model: nn.Module, batch: Batch | None = None) -> Tensor:
        x = self.inputs(batch)
        return self.output_loss(x, model(x), batch)

    def constraints(self, model: nn.Module) -> Tensor:
        oc = self.output_constraints()
        if oc.h is None:
            raise ValueError(f"{self.name} has no equality constraints for training-time methods")
        x = self.constraint_inputs()
        return oc.h(x, model(x)).reshape(-1)

    def output_violation(self, x: Tensor, y: Tensor) -> Tensor:
        """Largest violation per sample, ``[B]``."""
        return self.output_constraints().violation(x, y)


class LayeredModel(nn.Module):
    """``y = layer(x, backbone(x))``: a backbone followed by a constraint-enforcing output layer."""

    def __init__(self, backbone: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.backbone, self.layer = backbone, layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x, self.backbone(x))


def forward_seconds(model: nn.Module, x: Tensor, repeats: int = 3) -> tuple[Tensor, float]:
    """``(model(x), seconds)``: the output of the first call and the fastest of ``repeats`` timed calls (no
    graph; the device is synchronised around each call)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    best, out = float("inf"), None
    with torch.no_grad():
        for _ in range(max(1, repeats)):
            sync()
            t0 = time.perf_counter()
            y = model(x)
            sync()
            best = min(best, time.perf_counter() - t0)
            out = y if out is None else out
    return out, best


def backbone_output(model: nn.Module, x: Tensor) -> Tensor | None:
    """The raw output ŷ of a backbone-plus-layer model (no graph), or ``None`` for a plain network."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(model, "layer"):
        return None
    with torch.no_grad():
        return backbone(x)
