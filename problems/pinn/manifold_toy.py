r"""Outputs on a manifold: the penalty-vs-Lagrangian toy of the article "Why Neural Networks Fail on Constraints
and why Lagrangian Geometry works better".

A regression x ↦ y ∈ R² whose outputs must lie on the unit circle S¹ = {y : ‖y‖ = 1}. The article publishes
no settings (its notebook is not part of our sources), so this instance is ours; every choice is recorded in
``defaults.extra``.

Truth and data. For x ∈ [−1, 1] the noiseless target is the point of the circle at angle
θ(x) = πx + ½ sin(2πx) (increasing in x),

.. math::
    y^*(x) = (\cos θ(x), \sin θ(x)).

Observations are noisy positions *along* the manifold plus a small isotropic sensor noise:
y = (cos(θ + η), sin(θ + η)) + ε with η ~ N(0, s²), s = 0.5, and ε ~ N(0, σ² I), σ = 0.05, at 256 inputs
x ~ U[−1, 1]. Since E[(cos(θ+η), sin(θ+η))] = e^{−s²/2} y^*(x), the conditional mean — the unconstrained
least-squares target — lies *inside* the circle (‖E[y|x]‖ = e^{−1/8} ≈ 0.8825), while the least-squares
solution restricted to the circle is E[y|x]/‖E[y|x]‖ = y^*(x). So the constraint is active with a non-zero
multiplier: a penalty ρ‖c‖² leaves a violation that shrinks only like 1/ρ, which is the article's point.

Model: MLP 1-32-32-2, tanh. Objective: data MSE (mean over samples and both components). Hard constraints
(m = 16): c_j = ‖y(x_j)‖² − 1 at the fixed points x_j = −1 + (2j + 1)/16, j = 0, …, 15 (cell midpoints of
[−1, 1]). Mini-batch: 25% of the training samples. Learning rates 1e-3 and 1e-4, budget 5,000 iterations
(ours). The penalty baseline minimises f + ρ‖c‖² with ρ ∈ {1, 10², 10⁴, 10⁶}; those weights live in the runner
and are listed here in ``defaults.extra["penalty_weights"]``.

Metrics: ``objective``, ``test_mse`` against the noiseless y^* on 1,000 evenly spaced test inputs,
``max_abs_c`` at the constraint points and ``max_manifold_violation`` = max | ‖y‖ − 1 | over the test inputs
(where the 16 constraints do not reach).

Sizes: "paper" and "small" use 256 training samples, "tiny" 64.

:meth:`ManifoldToy.prediction` keys: ``x`` and ``y_true``/``y_pred`` ([len(x), 2]) on the test inputs,
``x_data``/``y_data`` (the noisy samples) and ``x_constraint``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..core.data import cached_arrays
from ..core.nets import make_mlp
from ..core.problem import Batch, Problem, ProblemDefaults, Size, batch_indices

__all__ = ["ManifoldToy", "manifold_truth"]

LAYERS = (1, 32, 32, 2)
ANGLE_NOISE, SENSOR_NOISE = 0.5, 0.05  # s and σ
DATA_SEED = 0
NUM_CONSTRAINTS = 16
NUM_TEST = 1000
BATCH_FRACTION = 0.25
SIZES = {"paper": 256, "small": 256, "tiny": 64}
PENALTY_WEIGHTS = (1.0, 1e2, 1e4, 1e6)


def _angle(x: np.ndarray | Tensor) -> np.ndarray | Tensor:
    sin = torch.sin if isinstance(x, Tensor) else np.sin
    return np.pi * x + 0.5 * sin(2 * np.pi * x)


def manifold_truth(x: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """The noiseless y^*(x) = (cos θ(x), sin θ(x)) for inputs ``x`` [N]; returns [N, 2] (numpy or torch)."""
    theta = _angle(x)
    if isinstance(x, Tensor):
        return torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1)
    return np.stack([np.cos(theta), np.sin(theta)], axis=-1)


def _generate(num_train: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(DATA_SEED)
    x = rng.uniform(-1.0, 1.0, size=num_train)
    theta = _angle(x) + ANGLE_NOISE * rng.standard_normal(num_train)
    y = np.stack([np.cos(theta), np.sin(theta)], axis=-1) + SENSOR_NOISE * rng.standard_normal((num_train, 2))
    x_test = np.linspace(-1.0, 1.0, NUM_TEST)
    return {
        "x": x,
        "y": y,
        "x_constraint": -1.0 + (2 * np.arange(NUM_CONSTRAINTS) + 1) / NUM_CONSTRAINTS,
        "x_test": x_test,
        "y_test": manifold_truth(x_test),
    }


class ManifoldToy(Problem):
    """Noisy regression onto the unit circle with ‖y‖² = 1 imposed at 16 points (see the module docstring)."""

    name = "manifold_toy"
    prediction_kind = "manifold"
    defaults = ProblemDefaults(
        lrs=(1e-3, 1e-4),
        iterations_full=5_000,
        iterations_mini=5_000,
        quick_iterations=2_000,
        extra={
            "truth": "y* = (cos θ, sin θ), θ(x) = πx + sin(2πx)/2, x ∈ [-1, 1]",
            "noise": {"angle_std": ANGLE_NOISE, "sensor_std": SENSOR_NOISE},
            "layers": LAYERS,
            "constraints": "||y(x_j)||^2 - 1 at x_j = -1 + (2j+1)/16, j = 0..15",
            "train_samples": SIZES,
            "batch_fraction": BATCH_FRACTION,
            "penalty_weights": PENALTY_WEIGHTS,
            "data_seed": DATA_SEED,
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
            "num_train": SIZES[size],
            "angle_noise": ANGLE_NOISE,
            "sensor_noise": SENSOR_NOISE,
            "seed": DATA_SEED,
            "num_constraints": NUM_CONSTRAINTS,
            "num_test": NUM_TEST,
            "truth": "pi*x + 0.5*sin(2*pi*x)",
        }
        data = cached_arrays("manifold_toy", params, lambda: _generate(SIZES[size]), cache_dir)
        as_tensor = lambda a: torch.as_tensor(a, device=self.device, dtype=self.dtype)  # noqa: E731
        self.x = as_tensor(data["x"])[:, None]  # [N, 1]
        self.y = as_tensor(data["y"])  # [N, 2]
        self.x_constraint = as_tensor(data["x_constraint"])[:, None]  # [16, 1]
        self.x_test = as_tensor(data["x_test"])[:, None]  # [1000, 1]
        self.y_test = as_tensor(data["y_test"])  # [1000, 2]

    # --- model -------------------------------------------------------------------------------------------
    def make_model(self, seed: int) -> nn.Module:
        return make_mlp(LAYERS, seed, device=self.device, dtype=self.dtype)

    # --- training terms ----------------------------------------------------------------------------------
    def objective(self, model: nn.Module, batch: Batch | None = None) -> Tensor:
        if batch is None:
            return torch.mean((model(self.x) - self.y) ** 2)
        idx = batch_indices(batch, "data", self.x.shape[0], self.name, self.device)
        return torch.mean((model(self.x[idx]) - self.y[idx]) ** 2)

    def constraints(self, model: nn.Module) -> Tensor:
        return model(self.x_constraint).pow(2).sum(dim=-1) - 1.0  # [16]

    @property
    def num_constraints(self) -> int:
        return NUM_CONSTRAINTS

    def sample_batch(self, generator: torch.Generator) -> Batch:
        n = self.x.shape[0]
        return {"data": torch.randperm(n, generator=generator)[: round(BATCH_FRACTION * n)]}

    # --- evaluation --------------------------------------------------------------------------------------
    def metrics(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            y_test = model(self.x_test)  # [1000, 2]
            return {
                "objective": float(self.objective(model)),
                "test_mse": float(torch.mean((y_test - self.y_test) ** 2)),
                "max_abs_c": float(self.constraints(model).abs().max()),
                "max_manifold_violation": float((y_test.norm(dim=-1) - 1.0).abs().max()),
            }

    def prediction(self, model: nn.Module) -> dict[str, np.ndarray]:
        with torch.no_grad():
            y_pred = model(self.x_test)
        numpy = lambda a: a.detach().cpu().double().numpy()  # noqa: E731
        return {
            "x": numpy(self.x_test).ravel(),
            "y_true": numpy(self.y_test),
            "y_pred": numpy(y_pred),
            "x_data": numpy(self.x).ravel(),
            "y_data": numpy(self.y),
            "x_constraint": numpy(self.x_constraint).ravel(),
        }
