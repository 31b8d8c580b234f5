r"""The 1D damped spring of the SQP paper (Curtis et al., "Projected Stochastic Momentum Methods for Nonlinear
Equality-Constrained Optimization for Machine Learning", §5.1; Moseley's harmonic-oscillator PINN).

The under-damped oscillator

.. math::
    u'' + 4 u' + 400 u = 0 \quad (t \in [0, 1]), \qquad u(0) = 1, \quad u'(0) = 0,

(mass 1, friction μ = 4, stiffness k = 400) has the exact solution

.. math::
    u(t) = e^{-δ t}\, 2A \cos(φ + ω t), \qquad δ = μ/2 = 2,\ ω = \sqrt{k - δ^2} = \sqrt{396},\
    φ = \arctan(-δ/ω),\ A = 1 / (2 \cos φ).

Model: MLP 1-32-32-32-1, tanh (2,209 parameters). Training terms:

* data fit at the 10 points t = i/499, i = 0, 20, …, 180 (t ≤ 0.361) with the exact values;
* ODE residual r(t) = u''(t) + 4u'(t) + 400u(t) at 30 evenly spaced points of [0, 1] (input derivatives by
  ``torch.autograd.grad(..., create_graph=True)``).

Objective f = MSE_fit + 10⁻⁴ · mean(r²) over the residual points. Hard constraints (m = 3): the raw residual
r at t = 4/29, 12/29, 21/29, which are residual points 4, 12 and 21 (they stay in the objective too).

Mini-batch: half of the residual points (15 of 30, without replacement); the fit term is always full (only
objective terms are subsampled, and the data term has just 10 points). The paper's learning rates are 5e-4
and 1e-4 with a budget of 30,000 epochs (iterations).

Sizes: the problem is the paper's at every size (it is already tiny); ``size`` is accepted for the interface.

:meth:`Spring.prediction` keys: ``t`` and ``u_true``/``u_pred`` on the test grid, ``t_fit``/``u_fit`` (the
data points) and ``t_constraint`` (the constraint points).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..core.autodiff import input_derivative, with_input_grad
from ..core.data import cached_arrays
from ..core.nets import make_mlp, num_parameters
from ..core.problem import Batch, Problem, ProblemDefaults, Size, batch_indices

__all__ = ["Spring", "spring_exact"]

MU, K = 4.0, 400.0  # friction and stiffness (mass 1)
DELTA = MU / 2.0
OMEGA = math.sqrt(K - DELTA**2)
PHI = math.atan(-DELTA / OMEGA)
AMP = 1.0 / (2.0 * math.cos(PHI))

LAYERS = (1, 32, 32, 32, 1)
NUM_PARAMETERS = 2209
FIT_INDICES = tuple(range(0, 181, 20))  # t = i/499
NUM_RESIDUAL = 30
CONSTRAINT_INDICES = (4, 12, 21)  # t = 4/29, 12/29, 21/29 among the residual points
RESIDUAL_WEIGHT = 1e-4
NUM_TEST = 1000


def spring_exact(t: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """The exact solution u(t) (numpy or torch, elementwise)."""
    if isinstance(t, Tensor):
        return torch.exp(-DELTA * t) * (2 * AMP) * torch.cos(PHI + OMEGA * t)
    t = np.asarray(t, dtype=np.float64)
    return np.exp(-DELTA * t) * (2 * AMP) * np.cos(PHI + OMEGA * t)


def _generate() -> dict[str, np.ndarray]:
    t_fit = np.asarray(FIT_INDICES, dtype=np.float64) / 499.0
    t_test = np.linspace(0.0, 1.0, NUM_TEST)
    return {
        "t_fit": t_fit,
        "u_fit": spring_exact(t_fit),
        "t_residual": np.linspace(0.0, 1.0, NUM_RESIDUAL),
        "t_test": t_test,
        "u_test": spring_exact(t_test),
    }


class Spring(Problem):
    """The damped spring: fit 10 early observations, obey the ODE on [0, 1] (see the module docstring)."""

    name = "spring"
    prediction_kind = "series"
    constraints_in_objective = True  # the constraint points are residual points (objective_and_constraints)
    defaults = ProblemDefaults(
        lrs=(5e-4, 1e-4),
        iterations_full=30_000,
        iterations_mini=30_000,
        quick_iterations=1_500,
        extra={
            "ode": "u'' + 4u' + 400u = 0, u(0)=1, u'(0)=0",
            "layers": LAYERS,
            "fit_points": "t = i/499, i = 0, 20, ..., 180",
            "residual_points": NUM_RESIDUAL,
            "residual_weight": RESIDUAL_WEIGHT,
            "constraint_points": "t = 4/29, 12/29, 21/29",
            "mini_batch": "15 of the 30 residual points; fit term full",
            "test_points": NUM_TEST,
        },
    )

    def __init__(
        self,
        size: Size = "paper",
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(size, device=device, dtype=dtype, cache_dir=cache_dir)
        params = {
            "delta": DELTA,
            "omega": OMEGA,
            "fit_indices": FIT_INDICES,
            "num_residual": NUM_RESIDUAL,
            "num_test": NUM_TEST,
        }
        data = cached_arrays("spring", params, _generate, cache_dir)
        as_tensor = lambda a: torch.as_tensor(a, device=self.device, dtype=self.dtype)  # noqa: E731
        self.t_fit = as_tensor(data["t_fit"])[:, None]  # [10, 1]
        self.u_fit = as_tensor(data["u_fit"])[:, None]  # [10, 1]
        self.t_residual = as_tensor(data["t_residual"])[:, None]  # [30, 1]
        self.t_test = as_tensor(data["t_test"])[:, None]  # [1000, 1]
        self.u_test = as_tensor(data["u_test"])[:, None]  # [1000, 1]
        # an index tensor: a batched backward has a batching rule for index_select's backward, not for indexing
        self.constraint_index = torch.tensor(CONSTRAINT_INDICES, device=self.device)
        self.t_constraint = self.t_residual.index_select(0, self.constraint_index)  # [3, 1]

    # --- model -------------------------------------------------------------------------------------------
    def make_model(self, seed: int) -> nn.Module:
        model = make_mlp(LAYERS, seed, device=self.device, dtype=self.dtype)
        assert num_parameters(model) == NUM_PARAMETERS, num_parameters(model)
        return model

    # --- training terms ----------------------------------------------------------------------------------
    @with_input_grad
    def residual(self, model: nn.Module, t: Tensor) -> Tensor:
        """r(t) = u'' + 4u' + 400u at the points ``t`` ([N, 1]); [N], with a graph to the parameters."""
        t = t.detach().clone().requires_grad_(True)  # a fresh leaf: derivatives are taken w.r.t. it
        u = model(t)  # [N, 1]
        du = input_derivative(u, t)  # [N, 1]
        d2u = input_derivative(du, t)  # [N, 1]
        return (d2u + MU * du + K * u).squeeze(-1)

    def objective(self, model: nn.Module, batch: Batch | None = None) -> Tensor:
        if batch is None:
            t_res = self.t_residual
        else:
            t_res = self.t_residual[batch_indices(batch, "residual", NUM_RESIDUAL, self.name, self.device)]
        fit = torch.mean((model(self.t_fit) - self.u_fit) ** 2)
        return fit + RESIDUAL_WEIGHT * torch.mean(self.residual(model, t_res) ** 2)

    def constraints(self, model: nn.Module) -> Tensor:
        return self.residual(model, self.t_constraint)  # [3]

    def objective_and_constraints(self, model: nn.Module, batch: Batch | None = None) -> tuple[Tensor, Tensor]:
        """One residual pass for both: the constraint points are residual points, so in full batch c is read off
        the objective's residuals, and a mini-batch's residual points go through the model together with them
        (the objective's input derivatives are the step's largest cost; measured about a quarter of a
        constrained step)."""
        k = len(CONSTRAINT_INDICES)
        if batch is None:
            r = self.residual(model, self.t_residual)  # [30]
            r_obj, c = r, r.index_select(0, self.constraint_index)
        else:
            t_res = self.t_residual[batch_indices(batch, "residual", NUM_RESIDUAL, self.name, self.device)]
            r = self.residual(model, torch.cat([t_res, self.t_constraint]))  # [B + 3]
            r_obj, c = r[:-k], r[-k:]
        fit = torch.mean((model(self.t_fit) - self.u_fit) ** 2)
        return fit + RESIDUAL_WEIGHT * torch.mean(r_obj**2), c

    @property
    def num_constraints(self) -> int:
        return len(CONSTRAINT_INDICES)

    def sample_batch(self, generator: torch.Generator) -> Batch:
        perm = torch.randperm(NUM_RESIDUAL, generator=generator)
        return {"residual": perm[: NUM_RESIDUAL // 2]}

    # --- evaluation --------------------------------------------------------------------------------------
    def metrics(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():  # the residuals switch autograd on for their input derivatives only
            objective = self.objective(model)
            c = self.constraints(model)
            test_mse = torch.mean((model(self.t_test) - self.u_test) ** 2)
        return {
            "objective": float(objective),
            "test_mse": float(test_mse),
            "max_abs_c": float(c.abs().max()),
        }

    def prediction(self, model: nn.Module) -> dict[str, np.ndarray]:
        with torch.no_grad():
            u_pred = model(self.t_test)
        numpy = lambda a: a.detach().cpu().double().numpy().ravel()  # noqa: E731
        return {
            "t": numpy(self.t_test),
            "u_true": numpy(self.u_test),
            "u_pred": numpy(u_pred),
            "t_fit": numpy(self.t_fit),
            "u_fit": numpy(self.u_fit),
            "t_constraint": numpy(self.t_constraint),
        }
