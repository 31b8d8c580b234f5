"""Output-layer methods for :class:`~problems._layered.LayerProblem` tasks, registered with the runner.

* ``soft`` — the backbone alone, trained on the task loss plus ``rho`` times the mean squared violation of the
  batch outputs (the "soft constraint" / PINN baseline of the layer papers). ``rho`` defaults to the problem's
  ``soft_rho`` attribute (the paper's penalty weight) where it has one, else 1.
* ``hardnet`` (affine constraints only), ``enforce``, ``hardnet-pp``, ``kkt-hardnet`` — the backbone followed
  by the layer (:class:`~problems._layered.LayeredModel`), trained on the task loss of the projected output.
  ``enforce`` adds ENFORCE's displacement penalty ``lambda_d * mean ||ŷ - ỹ||²`` (paper default 0.5).
  ``eta`` (off by default) is KKT-Hardnet's warm start (Iftakher et al., Sec. 2): a training batch whose task
  loss on the raw output ŷ exceeds ``eta`` trains the backbone alone on that loss, so the layer is switched on
  once the backbone's loss has fallen below ``eta``. The paper switches once and for all; deciding per batch
  keeps the closure stateless (a resumed run gives the same iterates) and differs only if the loss climbs back
  above ``eta``. Evaluation always projects.

All of them train the backbone with Adam(unc) (ε inside the square root, like every Adam in this package).
Method options (``name:key=value``) go to the layer's constructor, except ``betas``/``eps`` (the optimizer),
``rho`` (``soft``), ``lambda_d`` (``enforce``) and ``eta`` (the layers). The plain network is ``adam-unc``;
training-time constraints on the same problems are the SQP methods, which impose the equalities at the problem's
constraint inputs.

``enforce:activation=true`` applies ENFORCE's activation rule (paper Alg. 2,
:func:`sqpoptim.layers.adanp_activation`): per batch, the projection is used only if one NP step does not
increase the loss measure ``output_loss(x, y) + w * mean_b ||h(x, y_b)||``; otherwise the raw output is used
(and the displacement penalty vanishes). ``w`` is the problem's ``activation_penalty`` (App. D.2: 0 for
regression, a constraint penalty for optimisation tasks; 0 when a problem does not set it) unless the option
``activation_penalty`` overrides it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import sqpoptim
from sqpoptim import layers

from ._base import Batch, Problem
from ._layered import LayeredModel, LayerProblem
from .methods import Method, register_method

__all__: list[str] = []

_OPTIMIZER_KEYS = ("betas", "eps")
_METHOD_KEYS = ("rho", "lambda_d", "activation", "activation_penalty", "eta")


def _optimizer(params: Any, lr: float, options: dict[str, Any]) -> torch.optim.Optimizer:
    return sqpoptim.AdamUnc(params, lr=lr, **{k: v for k, v in options.items() if k in _OPTIMIZER_KEYS})


def _layer_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in _OPTIMIZER_KEYS + _METHOD_KEYS}


def _require_layer_problem(problem: Problem, method: str) -> LayerProblem:
    if not isinstance(problem, LayerProblem):
        raise ValueError(f"method {method!r} needs a problem with output constraints; {problem.name!r} has none")
    return problem


def _wrap(layer_cls: type[nn.Module], name: str) -> Callable[[Problem, nn.Module, dict[str, Any]], nn.Module]:
    def prepare(problem: Problem, backbone: nn.Module, options: dict[str, Any]) -> nn.Module:
        lp = _require_layer_problem(problem, name)
        model = LayeredModel(backbone, layer_cls(lp.output_constraints(), **_layer_options(options)))
        model.lambda_d = float(options.get("lambda_d", 0.5 if name == "enforce" else 0.0))
        model.activation = bool(options.get("activation", False))
        if model.activation and name != "enforce":
            raise ValueError(f"the activation rule is ENFORCE's (method 'enforce'), not {name!r}'s")
        model.activation_penalty = float(options.get("activation_penalty", getattr(lp, "activation_penalty", 0.0)))
        eta = options.get("eta")
        if eta is not None and not (isinstance(eta, (int, float)) and eta > 0):
            raise ValueError(f"Invalid eta: {eta!r} (the warm-start loss threshold must be > 0)")
        model.eta = None if eta is None else float(eta)
        return model

    return prepare


def _layer_closure(method: Method, problem: Problem, model: nn.Module, batch: Batch | None) -> Callable[[], Any]:
    lp = _require_layer_problem(problem, "layer")

    def measure(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # Alg. 2's loss measure
        loss = lp.output_loss(x, y, batch)
        if model.activation_penalty:
            loss = loss + model.activation_penalty * lp.output_constraints().h(x, y).norm(dim=-1).mean()
        return loss

    def closure() -> tuple[torch.Tensor, torch.Tensor]:
        x = lp.inputs(batch)
        y_hat = model.backbone(x)
        if model.eta is not None:
            raw = lp.output_loss(x, y_hat, batch)
            if float(raw.detach()) > model.eta:  # warm start: the backbone alone (one host read per step)
                with torch.no_grad():
                    return raw, lp.output_violation(x, y_hat.detach())
        if model.activation:
            y, _ = layers.adanp_activation(model.layer, x, y_hat, lambda y: measure(x, y))
        else:
            y = model.layer(x, y_hat)
        loss = lp.output_loss(x, y, batch)
        if model.lambda_d:
            loss = loss + model.lambda_d * (y_hat - y).square().sum(-1).mean()
        with torch.no_grad():  # logged: the batch's violation after the layer
            c = lp.output_violation(x, y.detach())
        return loss, c

    return closure


def _soft_closure(method: Method, problem: Problem, model: nn.Module, batch: Batch | None) -> Callable[[], Any]:
    lp = _require_layer_problem(problem, "soft")
    rho = float(getattr(model, "soft_rho", 1.0))

    def closure() -> tuple[torch.Tensor, torch.Tensor]:
        x = lp.inputs(batch)
        y = model(x)
        oc = lp.output_constraints()
        ev = oc.evaluate(x, y, jacobian=False)
        lower, upper = oc.bounds(x, ev.g) if ev.g is not None else (None, None)
        r = oc.residual(ev, lower, upper)  # [B, m + q], zero where satisfied
        loss = lp.output_loss(x, y, batch) + rho * r.square().sum(-1).mean()
        return loss, r.detach().abs().amax(-1)

    return closure


def _soft_prepare(problem: Problem, backbone: nn.Module, options: dict[str, Any]) -> nn.Module:
    _require_layer_problem(problem, "soft")
    backbone.soft_rho = float(options.get("rho", getattr(problem, "soft_rho", 1.0)))
    return backbone


for _name, _label, _cls in [
    ("hardnet", "HardNet", layers.HardNetAffine),
    ("enforce", "ENFORCE", layers.EnforceProjection),
    ("hardnet-pp", "HardNet++", layers.HardNetPP),
    ("kkt-hardnet", "KKT-Hardnet", layers.KKTHardNet),
]:
    register_method(
        _name,
        Method(
            f"Layer: {_label}",
            _optimizer,
            False,
            closure=_layer_closure,
            prepare=_wrap(_cls, _name),
            pointwise_jacobian=False,
            needs_output_constraints=True,
        ),
    )
register_method(
    "soft",
    Method(
        "Soft constraint",
        _optimizer,
        False,
        closure=_soft_closure,
        prepare=_soft_prepare,
        pointwise_jacobian=False,
        needs_output_constraints=True,
    ),
)
