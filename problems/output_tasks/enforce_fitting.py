r"""C1: ENFORCE's illustrative function fitting (Lastrucci & Schweidtmann, "ENFORCE: Nonlinear Constrained Learning
with Adaptive-depth Neural Projection", Sec. 5.1, Table 1, App. C.1).

Fit the vector-valued function of :math:`x \in [-2, 2]`

.. math::
    y_1 = 2 \sin(\omega x), \qquad y_2 = -\sin^2(\omega x) - x^2, \qquad \omega = 5,

whose components are tied by the nonlinear equality (in both input and output)

.. math::
    h(x, y) = (0.5\, y_1)^2 + x^2 + y_2 = 0 .

* Data: 100 training inputs and 100,000 test inputs, each drawn uniformly from [−2, 2] (one seeded numpy
  stream, training points first); targets from the formulas above.
* Model: MLP 1-64-2 with ReLU (258 parameters; PyTorch's default initialisation).
* Task loss: :math:`\frac1N\sum_i \|y_i - \hat y_i\|^2` (the paper's MSE: squared norm over the two outputs,
  mean over samples); full batch in the paper. Adam, lr 1e-3, 50,000 epochs (= full-batch iterations),
  5 initialisation seeds. ENFORCE: λ_D = 0.5, λ_C = 0, AdaNP tolerances 1e-4 (training, batch mean) and 1e-6
  (inference, batch max), depth ≤ 100; the activation rule (App. D.2) uses the batch MSE as loss measure.
  Soft: constraint weight 1 (the paper's best).
* Training-time constraints (SQP methods): :math:`h = 0` at the first 25 training inputs (m = 25, about a
  tenth of the 258 parameters, so the equalities leave most of the network's freedom to the fit).
* Mini-batch runs (not in the paper, which trains full batch) draw 50 of the 100 training points.

Metrics (:meth:`EnforceFitting.metrics`), all on the test inputs unless stated:

* ``mape`` [%]: :math:`\frac{100}{N}\sum_i \|y_i - \tilde y_i\| / \|y_i\|`. The paper's formula divides by
  :math:`y^*_i` without saying how a 2-vector is divided; per component, MAPE diverges (y₁ crosses zero at
  every multiple of π/5), so we read it as the ratio of Euclidean norms (‖y‖ vanishes only at x = 0).
  It is dominated by the few test inputs near x = 0 (‖y‖ ≈ 10|x|), so it is also reported as
  ``wape`` [%] = :math:`100 \sum_{i,k} |y_{ik} - \tilde y_{ik}| / \sum_{i,k} |y_{ik}|`, which is not.
* ``r2``: coefficient of determination, averaged over the two outputs (unambiguous: compare this first).
* ``max_violation_pct`` / ``mean_violation_pct``: :math:`100\,|h(x, \tilde y)| / S`, with S the absolute
  maximum of the variables (x, y₁, y₂) over the test range (App. C.1: "we normalized the residuals by scaling
  them with respect to the absolute maximum value of the variables within the considered range"; here
  S = max |y₂| ≈ 4.30, at x = ±2). ``test_max_violation``/``test_mean_violation`` are the raw |h|.
* ``time_per_batch_ms``: forward pass (projection included) on a batch of 1,000 test inputs, fastest of 3.
* ``objective``: the training loss on all 100 points; ``test_mse`` the same loss on the test inputs;
  ``max_abs_c``: max |h| at the 25 constraint inputs.
* For a backbone-plus-layer model also ``raw_mape`` and ``raw_test_max_violation`` (the backbone alone).

Sizes: ``"paper"`` 100,000 test points; ``"small"`` the first 10,000; ``"tiny"`` the first 1,000 (the
training set is the paper's at every size).

:meth:`EnforceFitting.prediction` keys: ``t`` (2,000 test inputs, sorted), ``u_true``/``u_pred`` ([2000, 2]),
``t_fit``/``u_fit`` (training data), ``t_constraint`` (the constraint inputs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sqpoptim.layers import OutputConstraints

from ..core.data import cached_arrays
from ..core.nets import num_parameters, relu_mlp
from ..core.problem import Batch, ProblemDefaults, Size, batch_indices
from .task import LayerProblem, backbone_output, forward_seconds

__all__ = ["EnforceFitting", "fitting_constraint", "fitting_targets"]

OMEGA = 5.0
DOMAIN = (-2.0, 2.0)
LAYERS = (1, 64, 2)
NUM_PARAMETERS = 258
NUM_TRAIN = 100
NUM_TEST = {"paper": 100_000, "small": 10_000, "tiny": 1_000}
NUM_CONSTRAINT_POINTS = 25
MINI_BATCH = 50
TIMING_BATCH = 1_000
DATA_SEED = 20250101


def fitting_targets(x: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """``[N, 2]`` targets (y₁, y₂) at inputs ``x`` (``[N]`` or ``[N, 1]``; numpy or torch)."""
    if isinstance(x, Tensor):
        s = torch.sin(OMEGA * x.reshape(-1))
        return torch.stack([2 * s, -(s**2) - x.reshape(-1) ** 2], dim=-1)
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    s = np.sin(OMEGA * x)
    return np.stack([2 * s, -(s**2) - x**2], axis=-1)


def fitting_constraint(x: Tensor, y: Tensor) -> Tensor:
    """:math:`h(x, y) = (0.5 y_1)^2 + x^2 + y_2`, ``x [B, 1]``, ``y [B, 2]`` → ``[B, 1]`` (batched, torch.func
    compatible; follows ``y``'s dtype)."""
    x = x.to(y.dtype)
    return (0.5 * y[:, :1]) ** 2 + x**2 + y[:, 1:]


def _constraint_and_jacobian(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(h [B, 1], J [B, 1, 2])`` with :math:`J = [0.5 y_1,\ 1]` (cheaper than a per-sample ``jacrev``)."""
    jac = torch.stack([0.5 * y[:, 0], torch.ones_like(y[:, 0])], dim=-1)[:, None, :]
    return fitting_constraint(x, y), jac


def _lagrangian_hessian(x: Tensor, y: Tensor, w_h: Tensor, w_g: Tensor | None) -> Tensor:
    r""":math:`w\,\nabla^2_{yy} h = \mathrm{diag}(0.5 w, 0)`, ``[B, 2, 2]``."""
    hess = y.new_zeros(y.shape[0], 2, 2)
    hess[:, 0, 0] = 0.5 * w_h[:, 0]
    return hess


def _generate() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(DATA_SEED)
    x_train = rng.uniform(*DOMAIN, size=NUM_TRAIN)
    x_test = rng.uniform(*DOMAIN, size=NUM_TEST["paper"])
    return {
        "x_train": x_train,
        "y_train": fitting_targets(x_train),
        "x_test": x_test,
        "y_test": fitting_targets(x_test),
    }


class EnforceFitting(LayerProblem):
    """C1: fit (2 sin 5x, −sin² 5x − x²) under (0.5 y₁)² + x² + y₂ = 0 (see the module docstring)."""

    name = "enforce_fitting"
    defaults = ProblemDefaults(
        lrs=(1e-3,),
        iterations_full=50_000,
        iterations_mini=50_000,
        quick_iterations=3_000,
        extra={
            "function": "y1 = 2 sin(5x), y2 = -sin^2(5x) - x^2, x ~ U[-2, 2]",
            "constraint": "(0.5 y1)^2 + x^2 + y2 = 0",
            "layers": LAYERS,
            "activation": "relu",
            "train_points": NUM_TRAIN,
            "constraint_points": f"first {NUM_CONSTRAINT_POINTS} training inputs",
            "mini_batch": f"{MINI_BATCH} of the {NUM_TRAIN} training points",
            "loss": "mean over samples of ||y - y_pred||^2",
            "data_seed": DATA_SEED,
        },
    )
    #: Weight of mean ‖h‖ in ENFORCE's activation-rule loss measure (App. D.2: the MSE alone for regression).
    activation_penalty = 0.0

    def __init__(
        self,
        size: Size = "paper",
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(size, device=device, dtype=dtype, cache_dir=cache_dir)
        params = {"omega": OMEGA, "domain": DOMAIN, "train": NUM_TRAIN, "test": NUM_TEST["paper"], "seed": DATA_SEED}
        data = cached_arrays("enforce_fitting", params, _generate, cache_dir)
        as_tensor = lambda a: torch.as_tensor(a, device=self.device, dtype=self.dtype)  # noqa: E731
        n_test = NUM_TEST[size]
        self.x_train = as_tensor(data["x_train"])[:, None]  # [100, 1]
        self.y_train = as_tensor(data["y_train"])  # [100, 2]
        self.x_test = as_tensor(data["x_test"][:n_test])[:, None]  # [N_test, 1]
        self.y_test = as_tensor(data["y_test"][:n_test])  # [N_test, 2]
        # S of the violation percentage: the largest |x|, |y1|, |y2| over the test range.
        self.violation_scale = float(np.abs(np.concatenate([data["x_test"][:, None], data["y_test"]], 1)).max())
        self._constraints = OutputConstraints(
            h=fitting_constraint, h_jac=_constraint_and_jacobian, lagrangian_hessian=_lagrangian_hessian
        )

    # --- model -------------------------------------------------------------------------------------------
    def make_model(self, seed: int) -> nn.Module:
        model = relu_mlp(LAYERS, seed, device=self.device, dtype=self.dtype)
        assert num_parameters(model) == NUM_PARAMETERS, num_parameters(model)
        return model

    # --- LayerProblem ------------------------------------------------------------------------------------
    def _index(self, batch: Batch | None) -> Tensor | None:
        return None if batch is None else batch_indices(batch, "train", NUM_TRAIN, self.name, self.device)

    def inputs(self, batch: Batch | None = None) -> Tensor:
        idx = self._index(batch)
        return self.x_train if idx is None else self.x_train[idx]

    def output_loss(self, x: Tensor, y: Tensor, batch: Batch | None = None) -> Tensor:
        idx = self._index(batch)
        target = self.y_train if idx is None else self.y_train[idx]
        if target.shape != y.shape:
            raise ValueError(f"{self.name}: outputs of shape {list(y.shape)} for targets {list(target.shape)}")
        return (y - target).square().sum(-1).mean()

    def output_constraints(self) -> OutputConstraints:
        return self._constraints

    def constraint_inputs(self) -> Tensor:
        return self.x_train[:NUM_CONSTRAINT_POINTS]  # [25, 1]

    @property
    def num_constraints(self) -> int:
        return NUM_CONSTRAINT_POINTS

    def sample_batch(self, generator: torch.Generator) -> Batch:
        return {"train": torch.randperm(NUM_TRAIN, generator=generator)[:MINI_BATCH]}

    # --- evaluation --------------------------------------------------------------------------------------
    def _accuracy(self, y: Tensor) -> tuple[float, float, float]:
        """(MAPE [%], WAPE [%], R²) of test outputs ``y`` against the targets."""
        target = self.y_test.double()
        err = y.double() - target  # [N_test, 2]
        mape = 100.0 * (err.norm(dim=-1) / target.norm(dim=-1)).mean()
        wape = 100.0 * err.abs().sum() / target.abs().sum()
        r2 = (1.0 - err.square().sum(0) / (target - target.mean(0)).square().sum(0)).mean()
        return float(mape), float(wape), float(r2)

    def metrics(self, model: nn.Module) -> dict[str, float]:
        h = self._constraints.h
        _, seconds = forward_seconds(model, self.x_test[:TIMING_BATCH])
        with torch.no_grad():
            objective = self.objective(model)
            c = self.constraints(model)
            y = model(self.x_test)  # [N_test, 2]
            viol = h(self.x_test.double(), y.double()).abs().squeeze(-1)  # [N_test], evaluated without rounding
        mape, wape, r2 = self._accuracy(y)
        out = {
            "objective": float(objective),
            "test_mse": float((y - self.y_test).square().sum(-1).mean()),
            "max_abs_c": float(c.abs().max()),
            "mape": mape,
            "wape": wape,
            "r2": r2,
            "test_max_violation": float(viol.max()),
            "test_mean_violation": float(viol.mean()),
            "max_violation_pct": 100.0 * float(viol.max()) / self.violation_scale,
            "mean_violation_pct": 100.0 * float(viol.mean()) / self.violation_scale,
            "time_per_batch_ms": 1e3 * seconds,
        }
        raw = backbone_output(model, self.x_test)
        if raw is not None:
            out["raw_mape"], out["raw_wape"], out["raw_r2"] = self._accuracy(raw)
            out["raw_test_max_violation"] = float(h(self.x_test.double(), raw.double()).abs().max())
        return out

    def prediction(self, model: nn.Module) -> dict[str, np.ndarray]:
        order = torch.argsort(self.x_test.squeeze(-1))
        pick = order[torch.linspace(0, len(order) - 1, min(2000, len(order)), device=order.device).long()]
        with torch.no_grad():
            y = model(self.x_test[pick])
        numpy = lambda a: a.detach().cpu().double().numpy()  # noqa: E731
        return {
            "t": numpy(self.x_test[pick]).ravel(),
            "u_true": numpy(self.y_test[pick]),
            "u_pred": numpy(y),
            "t_fit": numpy(self.x_train).ravel(),
            "u_fit": numpy(self.y_train),
            "t_constraint": numpy(self.constraint_inputs()).ravel(),
        }
