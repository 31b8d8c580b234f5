r"""Supervised regression with constraints on the outputs: what KKT-Hardnet's tasks E1–E4 share.

A task is data :math:`(x_i, y_i)` split into training and validation sets, a ReLU MLP, the MSE objective and an
:class:`~sqpoptim.layers.OutputConstraints` set :math:`\{y : h(x, y) = 0,\ g(x, y) \le 0\}` (KKT-Hardnet's
convention ``g <= 0``; two-sided bounds are allowed). Subclasses give the data generator, the constraints and
the settings; this module gives the :class:`~problems.output_tasks.task.LayerProblem` interface on top.

Metrics (Iftakher et al., Sec. 3, Eq. 27), on the training and the validation set:

.. math::
    \mathrm{MSE} = \frac{1}{Np}\sum_{i,j} (\hat y_{ij} - y_{ij})^2, \qquad
    \mathrm{Violation} = \frac{1}{Nm}\sum_i \Big(\sum_{k} |h_k(x_i, \hat y_i)|
        + \sum_{\ell} \mathrm{ReLU}\big(g_\ell(x_i, \hat y_i)\big)\Big),

:math:`m` the number of equality plus inequality rows (for two-sided bounds the distance of :math:`g` to its
interval). The paper reports its held-out set as "validation"; there is no third set, so ``test_mse`` and the
``test_*`` violations are the validation set's (``val_mse`` is the same number under the paper's name).

Keys of :meth:`OutputRegression.metrics`: ``objective`` (full-batch training MSE), ``train_mse``, ``val_mse``,
``test_mse``, ``train_violation``/``val_violation`` (Eq. 27), ``test_mean_violation`` (= ``val_violation``),
``test_max_violation`` (largest violation of any row on the validation set) and ``max_abs_c`` (max
:math:`|h|` at the constraint inputs; for a task without equalities the largest inequality violation there).

Training-time methods impose :math:`h = 0` at the first ``k`` training inputs (the data are i.i.d., so these
are a random subset); a task without equalities returns an empty ``c`` (there is nothing for them to impose).

Mini-batch: ``batch_size`` training points drawn without replacement. Soft-constraint weight: the class
attribute ``soft_rho`` (the paper's PINN weight ω), the default of the runner's ``soft`` method.

:meth:`OutputRegression.prediction` keys: ``t`` (the validation inputs' first coordinate, sorted, for 1-D inputs;
otherwise the rank of the first true output), ``u_true``/``u_pred`` ([N_val, p], in that order) and ``x_val``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from sqpoptim.layers import OutputConstraints

from ..core.data import cached_arrays
from ..core.nets import relu_mlp
from ..core.problem import Batch, Size, batch_indices
from .task import LayerProblem

__all__ = ["OutputRegression", "mean_violation"]


def mean_violation(oc: OutputConstraints, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 27's per-sample mean absolute violation ``[B]`` (mean over the rows) and the largest row, ``[B]``."""
    ev = oc.evaluate(x, y, jacobian=False)
    lower, upper = oc.bounds(x, ev.g) if ev.g is not None else (None, None)
    r = oc.residual(ev, lower, upper).abs()  # [B, m + q], zero where an inequality holds
    return r.mean(-1), r.amax(-1)


class OutputRegression(LayerProblem):
    """Fit ``(x, y)`` data with a ReLU MLP under output constraints (see the module docstring).

    Subclasses set ``name``, ``defaults``, ``layers``, ``sizes`` (size -> (n_train, n_val)),
    ``constraint_points`` (size -> k), ``batch_size``, ``soft_rho`` and implement :meth:`generate` and
    :meth:`make_constraints`.
    """

    layers: ClassVar[tuple[int, ...]]
    sizes: ClassVar[Mapping[str, tuple[int, int]]]
    constraint_points: ClassVar[Mapping[str, int]]
    batch_size: ClassVar[int] = 64
    soft_rho: ClassVar[float] = 1.0

    def __init__(
        self,
        size: Size = "paper",
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(size, device=device, dtype=dtype, cache_dir=cache_dir)
        n_train, n_val = self.sizes[size]
        params = {"n_train": n_train, "n_val": n_val, **self.data_params()}
        data = cached_arrays(self.name, params, self._generate, cache_dir)
        as_tensor = lambda a: torch.as_tensor(a, device=self.device, dtype=self.dtype)  # noqa: E731
        self.x_train, self.y_train = as_tensor(data["x_train"]), as_tensor(data["y_train"])  # [N, d], [N, p]
        self.x_val, self.y_val = as_tensor(data["x_val"]), as_tensor(data["y_val"])  # [N_val, d], [N_val, p]
        self._constraints = self.make_constraints()
        self._k = min(self.constraint_points[size], n_train)

    def _generate(self) -> dict[str, np.ndarray]:
        n_train, n_val = self.sizes[self.size]
        x, y = self.generate(n_train + n_val)
        return {"x_train": x[:n_train], "y_train": y[:n_train], "x_val": x[n_train:], "y_val": y[n_train:]}

    # --- what subclasses give ----------------------------------------------------------------------------
    @abc.abstractmethod
    def generate(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` i.i.d. data points ``(x [n, d], y [n, p])`` in float64 from a fixed seed; the first ones of a
        larger ``n`` are the same points (so smaller sizes are prefixes)."""

    @abc.abstractmethod
    def make_constraints(self) -> OutputConstraints:
        """The output constraints (built once)."""

    def data_params(self) -> dict[str, object]:
        """Every further setting the data depend on (keys the cache)."""
        return {}

    # --- LayerProblem ------------------------------------------------------------------------------------
    def make_model(self, seed: int) -> nn.Module:
        return relu_mlp(self.layers, seed, device=self.device, dtype=self.dtype)

    def _indices(self, batch: Batch | None) -> Tensor | None:
        if batch is None:
            return None
        return batch_indices(batch, "train", self.x_train.shape[0], self.name, self.device)

    def inputs(self, batch: Batch | None = None) -> Tensor:
        idx = self._indices(batch)
        return self.x_train if idx is None else self.x_train[idx]

    def output_loss(self, x: Tensor, y: Tensor, batch: Batch | None = None) -> Tensor:
        idx = self._indices(batch)
        target = self.y_train if idx is None else self.y_train[idx]
        if y.shape != target.shape:
            raise ValueError(f"{self.name}: outputs of shape {list(y.shape)} for targets {list(target.shape)}")
        return (y - target).square().mean()

    def output_constraints(self) -> OutputConstraints:
        return self._constraints

    def constraint_inputs(self) -> Tensor:
        return self.x_train[: self._k]  # [k, d]

    def constraints(self, model: nn.Module) -> Tensor:
        if not self._constraints.has_equalities:
            return self.x_train.new_zeros(0)
        return super().constraints(model)

    @property
    def num_constraints(self) -> int:
        if not self._constraints.has_equalities:
            return 0
        return self._k * self._constraints.h(self.x_train[:1], self.y_train[:1]).shape[-1]

    def sample_batch(self, generator: torch.Generator) -> Batch:
        n = self.x_train.shape[0]
        return {"train": torch.randperm(n, generator=generator)[: min(self.batch_size, n)]}

    # --- evaluation --------------------------------------------------------------------------------------
    def metrics(self, model: nn.Module) -> dict[str, float]:
        oc = self._constraints
        with torch.no_grad():
            y_train, y_val = model(self.x_train), model(self.x_val)
            # Violations of the returned outputs are evaluated in float64 (exact for float32 outputs too).
            x_train, x_val, y64 = self.x_train.double(), self.x_val.double(), y_train.double()
            train_mean, _ = mean_violation(oc, x_train, y64)
            val_mean, val_max = mean_violation(oc, x_val, y_val.double())
            xc = x_train[: self._k]
            if oc.has_equalities:
                max_abs_c = oc.h(xc, y64[: self._k]).abs().max()
            else:
                max_abs_c = oc.violation(xc, y64[: self._k]).max()
            train_mse = (y_train - self.y_train).square().mean()
            val_mse = (y_val - self.y_val).square().mean()
        return {
            "objective": float(train_mse),
            "train_mse": float(train_mse),
            "val_mse": float(val_mse),
            "test_mse": float(val_mse),
            "train_violation": float(train_mean.mean()),
            "val_violation": float(val_mean.mean()),
            "test_mean_violation": float(val_mean.mean()),
            "test_max_violation": float(val_max.max()),
            "max_abs_c": float(max_abs_c),
        }

    def prediction(self, model: nn.Module) -> dict[str, np.ndarray]:
        with torch.no_grad():
            y_pred = model(self.x_val)
        numpy = lambda a: a.detach().cpu().double().numpy()  # noqa: E731
        x, y, yp = numpy(self.x_val), numpy(self.y_val), numpy(y_pred)
        if x.shape[1] == 1:
            order, t = np.argsort(x[:, 0]), np.sort(x[:, 0])
        else:
            order = np.argsort(y[:, 0])
            t = np.arange(len(order), dtype=np.float64)
        return {"t": t, "u_true": y[order], "u_pred": yp[order], "x_val": x[order]}
