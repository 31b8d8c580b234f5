r"""The chemical reaction network of the SQP paper (Curtis et al., "Projected Stochastic Momentum Methods for
Nonlinear Equality-Constrained Optimization for Machine Learning", §5.2; Gupta et al. 2016, scaled).

1-butene isomerisation on an acidic zeolite, with kinetic constants scaled so that the system is the linear
ODE u' = A u, k = [4.283, 1.191, 5.743, 10.219, 1.535]:

.. math::
    u_1' &= -(k_1 + k_2 + k_4) u_1 + k_3 u_3 + k_5 u_4, \qquad u_2' = 2 k_1 u_1, \\
    u_3' &= k_2 u_1 - k_3 u_3, \qquad u_4' = k_4 u_1 - k_5 u_4,

whose mass balance w·u' = u_1' + ½u_2' + u_3' + u_4' = 0 (w = [1, ½, 1, 1], wᵀA = 0) holds exactly.

Data: initial conditions u0 = ū0 + U[−1, 1]⁴ around ū0 = [14.5467204, 16.3351668, 25.9473091, 23.5250934]
(numpy ``RandomState(1000)``; the paper's 1000 at size "paper"), times t_j = 10 j / 64, j = 0, …, 63, and the
exact solution u(t) = exp(A t) u0 by the matrix exponential (the paper used odeint; the system is linear,
so this is exact and the tests compare it with ``solve_ivp`` at tight tolerances). Training points are all
(u0, t) pairs (64,000 at size "paper"). Held-out test initial conditions come from ``RandomState(1001)``.

Model: MLP 5-64-64-64-4, tanh, input [u0 (4), t] fed raw, as in the paper: no input normalisation. (Raw inputs
of size ~20 saturate the first tanh layer at initialisation and the outputs must grow to ~50, so early
progress is slow, but it trains: full-batch Adam at lr 5e-4 on the "tiny" data took the objective from 3,657
to 0.058 in 20,000 iterations.) Objective

.. math::
    f = 10^{-2}\,\mathrm{MSE}(u' - A u) + 10^{-2}\,\mathrm{MSE}(w·u')
        + 1 · \mathrm{MSE}_{\text{fit}}(u - u^*),

each MSE a mean over points and components; the two residual terms over all training points (u' = ∂u/∂t by
``torch.autograd.grad``, see :func:`problems.core.autodiff.input_jvp`), the fit term over a fixed random 20% of
the training points. Hard constraints (m = 10): the mass-balance residual w·u' at 10 fixed random training points.

Mini-batch (the paper: "20% of all samples"): every objective term is subsampled to 20% of its own points,
independently and without replacement — 20% of the training points for the two residual terms and 20% of the
fit points for the fit term — so each term's mini-batch mean is an unbiased estimate of its full mean. This is
our reading; the paper does not say how the fit subset meets the mini-batch. Constraints are never subsampled.

Sizes: "paper" 1000 training / 200 test initial conditions, "small" 32 / 32, "tiny" 20 / 10; the initial
conditions of a smaller size are a prefix of the paper's.

:meth:`Chemistry.prediction` keys: ``t`` (a fine grid), ``u_true``/``u_pred`` ([len(t), 4]) and ``u0`` for the
first test initial condition, and ``t_data`` (the 64 data times).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

from ..core.autodiff import input_derivative, input_jvp, with_input_grad
from ..core.data import cached_arrays
from ..core.nets import make_mlp
from ..core.problem import Batch, Problem, ProblemDefaults, Size, batch_indices

__all__ = ["MASS_BALANCE", "RATE_CONSTANTS", "Chemistry", "chemistry_solution", "rate_matrix"]

RATE_CONSTANTS = (4.283, 1.191, 5.743, 10.219, 1.535)
NOMINAL_U0 = (14.5467204, 16.3351668, 25.9473091, 23.5250934)
MASS_BALANCE = (1.0, 0.5, 1.0, 1.0)  # w: w·u' = 0
NUM_TIMES, DT = 64, 10.0 / 64.0
LAYERS = (5, 64, 64, 64, 4)
WEIGHTS = {"ode": 1e-2, "mass": 1e-2, "fit": 1.0}
FIT_FRACTION, BATCH_FRACTION = 0.2, 0.2
NUM_CONSTRAINTS = 10
TRAIN_SEED, TEST_SEED, SUBSET_SEED = 1000, 1001, 0
SIZES = {"paper": (1000, 200), "small": (32, 32), "tiny": (20, 10)}  # (train, test) initial conditions
NUM_PREDICTION_TIMES = 200


def rate_matrix(k=RATE_CONSTANTS) -> np.ndarray:
    """The matrix A of u' = A u."""
    k1, k2, k3, k4, k5 = k
    return np.array(
        [
            [-(k1 + k2 + k4), 0.0, k3, k5],
            [2 * k1, 0.0, 0.0, 0.0],
            [k2, 0.0, -k3, 0.0],
            [k4, 0.0, 0.0, -k5],
        ]
    )


def chemistry_solution(u0: np.ndarray, t: np.ndarray) -> np.ndarray:
    """u(t) = exp(A t) u0 for initial conditions ``u0`` [n, 4] and times ``t`` [T]; returns [n, T, 4]."""
    expm = scipy.linalg.expm(rate_matrix()[None] * np.asarray(t, dtype=np.float64)[:, None, None])  # [T, 4, 4]
    return np.einsum("tij,nj->nti", expm, np.asarray(u0, dtype=np.float64))


def initial_conditions(n: int, seed: int) -> np.ndarray:
    """ū0 + U[−1, 1]⁴ for ``n`` initial conditions ([n, 4]); row i does not depend on n (a prefix)."""
    return np.asarray(NOMINAL_U0) + np.random.RandomState(seed).uniform(-1.0, 1.0, size=(n, 4))


def _generate(num_train: int, num_test: int) -> dict[str, np.ndarray]:
    t = np.arange(NUM_TIMES) * DT  # [64]
    u0_train, u0_test = initial_conditions(num_train, TRAIN_SEED), initial_conditions(num_test, TEST_SEED)
    n_points = num_train * NUM_TIMES
    rng = np.random.default_rng(SUBSET_SEED)
    fit_idx = np.sort(rng.choice(n_points, size=round(FIT_FRACTION * n_points), replace=False))
    constraint_idx = np.sort(rng.choice(n_points, size=NUM_CONSTRAINTS, replace=False))
    return {
        "t": t,
        "u0_train": u0_train,
        "u_train": chemistry_solution(u0_train, t),  # [n_train, 64, 4]
        "u0_test": u0_test,
        "u_test": chemistry_solution(u0_test, t),  # [n_test, 64, 4]
        "fit_idx": fit_idx,  # into the flattened (initial condition, time) points
        "constraint_idx": constraint_idx,
    }


def _points(u0: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Model inputs [u0, t] for every (initial condition, time) pair, initial-condition-major: [n·T, 5]."""
    n, T = len(u0), len(t)
    return np.concatenate([np.repeat(u0, T, axis=0), np.tile(t, n)[:, None]], axis=1)


class Chemistry(Problem):
    """The reaction network: learn (u0, t) ↦ u(t) from the ODE, the mass balance and 20% of the solution."""

    name = "chemistry"
    prediction_kind = "series"
    defaults = ProblemDefaults(
        lrs=(5e-4, 1e-4),
        iterations_full=100_000,
        iterations_mini=20_000,
        quick_iterations=400,
        extra={
            "rate_constants": RATE_CONSTANTS,
            "nominal_u0": NOMINAL_U0,
            "times": "t = 10 j / 64, j = 0..63",
            "layers": LAYERS,
            "weights": WEIGHTS,
            "fit_fraction": FIT_FRACTION,
            "batch_fraction": BATCH_FRACTION,
            "mini_batch": "20% of the residual points and, independently, 20% of the fit points",
            "constraints": "mass balance at 10 random training points",
            "seeds": {"train_ic": TRAIN_SEED, "test_ic": TEST_SEED, "subsets": SUBSET_SEED},
            "initial_conditions": SIZES,
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
        num_train, num_test = SIZES[size]
        params = {
            "k": RATE_CONSTANTS,
            "u0": NOMINAL_U0,
            "num_times": NUM_TIMES,
            "dt": DT,
            "num_train": num_train,
            "num_test": num_test,
            "seeds": (TRAIN_SEED, TEST_SEED, SUBSET_SEED),
            "fit_fraction": FIT_FRACTION,
            "num_constraints": NUM_CONSTRAINTS,
        }
        data = cached_arrays("chemistry", params, lambda: _generate(num_train, num_test), cache_dir)
        as_tensor = lambda a: torch.as_tensor(a, device=self.device, dtype=self.dtype)  # noqa: E731
        self.num_train, self.num_test = num_train, num_test
        self.t = data["t"]
        self.x_train = as_tensor(_points(data["u0_train"], self.t))  # [N, 5]
        self.u_train = as_tensor(data["u_train"].reshape(-1, 4))  # [N, 4]
        self.x_test = as_tensor(_points(data["u0_test"], self.t))  # [N_test, 5]
        self.u_test = as_tensor(data["u_test"].reshape(-1, 4))  # [N_test, 4]
        self.fit_idx = torch.as_tensor(data["fit_idx"], device=self.device)  # [N_fit]
        self.constraint_idx = torch.as_tensor(data["constraint_idx"], device=self.device)  # [10]
        self.u0_test = data["u0_test"]
        self.A = as_tensor(rate_matrix())  # [4, 4]
        self.w = as_tensor(MASS_BALANCE)  # [4]

    @property
    def num_points(self) -> int:
        return self.x_train.shape[0]

    # --- model -------------------------------------------------------------------------------------------
    def make_model(self, seed: int) -> nn.Module:
        return make_mlp(LAYERS, seed, device=self.device, dtype=self.dtype)

    # --- training terms ----------------------------------------------------------------------------------
    @with_input_grad
    def residuals(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """ODE residual u' − A u ([N, 4]) and mass-balance residual w·u' ([N]) at inputs ``x`` ([N, 5])."""
        t = x[:, 4:].detach().clone().requires_grad_(True)  # [N, 1] the leaf we differentiate by
        u = model(torch.cat([x[:, :4], t], dim=1))  # [N, 4]
        du = input_jvp(u, t)  # [N, 4] ∂u/∂t
        return du - u @ self.A.T, du @ self.w

    @with_input_grad
    def mass_balance(self, model: nn.Module, x: Tensor) -> Tensor:
        """w·u' at the inputs ``x`` ([N, 5]); returns [N]."""
        t = x[:, 4:].detach().clone().requires_grad_(True)  # [N, 1]
        u = model(torch.cat([x[:, :4], t], dim=1))  # [N, 4]
        return input_derivative(u, t, self.w).squeeze(-1)  # [N]

    def objective(self, model: nn.Module, batch: Batch | None = None) -> Tensor:
        if batch is None:
            x_res, fit_idx = self.x_train, self.fit_idx
        else:
            x_res = self.x_train[batch_indices(batch, "residual", self.num_points, self.name, self.device)]
            fit_idx = self.fit_idx[batch_indices(batch, "fit", len(self.fit_idx), self.name, self.device)]
        ode, mass = self.residuals(model, x_res)
        fit = model(self.x_train[fit_idx]) - self.u_train[fit_idx]  # [N_fit, 4]
        return (
            WEIGHTS["ode"] * torch.mean(ode**2)
            + WEIGHTS["mass"] * torch.mean(mass**2)
            + WEIGHTS["fit"] * torch.mean(fit**2)
        )

    def constraints(self, model: nn.Module) -> Tensor:
        return self.mass_balance(model, self.x_train[self.constraint_idx])  # [10]

    @property
    def num_constraints(self) -> int:
        return NUM_CONSTRAINTS

    def sample_batch(self, generator: torch.Generator) -> Batch:
        n_res, n_fit = self.num_points, len(self.fit_idx)
        return {
            "residual": torch.randperm(n_res, generator=generator)[: round(BATCH_FRACTION * n_res)],
            "fit": torch.randperm(n_fit, generator=generator)[: round(BATCH_FRACTION * n_fit)],
        }

    # --- evaluation --------------------------------------------------------------------------------------
    def metrics(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():  # the residuals switch autograd on for their input derivatives only
            objective = self.objective(model)
            c = self.constraints(model)
            test_mse = torch.mean((model(self.x_test) - self.u_test) ** 2)
        return {
            "objective": float(objective),
            "test_mse": float(test_mse),
            "max_abs_c": float(c.abs().max()),
        }

    def prediction(self, model: nn.Module) -> dict[str, np.ndarray]:
        t = np.linspace(0.0, self.t[-1], NUM_PREDICTION_TIMES)
        u0 = self.u0_test[:1]  # [1, 4]
        x = torch.as_tensor(_points(u0, t), device=self.device, dtype=self.dtype)
        with torch.no_grad():
            u_pred = model(x).detach().cpu().double().numpy()  # [T, 4]
        return {
            "t": t,
            "u_true": chemistry_solution(u0, t)[0],
            "u_pred": u_pred,
            "u0": u0[0],
            "t_data": np.asarray(self.t),
        }
