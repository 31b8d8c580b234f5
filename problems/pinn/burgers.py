r"""1D viscous Burgers equation over a family of initial conditions (Curtis et al., "Projected Stochastic Momentum
Methods for Nonlinear Equality-Constrained Optimization for Machine Learning", §5.3).

.. math::

    u_t + u\,u_x = \nu\,u_{xx},\quad x \in [0, 1) \text{ periodic},\ t \in [0, 1],\quad \nu = 0.01,
    \qquad u(x, 0) = u_0(x) = \sin(2\pi x + \xi\pi),\quad \xi \sim U[0, 0.2).

The model :math:`\hat u(x, t, u_0; \theta)` is an MLP 34-64-64-64-1 (tanh) whose input is
``[x, t, u0(x_0), ..., u0(x_31)]``. With the PDE residual
:math:`r = \hat u_t + \hat u \hat u_x - \nu \hat u_{xx}` (derivatives by autograd with respect to the x and
t inputs, ``create_graph=True``), the objective is

.. math::

    f(\theta) = 10^{-3}\,\overline{r^2} + 10^{-3}\,\bigl(\overline{(\hat u(0,t) - \hat u(1,t))^2}
    + \overline{(\hat u(x,0) - u_0(x))^2}\bigr) + \overline{(\hat u - u)^2}_{\text{fit}},

with the residual at every training grid point (n_train × 32 × 32), periodicity at every grid time, the
initial condition at every grid point in x, and the fit on 200 random grid points per initial condition. The
hard constraints (m = 10) are ``r = 0`` at 10 random (initial condition, x, t) grid points.

Data. Grid ``x_j = j/32`` (j = 0..31) and ``t_a = a/31`` (a = 0..31). The reference solution comes from
:func:`problems.reference.burgers_solver.solve_burgers` (2/3-dealiased Fourier pseudo-spectral on 256 points, Radau
with rtol 1e-10; max error ≈ 6e-9 against 1024 points). Seeds (``numpy.random.default_rng``): ξ of the
training initial conditions from ``[0, 0]``, of the test ones from ``[0, 1]``, fit points ``[0, 2]``,
constraint points ``[0, 3]`` (so smaller sizes take prefixes of the same ξ sequences). Sizes (training / test
initial conditions): paper 100 / 20, small 5 / 5, tiny 3 / 2; the unit-test size "tiny" solves on 128
points (max error ≈ 5e-5) to keep the tests fast.

Mini-batches (20 %): each *objective* term is subsampled independently, uniformly without replacement, to 20 %
of its points (residual, periodicity, initial condition, fit); each term stays a mean, so the mini-batch
objective is an unbiased estimate of each term. Constraints are never subsampled.

Deviations from the paper:

* The authors' code used ``linspace(0, 1, 32)`` in x, which gives the spectral solver a period of 32/31;
  here the grid is truly periodic on [0, 1) (``x_j = j/32``), so x = 1 is not a grid point and the
  periodicity term evaluates the model at x = 0 and x = 1 explicitly.
* Every initial condition is a translate of ``sin(2πx)``: ``u0(x) = sin(2π(x + ξ/2))``. The PDE is translation
  invariant and the dealiased scheme is exactly translation-equivariant, so the data are ONE solve from
  ``sin(2πx)`` evaluated by exact Fourier interpolation at ``x_j + ξ/2`` instead of one solve per initial
  condition (the authors used odeint per initial condition). The tests check this against a direct solve.
* "Boundary term" is the sum of the periodicity MSE and the initial-condition MSE (the paper names the term
  but not how its parts combine).

Cost (measured on the development machine: a loaded 2-core AMD EPYC, one thread, float32, paper size): one
full objective + gradient 2.5–3.7 s (102,400 residual points with second input derivatives), a mini-batch one
0.5–0.8 s, the 10 constraints 2 ms and their batched Jacobian 12 ms. ``quick_iterations = 100`` keeps five
methods at size "small" under two minutes there (full batch, ≈ 1.1 s per iteration-round).

``prediction()`` returns ``{"x": [32], "t": [32], "u_true": [32 (t), 32 (x)], "u_pred": [32, 32]}`` for the
first held-out initial condition.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..core.data import cached_arrays
from ..core.nets import forked_mlp
from ..core.problem import Batch, Problem, ProblemDefaults, Size, require_keys
from ..reference.burgers_solver import fourier_interpolate, solve_burgers

__all__ = ["Burgers"]

_NU = 0.01
_N_X = 32
_N_T = 32
_SOLVER_POINTS = {"paper": 256, "small": 256, "tiny": 128}  # reference solver resolution per size
_SOLVER_RTOL, _SOLVER_ATOL = 1e-10, 1e-12
_FIT_PER_IC = 200
_NUM_CONSTRAINTS = 10
_BATCH_FRACTION = 0.2
_W_PDE, _W_BOUNDARY, _W_FIT = 1e-3, 1e-3, 1.0
_SEED = 0
_SIZES = {"paper": (100, 20), "small": (5, 5), "tiny": (3, 2)}  # (training, held-out) initial conditions


def _generate(n_train: int, n_test: int, solver_points: int) -> dict[str, np.ndarray]:
    x = np.arange(_N_X) / _N_X  # truly periodic grid on [0, 1)
    t = np.linspace(0.0, 1.0, _N_T)
    xi_train = np.random.default_rng([_SEED, 0]).uniform(0.0, 0.2, n_train)
    xi_test = np.random.default_rng([_SEED, 1]).uniform(0.0, 0.2, n_test)
    x_fine = np.arange(solver_points) / solver_points
    base = solve_burgers(np.sin(2 * np.pi * x_fine), t, _NU, rtol=_SOLVER_RTOL, atol=_SOLVER_ATOL)  # [T, N]

    def field(xi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # u(x, t; ξ) = U(x + ξ/2, t): translation of the single solve (see the module docstring).
        shifted = (x[None, :] + xi[:, None] / 2)[:, None, :]  # [B, 1, n_x]
        u = fourier_interpolate(base, shifted)  # [B, T, n_x]
        return np.sin(2 * np.pi * x[None, :] + np.pi * xi[:, None]), u

    u0_train, u_train = field(xi_train)
    u0_test, u_test = field(xi_test)
    rng_fit = np.random.default_rng([_SEED, 2])
    fit = np.argsort(rng_fit.random((n_train, _N_T * _N_X)), axis=1)[:, :_FIT_PER_IC]  # without replacement
    constraint = np.random.default_rng([_SEED, 3]).choice(n_train * _N_T * _N_X, _NUM_CONSTRAINTS, replace=False)
    return {
        "x": x, "t": t, "xi_train": xi_train, "xi_test": xi_test,
        "u0_train": u0_train, "u_train": u_train, "u0_test": u0_test, "u_test": u_test,
        "fit_points": np.sort(fit, axis=1), "constraint_points": constraint,
    }  # fmt: skip


class Burgers(Problem):
    """Physics-informed operator learning for 1D viscous Burgers (see the module docstring)."""

    name = "burgers"
    prediction_kind = "field"
    defaults = ProblemDefaults(
        lrs=(1e-3, 5e-4),
        iterations_full=10_000,
        iterations_mini=10_000,
        quick_iterations=100,
        extra={
            "nu": _NU,
            "grid": [_N_X, _N_T],
            "model": "MLP 34-64-64-64-1 tanh",
            "weights": {"pde": _W_PDE, "boundary": _W_BOUNDARY, "fit": _W_FIT},
            "fit_points_per_ic": _FIT_PER_IC,
            "batch_fraction": _BATCH_FRACTION,
            "solver_points": _SOLVER_POINTS["paper"],
            "data_seed": _SEED,
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
        self.n_train, self.n_test = _SIZES[size]
        self.solver_points = _SOLVER_POINTS[size]
        params = {
            "version": 1, "nu": _NU, "n_x": _N_X, "n_t": _N_T, "n_train": self.n_train, "n_test": self.n_test,
            "seed": _SEED, "xi": [0.0, 0.2], "solver_points": self.solver_points, "rtol": _SOLVER_RTOL,
            "atol": _SOLVER_ATOL, "dealias": True, "fit_per_ic": _FIT_PER_IC, "m": _NUM_CONSTRAINTS,
        }  # fmt: skip
        data = cached_arrays(
            "burgers", params, lambda: _generate(self.n_train, self.n_test, self.solver_points), cache_dir
        )
        self.data = data
        real = {"device": self.device, "dtype": self.dtype}
        index = {"device": self.device, "dtype": torch.long}
        self.x = torch.as_tensor(data["x"], **real)  # [n_x]
        self.t = torch.as_tensor(data["t"], **real)  # [n_t]
        self.u0_train = torch.as_tensor(data["u0_train"], **real)  # [I, n_x]
        self.u_train = torch.as_tensor(data["u_train"], **real)  # [I, n_t, n_x]
        self.u0_test = torch.as_tensor(data["u0_test"], **real)
        self.u_test = torch.as_tensor(data["u_test"], **real)
        per_ic = _N_T * _N_X
        ic_offset = torch.arange(self.n_train, **index)[:, None] * per_ic
        self._fit_points = (torch.as_tensor(data["fit_points"], **index) + ic_offset).reshape(-1)  # [I * 200]
        self._constraint_points = torch.as_tensor(data["constraint_points"], **index)  # [m]
        self._n_points = self.n_train * per_ic
        self._n_periodic = self.n_train * _N_T  # (initial condition, time) pairs
        self._n_initial = self.n_train * _N_X  # (initial condition, x) pairs

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "solver_points": self.solver_points}

    # --- model -------------------------------------------------------------------------------------------
    def make_model(self, seed: int) -> nn.Module:
        return forked_mlp([2 + _N_X, 64, 64, 64, 1], seed).to(device=self.device, dtype=self.dtype)

    @property
    def num_constraints(self) -> int:
        return _NUM_CONSTRAINTS

    # --- evaluation helpers ------------------------------------------------------------------------------
    def _inputs(self, u0: Tensor, ic: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Model inputs ``[x, t, u0(x_0..x_31)]`` for points of initial conditions ``ic``: ``[P, 34]``."""
        return torch.cat([x[:, None], t[:, None], u0[ic]], dim=1)

    def _split(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Flat grid index ``(i * n_t + a) * n_x + b`` -> (initial condition i, time a, space b)."""
        return points // (_N_T * _N_X), (points // _N_X) % _N_T, points % _N_X

    def residual(self, model: nn.Module, points: Tensor, *, create_graph: bool = True) -> Tensor:
        """PDE residual ``u_t + u u_x − ν u_xx`` of ``model`` at flat training grid indices: ``[P]``.

        The model must act row-wise (as an MLP does): input derivatives are taken of the summed output.
        ``create_graph=False`` gives values only (no graph to the parameters through the second derivative).
        """
        ic, a, b = self._split(points)
        with torch.enable_grad():
            x = self.x[b].detach().requires_grad_(True)  # [P]
            t = self.t[a].detach().requires_grad_(True)  # [P]
            u = model(self._inputs(self.u0_train, ic, x, t)).squeeze(-1)  # [P]
            u_x, u_t = torch.autograd.grad(u.sum(), (x, t), create_graph=True)
            (u_xx,) = torch.autograd.grad(u_x.sum(), x, create_graph=create_graph)
        return u_t + u * u_x - _NU * u_xx

    def terms(self, model: nn.Module, batch: Batch | None = None, *, create_graph: bool = True) -> dict[str, Tensor]:
        """The objective's parts (each a mean over its points, unweighted): pde, periodic, initial, fit."""
        if batch is None:
            pde = torch.arange(self._n_points, device=self.device)
            edge = torch.arange(self._n_periodic, device=self.device)
            initial = torch.arange(self._n_initial, device=self.device)
            fit = self._fit_points
        else:
            require_keys(batch, ("pde", "periodic", "initial", "fit"), self.name)
            pde, edge, initial, fit = batch["pde"], batch["periodic"], batch["initial"], batch["fit"]
            fit = self._fit_points[fit]
        r = self.residual(model, pde, create_graph=create_graph)
        # Everything without input derivatives goes through one forward pass.
        ic_e, a_e = edge // _N_T, edge % _N_T
        ic_i, b_i = initial // _N_X, initial % _N_X
        ic_f, a_f, b_f = self._split(fit)
        zeros, ones = torch.zeros_like(self.t[a_e]), torch.ones_like(self.t[a_e])
        inputs = torch.cat(
            [
                self._inputs(self.u0_train, ic_e, zeros, self.t[a_e]),  # x = 0
                self._inputs(self.u0_train, ic_e, ones, self.t[a_e]),  # x = 1
                self._inputs(self.u0_train, ic_i, self.x[b_i], torch.zeros_like(self.x[b_i])),  # t = 0
                self._inputs(self.u0_train, ic_f, self.x[b_f], self.t[a_f]),
            ]
        )
        u_left, u_right, u_init, u_fit = model(inputs).squeeze(-1).split([len(edge), len(edge), len(initial), len(fit)])
        return {
            "pde": r.square().mean(),
            "periodic": (u_left - u_right).square().mean(),
            "initial": (u_init - self.u0_train[ic_i, b_i]).square().mean(),
            "fit": (u_fit - self.u_train[ic_f, a_f, b_f]).square().mean(),
        }

    # --- training terms ----------------------------------------------------------------------------------
    def objective(self, model: nn.Module, batch: Batch | None = None) -> Tensor:
        return self._combine(self.terms(model, batch))

    @staticmethod
    def _combine(terms: dict[str, Tensor]) -> Tensor:
        return _W_PDE * terms["pde"] + _W_BOUNDARY * (terms["periodic"] + terms["initial"]) + _W_FIT * terms["fit"]

    def constraints(self, model: nn.Module) -> Tensor:
        return self.residual(model, self._constraint_points)  # [m]

    def sample_batch(self, generator: torch.Generator) -> Batch:
        def draw(n: int) -> Tensor:
            return torch.randperm(n, generator=generator)[: max(1, round(_BATCH_FRACTION * n))].to(self.device)

        return {
            "pde": draw(self._n_points),
            "periodic": draw(self._n_periodic),
            "initial": draw(self._n_initial),
            "fit": draw(len(self._fit_points)),
        }

    # --- evaluation --------------------------------------------------------------------------------------
    def _predict_test(self, model: nn.Module) -> Tensor:
        """Model on every held-out grid point: ``[n_test, n_t, n_x]``."""
        points = torch.arange(self.n_test * _N_T * _N_X, device=self.device)
        ic, a, b = self._split(points)
        with torch.no_grad():
            u = model(self._inputs(self.u0_test, ic, self.x[b], self.t[a]))
        return u.reshape(self.n_test, _N_T, _N_X)

    def metrics(self, model: nn.Module) -> dict[str, float]:
        terms = {k: v.detach() for k, v in self.terms(model, create_graph=False).items()}
        c = self.residual(model, self._constraint_points, create_graph=False).detach()
        return {
            "objective": float(self._combine(terms)),
            "test_mse": float((self._predict_test(model) - self.u_test).square().mean()),
            "max_abs_c": float(c.abs().max()),
            **{f"term_{k}": float(v) for k, v in terms.items()},
        }

    def prediction(self, model: nn.Module) -> dict[str, np.ndarray]:
        u_pred = self._predict_test(model)[0]
        return {
            "x": self.data["x"].copy(),
            "t": self.data["t"].copy(),
            "u_true": self.data["u_test"][0].copy(),
            "u_pred": u_pred.detach().cpu().double().numpy(),
        }
