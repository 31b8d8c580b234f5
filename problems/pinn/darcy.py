r"""2D Darcy flow with a Fourier neural operator (Curtis et al., "Projected Stochastic Momentum Methods for
Nonlinear Equality-Constrained Optimization for Machine Learning", §5.4).

.. math::

    -\nabla\cdot(\nu \nabla u) = 1 \ \text{in } (0, 1)^2, \qquad u = 0 \ \text{on the boundary},

on the 16 × 16 vertex grid :math:`x_i = i/15` (boundary nodes included). ν is a thresholded Gaussian random
field (values 12 and 3, :func:`problems.reference.darcy_solver.gaussian_random_field`, α = 2, τ = 3 as in the FNO
paper) and the reference u solves the finite-volume system of :mod:`problems.reference.darcy_solver` (harmonic face
averaging of ν).

The model is :class:`problems.core.fno.FNO` (width 4, modes (16, 16) = all 16 × 9 rfft2 coefficients, 4 Fourier
layers, lifting and projection with 256 hidden channels; 22,101 real parameters, the paper's count). Input
channels: ``(ν − 7.5)/4.5`` (so ±1; a fixed affine encoding of the input only), x and y; output: u itself.
With the discrete residual :math:`r = A(\nu)\hat u - 1` (the SAME operator as the solver, applied to the
predicted grid, so the reference solution has :math:`r \approx 10^{-13}`) the objective is

.. math::

    f(\theta) = 10^{-2}\,\overline{r^2}_{\text{interior}} + 10^{-2}\,\overline{\hat u^2}_{\text{boundary}}
    + \overline{(\hat u - u)^2}_{\text{fit}},

the fit on a fixed random 20 % of the 256 nodes of every training field (51 nodes each). Hard constraints
(m = 50): :math:`r = 0` at 50 random (training field, interior node) pairs. Mini-batch: 20 % of the training
fields, sampled without replacement; all three objective terms use only those fields. Constraints are never
subsampled.

Data (``numpy.random.default_rng`` seeds): 1000 fields from ``[0, 0]``. Selection of fields "with similar
values" (the paper's rule is unpublished; ours): the high-permeability fraction ``p = mean(ν == 12)`` of each
field, then the ``n_train + n_test`` fields with ``|p − median(p)|`` smallest (stable order), split into
training and held-out test fields by a permutation from ``[0, 1]``. Fit nodes from ``[0, 2]``, constraint
pairs from ``[0, 3]``.

Deviations and notes:

* The output is NOT normalised (the authors' code fitted a normalised u while using the raw forcing in the
  residual, which makes the two terms inconsistent). The price is scale: u is O(1e-2) while r is O(1) for a
  poor prediction, so the residual term dominates the objective early on.
* The reference solution is the discrete FV solution on the 16 × 16 grid itself (the FNO paper solves on 421 ×
  421 and subsamples); this is what makes residual and data exactly consistent.
* The paper used neuralop's FNO; ours is a re-implementation of the same layout (see :mod:`problems.core.fno`).

Sizes (generated / training / test fields): paper 1000 / 100 / 20, small 1000 / 5 / 10, tiny 40 / 3 / 2.
Cost (measured on the development machine: a loaded 2-core AMD EPYC, one thread, float32, paper size): one
full objective + gradient 0.74 s, a mini-batch one 0.12 s, the 50 constraints 0.09 s, but their batched
Jacobian 13 s: each of the 50 rows is a backward pass through every constrained field (≈ 41 distinct) and the
256-channel lifting/projection, and ``is_grads_batched`` falls back to a loop for GELU and FFT backward. Hence
the small size (5 training fields) and ``quick_iterations = 20`` (five methods ≈ 110 s there).

``prediction()`` returns ``{"nu", "u_true", "u_pred"}``, each ``[16, 16]`` (axis 0 is x, axis 1 is y), for the
first held-out field.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..core.data import cached_arrays
from ..core.fno import FNO
from ..core.problem import Batch, Problem, ProblemDefaults, Size, require_keys
from ..reference.darcy_solver import (
    darcy_residual,
    face_coefficients,
    gaussian_random_field,
    solve_darcy,
    threshold_field,
)

__all__ = ["Darcy"]

_N = 16
_NU_HIGH, _NU_LOW = 12.0, 3.0
_ALPHA, _TAU, _GRF_MODES = 2.0, 3.0, 64
_FIT_FRACTION = 0.2
_NUM_CONSTRAINTS = 50
_BATCH_FRACTION = 0.2
_W_PDE, _W_BOUNDARY, _W_FIT = 1e-2, 1e-2, 1.0
_SEED = 0
_SIZES = {"paper": (1000, 100, 20), "small": (1000, 5, 10), "tiny": (40, 3, 2)}  # generated, train, test


def _generate(n_generated: int, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    a = gaussian_random_field(n_generated, _N, np.random.default_rng([_SEED, 0]), alpha=_ALPHA, tau=_TAU,
                              n_modes=_GRF_MODES)  # fmt: skip
    nu = threshold_field(a, _NU_HIGH, _NU_LOW)  # [n_generated, N, N]
    high = (nu == _NU_HIGH).mean(axis=(1, 2))
    similar = np.argsort(np.abs(high - np.median(high)), kind="stable")[: n_train + n_test]
    chosen = similar[np.random.default_rng([_SEED, 1]).permutation(n_train + n_test)]
    u = solve_darcy(nu[chosen], 1.0)
    n_fit = round(_FIT_FRACTION * _N * _N)
    fit = np.argsort(np.random.default_rng([_SEED, 2]).random((n_train, _N * _N)), axis=1)[:, :n_fit]
    interior = (_N - 2) ** 2
    constraint = np.random.default_rng([_SEED, 3]).choice(n_train * interior, _NUM_CONSTRAINTS, replace=False)
    return {
        "nu_train": nu[chosen[:n_train]], "u_train": u[:n_train], "train_index": chosen[:n_train],
        "nu_test": nu[chosen[n_train:]], "u_test": u[n_train:], "test_index": chosen[n_train:],
        "high_fraction": high, "fit_points": np.sort(fit, axis=1), "constraint_points": constraint,
    }  # fmt: skip


class Darcy(Problem):
    """Physics-informed FNO training for 2D Darcy flow (see the module docstring)."""

    name = "darcy"
    prediction_kind = "field"
    defaults = ProblemDefaults(
        lrs=(5e-3, 5e-4),
        iterations_full=4_000,
        iterations_mini=1_000,
        quick_iterations=20,
        extra={
            "grid": _N,
            "nu_values": [_NU_HIGH, _NU_LOW],
            "grf": {"alpha": _ALPHA, "tau": _TAU, "modes": _GRF_MODES},
            "model": "FNO width 4, modes (16, 16), 4 layers, lifting/projection 256 (22,101 real parameters)",
            "weights": {"pde": _W_PDE, "boundary": _W_BOUNDARY, "fit": _W_FIT},
            "fit_fraction": _FIT_FRACTION,
            "batch_fraction": _BATCH_FRACTION,
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
        n_generated, self.n_train, self.n_test = _SIZES[size]
        params = {
            "version": 1, "n": _N, "n_generated": n_generated, "n_train": self.n_train, "n_test": self.n_test,
            "alpha": _ALPHA, "tau": _TAU, "grf_modes": _GRF_MODES, "nu": [_NU_HIGH, _NU_LOW], "seed": _SEED,
            "fit_fraction": _FIT_FRACTION, "m": _NUM_CONSTRAINTS, "forcing": 1.0, "faces": "harmonic",
            "selection": "closest high fraction to median",
        }  # fmt: skip
        data = cached_arrays("darcy", params, lambda: _generate(n_generated, self.n_train, self.n_test), cache_dir)
        self.data = data
        real = {"device": self.device, "dtype": self.dtype}
        index = {"device": self.device, "dtype": torch.long}
        self.nu_train = torch.as_tensor(data["nu_train"], **real)  # [I, N, N]
        self.u_train = torch.as_tensor(data["u_train"], **real)
        self.nu_test = torch.as_tensor(data["nu_test"], **real)
        self.u_test = torch.as_tensor(data["u_test"], **real)
        self.inputs_train = self._encode(self.nu_train)  # [I, 3, N, N]
        self.inputs_test = self._encode(self.nu_test)
        self.nu_x, self.nu_y = face_coefficients(self.nu_train)  # [I, N-1, N], [I, N, N-1]
        self._fit_points = torch.as_tensor(data["fit_points"], **index)  # [I, 51], flat node indices
        boundary = torch.ones(_N, _N, dtype=torch.bool, device=self.device)
        boundary[1:-1, 1:-1] = False
        self._boundary = boundary  # [N, N]
        # Constraint pairs -> (field, interior i, interior j); the model runs once per distinct field.
        pairs = torch.as_tensor(data["constraint_points"], **index)
        field, pixel = pairs // (_N - 2) ** 2, pairs % (_N - 2) ** 2
        self._c_fields, self._c_slot = torch.unique(field, return_inverse=True)
        self._c_i, self._c_j = pixel // (_N - 2), pixel % (_N - 2)
        self._pointwise: dict[str, Tensor] | None = None

    def _encode(self, nu: Tensor) -> Tensor:
        """FNO input channels ``[(ν − 7.5)/4.5, x, y]``: ``[B, 3, N, N]``."""
        grid = torch.linspace(0.0, 1.0, _N, device=nu.device, dtype=nu.dtype)
        x, y = torch.meshgrid(grid, grid, indexing="ij")
        mid, half = (_NU_HIGH + _NU_LOW) / 2, (_NU_HIGH - _NU_LOW) / 2
        return torch.stack([(nu - mid) / half, x.expand_as(nu), y.expand_as(nu)], dim=1)

    # --- model -------------------------------------------------------------------------------------------
    def make_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = FNO(3, 1, width=4, modes=(16, 16), n_layers=4, dtype=torch.float64)
        return model.to(device=self.device, dtype=self.dtype)

    @property
    def num_constraints(self) -> int:
        return _NUM_CONSTRAINTS

    # --- training terms ----------------------------------------------------------------------------------
    def terms(self, model: nn.Module, batch: Batch | None = None) -> dict[str, Tensor]:
        """The objective's parts (each a mean over its points, unweighted): pde, boundary, fit."""
        if batch is not None:
            require_keys(batch, ("fields",), self.name)
        fields = torch.arange(self.n_train, device=self.device) if batch is None else batch["fields"]
        u = model(self.inputs_train[fields]).squeeze(1)  # [B, N, N]
        r = darcy_residual(u, self.nu_x[fields], self.nu_y[fields])  # [B, N-2, N-2]
        fit = self._fit_points[fields]  # [B, 51]
        error = u.flatten(1).gather(1, fit) - self.u_train[fields].flatten(1).gather(1, fit)
        return {
            "pde": r.square().mean(),
            "boundary": u[:, self._boundary].square().mean(),
            "fit": error.square().mean(),
        }

    @staticmethod
    def _combine(terms: dict[str, Tensor]) -> Tensor:
        return _W_PDE * terms["pde"] + _W_BOUNDARY * terms["boundary"] + _W_FIT * terms["fit"]

    def objective(self, model: nn.Module, batch: Batch | None = None) -> Tensor:
        return self._combine(self.terms(model, batch))

    def constraints(self, model: nn.Module) -> Tensor:
        f = self._c_fields
        u = model(self.inputs_train[f]).squeeze(1)  # [F, N, N], F distinct constrained fields
        r = darcy_residual(u, self.nu_x[f], self.nu_y[f])  # [F, N-2, N-2]
        return r[self._c_slot, self._c_i, self._c_j]  # [m]

    def pointwise_constraints(
        self,
    ) -> tuple[Callable[[Callable[[Tensor], Tensor], dict[str, Tensor]], Tensor], dict[str, Tensor]]:
        """The constraints one (field, pixel) pair at a time: ``(residual, points)`` for per-point Jacobians
        with ``torch.func`` (:class:`sqpoptim.PointwiseConstraints`). ``residual(f, point)``, with ``f`` the model
        on one input ``[3, N, N] -> [1, N, N]``, gives the same value as :meth:`constraints` for that pair; each
        row's gradient then runs through its own field only, where the batched backward over
        :meth:`constraints` runs every row through all constrained fields (about 40× the work at paper size)."""
        if self._pointwise is None:
            fields = self._c_fields[self._c_slot]  # [m] field of each constraint
            inner = _N - 2
            select = torch.zeros(len(fields), inner * inner, device=self.device, dtype=self.dtype)
            select[torch.arange(len(fields), device=self.device), self._c_i * inner + self._c_j] = 1.0
            self._pointwise = {
                "input": self.inputs_train[fields],  # [m, 3, N, N]
                "nu_x": self.nu_x[fields],  # [m, N-1, N]
                "nu_y": self.nu_y[fields],  # [m, N, N-1]
                "select": select,  # [m, (N-2)^2], one-hot
            }

        def residual(f: Callable[[Tensor], Tensor], point: dict[str, Tensor]) -> Tensor:
            u = f(point["input"])  # [1, N, N]
            r = darcy_residual(u, point["nu_x"].unsqueeze(0), point["nu_y"].unsqueeze(0))[0]  # [N-2, N-2]
            return (r.flatten() * point["select"]).sum()  # a one-hot dot product: no data-dependent indexing

        return residual, self._pointwise

    def sample_batch(self, generator: torch.Generator) -> Batch:
        k = max(1, round(_BATCH_FRACTION * self.n_train))
        return {"fields": torch.randperm(self.n_train, generator=generator)[:k].to(self.device)}

    # --- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def metrics(self, model: nn.Module) -> dict[str, float]:
        terms = self.terms(model)
        u_test = model(self.inputs_test).squeeze(1)
        return {
            "objective": float(self._combine(terms)),
            "test_mse": float((u_test - self.u_test).square().mean()),
            "max_abs_c": float(self.constraints(model).abs().max()),
            **{f"term_{k}": float(v) for k, v in terms.items()},
        }

    @torch.no_grad()
    def prediction(self, model: nn.Module) -> dict[str, np.ndarray]:
        u_pred = model(self.inputs_test[:1]).squeeze(1)[0]
        return {
            "nu": self.data["nu_test"][0].copy(),
            "u_true": self.data["u_test"][0].copy(),
            "u_pred": u_pred.cpu().double().numpy(),
        }
