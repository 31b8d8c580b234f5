"""Output-layer methods for :class:`~problems.output_tasks.task.LayerProblem` tasks.

* ``soft`` — the backbone alone, trained on the task loss plus ``rho`` times the mean squared violation of the
  batch outputs (the "soft constraint" / PINN baseline of the layer papers). ``rho`` defaults to the problem's
  ``soft_rho`` (the paper's penalty weight).
* ``hardnet`` (affine constraints only), ``enforce``, ``hardnet-pp``, ``kkt-hardnet`` — the backbone followed
  by the layer (:class:`~problems.output_tasks.task.LayeredModel`), trained on the task loss of the projected
  output plus ``lambda_d * mean ||ŷ - ỹ||²`` (ENFORCE's displacement penalty: default 0.5 for ``enforce``, the
  paper's, and 0 for the others). ``eta`` (off by default) is KKT-Hardnet's warm start (Iftakher et al.,
  "Physics-Informed Neural Networks with Hard Nonlinear Equality and Inequality Constraints", Sec. 2): a training
  batch whose task loss on the raw output ŷ exceeds ``eta`` trains the backbone alone on that loss, so the layer
  is switched on once the backbone's loss has fallen below ``eta``. The paper switches once and for all;
  deciding per batch keeps the closure stateless (a resumed run gives the same iterates) and differs only if the
  loss climbs back above ``eta``. Evaluation always projects.

All of them train the backbone with Adam(unc) (ε inside the square root, like every Adam in this package).
Options (``name:key=value``): the method's own (:class:`SoftOptions`, :class:`LayerOptions`,
:class:`EnforceOptions`, including ``betas``/``eps`` of the backbone's Adam) and the layer's constructor
keywords (``max_iter``, ``tol``, ``gradient``, ...). A layer keyword wins a clash of names: ``hardnet-pp:eps``
is HardNet++'s ε, not Adam's. The plain network is ``adam-unc``; training-time constraints on the same
problems are the SQP methods, which impose the equalities at the problem's constraint inputs.

``enforce:activation=true`` applies ENFORCE's activation rule (Lastrucci & Schweidtmann, "ENFORCE: Nonlinear
Constrained Learning with Adaptive-depth Neural Projection", Alg. 2; :func:`sqpoptim.layers.adanp_activation`):
per batch, the projection is used only if one NP step does not increase the loss measure
``output_loss(x, y) + w * mean_b ||h(x, y_b)||``; otherwise the raw output is used (and the displacement penalty
vanishes). ``w`` is the problem's ``activation_penalty`` (App. D.2: 0 for regression, a constraint penalty for
optimisation tasks) unless the option ``activation_penalty`` overrides it.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import sqpoptim
from sqpoptim import layers

from ..core.problem import Batch, Problem
from ..output_tasks.task import LayeredModel, LayerProblem
from .method import Method, Training
from .options import check_keys, coerce, signature_options

__all__ = ["LAYER_METHODS", "EnforceOptions", "LayerMethod", "LayerOptions", "SoftMethod", "SoftOptions"]


@dataclass(frozen=True)
class AdamOptions:
    """The backbone's Adam(unc): ``None`` keeps :class:`sqpoptim.AdamUnc`'s default."""

    betas: tuple[float, float] | None = None
    eps: float | None = None

    def adam(self, params: Any, lr: float, process_group: Any = None) -> torch.optim.Optimizer:
        kwargs = {k: v for k, v in (("betas", self.betas), ("eps", self.eps)) if v is not None}
        return sqpoptim.AdamUnc(params, lr=lr, process_group=process_group, **kwargs)


@dataclass(frozen=True)
class SoftOptions(AdamOptions):
    rho: float | None = None
    """Weight of the mean squared violation; ``None``: the problem's ``soft_rho``."""

    def __post_init__(self) -> None:
        if self.rho is not None and not self.rho >= 0:
            raise ValueError(f"method 'soft': Invalid rho: {self.rho!r} (the penalty weight must be >= 0)")


@dataclass(frozen=True)
class LayerOptions(AdamOptions):
    lambda_d: float | None = None
    """Displacement penalty weight; ``None``: 0.5 for ``enforce`` (the paper's), else 0."""
    eta: float | None = None
    """Warm-start loss threshold (off when ``None``)."""
    layer: Mapping[str, Any] = field(default_factory=dict)
    """The layer's constructor keywords."""

    def __post_init__(self) -> None:
        if self.eta is not None and not self.eta > 0:
            raise ValueError(f"Invalid eta: {self.eta!r} (the warm-start loss threshold must be > 0)")
        if self.lambda_d is not None and not self.lambda_d >= 0:
            raise ValueError(f"Invalid lambda_d: {self.lambda_d!r} (the displacement penalty must be >= 0)")


@dataclass(frozen=True)
class EnforceOptions(LayerOptions):
    activation: bool = False
    """ENFORCE's activation rule (Alg. 2)."""
    activation_penalty: float | None = None
    """Weight of mean ‖h‖ in the rule's loss measure; ``None``: the problem's ``activation_penalty``."""


_HINTS = {
    "activation": "the activation rule is ENFORCE's (method 'enforce')",
    "activation_penalty": "the activation rule is ENFORCE's (method 'enforce')",
    "rho": "the penalty weight is the soft method's ('soft')",
}


def _typed(cls: type, given: Mapping[str, Any], method: str) -> dict[str, Any]:
    """``given`` coerced to the field types of the options dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {k: coerce(v, hints[k], f"method {method!r}: option {k}") for k, v in given.items()}


def _require_layer_problem(problem: Problem | type[Problem], method: str) -> None:
    cls = problem if isinstance(problem, type) else type(problem)
    if not issubclass(cls, LayerProblem):
        raise ValueError(f"method {method!r} needs a problem with output constraints; {cls.name!r} has none")


class _OutputMethod(Method):
    needs_output_constraints = True
    constrained = False

    def check_problem(self, problem: type[Problem]) -> None:
        _require_layer_problem(problem, self.name)


@dataclass(frozen=True, eq=False)
class LayerMethod(_OutputMethod):
    """A backbone followed by an sqpoptim output layer, trained with Adam(unc) (see the module docstring)."""

    name: str
    label: str
    layer: type[nn.Module]

    @property
    def implementation(self) -> str:
        return f"layers.{self.layer.__name__} + AdamUnc"

    def _options_type(self) -> type[LayerOptions]:
        return EnforceOptions if self.name == "enforce" else LayerOptions

    def parse_options(self, options: Mapping[str, Any], lr: float = 1e-3) -> LayerOptions:
        cls = self._options_type()
        layer_fields, _ = signature_options(self.layer.__init__, ("self", "constraints"))
        layer_hints = {name: hint for name, hint, _ in layer_fields}
        own = {f.name for f in dataclasses.fields(cls)} - {"layer"}
        check_keys(self.name, options, set(layer_hints) | own, _HINTS)
        layer_kwargs = {
            k: coerce(v, layer_hints[k], f"method {self.name!r}: option {k}")
            for k, v in options.items()
            if k in layer_hints
        }
        method_kwargs = _typed(cls, {k: v for k, v in options.items() if k not in layer_hints}, self.name)
        try:
            parsed = cls(**method_kwargs, layer=layer_kwargs)
        except ValueError as err:
            raise ValueError(f"method {self.name!r}: {err}") from None
        self._check_layer(layer_kwargs)
        return parsed

    def _check_layer(self, kwargs: Mapping[str, Any]) -> None:
        """Construct the layer once on a throw-away constraint set, so its own checks run at parse time."""
        dummy = layers.OutputConstraints(h=lambda x, y: y[:, :1] - x[:, :1])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.layer(dummy, **kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"method {self.name!r}: {err}") from None

    def setup(
        self, problem: Problem, model: nn.Module, lr: float, options: LayerOptions, *, process_group: Any = None
    ) -> Training:
        _require_layer_problem(problem, self.name)
        assert isinstance(problem, LayerProblem)
        if process_group is not None and options.eta is not None:
            raise ValueError(
                f"method {self.name!r}: the warm start (eta) decides on the batch's loss, which with several "
                "processes each rank would decide on its own share of the batch; drop eta or run one process"
            )
        wrapped = LayeredModel(model, self.layer(problem.output_constraints(), **options.layer))
        default_lambda = 0.5 if self.name == "enforce" else 0.0
        lambda_d = default_lambda if options.lambda_d is None else options.lambda_d
        activation = getattr(options, "activation", False)
        penalty = getattr(options, "activation_penalty", None)
        penalty = problem.activation_penalty if penalty is None else penalty
        settings = {"lambda_d": lambda_d, "eta": options.eta, "activation": activation, **options.layer}
        if activation:
            settings["activation_penalty"] = penalty

        def closure(batch: Batch | None):
            step = _layer_closure(problem, wrapped, batch, lambda_d, options.eta, activation, penalty)
            return step if process_group is None else _per_sample_rows(step)

        return Training(wrapped, options.adam(wrapped.parameters(), lr, process_group), closure, settings)


def _per_sample_rows(closure: Callable[[], Any]) -> Callable[[], Any]:
    """With several processes: the logged per-sample violations of a rank's share of the batch are that rank's
    own rows (gathered for the log, not checked for equality across ranks)."""

    def sharded() -> tuple[torch.Tensor, sqpoptim.Sharded]:
        loss, c = closure()
        return loss, sqpoptim.Sharded(c)

    return sharded


def _layer_closure(problem, model, batch, lambda_d: float, eta: float | None, activation: bool, penalty: float):
    def measure(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # Alg. 2's loss measure
        loss = problem.output_loss(x, y, batch)
        if penalty:
            loss = loss + penalty * problem.output_constraints().h(x, y).norm(dim=-1).mean()
        return loss

    def closure() -> tuple[torch.Tensor, torch.Tensor]:
        x = problem.inputs(batch)
        y_hat = model.backbone(x)
        if eta is not None:
            raw = problem.output_loss(x, y_hat, batch)
            if float(raw.detach()) > eta:  # warm start: the backbone alone (one host read per step)
                with torch.no_grad():
                    return raw, problem.output_violation(x, y_hat.detach())
        if activation:
            y, _ = layers.adanp_activation(model.layer, x, y_hat, lambda y: measure(x, y))
        else:
            y = model.layer(x, y_hat)
        loss = problem.output_loss(x, y, batch)
        if lambda_d:
            loss = loss + lambda_d * (y_hat - y).square().sum(-1).mean()
        with torch.no_grad():  # logged: the batch's violation after the layer
            c = problem.output_violation(x, y.detach())
        return loss, c

    return closure


@dataclass(frozen=True, eq=False)
class SoftMethod(_OutputMethod):
    """The backbone alone with the mean squared violation as a penalty (see the module docstring)."""

    name: str = "soft"
    label: str = "Soft constraint"

    @property
    def implementation(self) -> str:
        return "AdamUnc + penalty on the outputs"

    def parse_options(self, options: Mapping[str, Any], lr: float = 1e-3) -> SoftOptions:
        check_keys(self.name, options, {f.name for f in dataclasses.fields(SoftOptions)}, {})
        return SoftOptions(**_typed(SoftOptions, options, self.name))  # SoftOptions names the method itself

    def setup(
        self, problem: Problem, model: nn.Module, lr: float, options: SoftOptions, *, process_group: Any = None
    ) -> Training:
        _require_layer_problem(problem, self.name)
        assert isinstance(problem, LayerProblem)
        rho = problem.soft_rho if options.rho is None else options.rho

        def closure(batch: Batch | None):
            def step_closure() -> tuple[torch.Tensor, torch.Tensor]:
                x = problem.inputs(batch)
                y = model(x)
                oc = problem.output_constraints()
                ev = oc.evaluate(x, y, jacobian=False)
                lower, upper = oc.bounds(x, ev.g) if ev.g is not None else (None, None)
                r = oc.residual(ev, lower, upper)  # [B, m + q], zero where satisfied
                loss = problem.output_loss(x, y, batch) + rho * r.square().sum(-1).mean()
                return loss, r.detach().abs().amax(-1)

            return step_closure if process_group is None else _per_sample_rows(step_closure)

        return Training(model, options.adam(model.parameters(), lr, process_group), closure, {"rho": rho})


LAYER_METHODS: list[Method] = [
    LayerMethod("hardnet", "Layer: HardNet", layers.HardNetAffine),
    LayerMethod("enforce", "Layer: ENFORCE", layers.EnforceProjection),
    LayerMethod("hardnet-pp", "Layer: HardNet++", layers.HardNetPP),
    LayerMethod("kkt-hardnet", "Layer: KKT-Hardnet", layers.KKTHardNet),
    SoftMethod(),
]
