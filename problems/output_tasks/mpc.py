r"""HardNet++'s learned MPC (Goertzen, Alim & Azizan, "HardNet++: Nonlinear Constraint Enforcement in Neural Networks",
arXiv:2604.19669, Sec. V, Table I).

A network maps an initial state :math:`x_0 = x_{\text{in}} \in \mathbb{R}^5` to a whole trajectory
:math:`y = (u_0, x_1, u_1, x_2, \dots, u_{N-1}, x_N) \in \mathbb{R}^{N(n_u + n_x)} = \mathbb{R}^{90}` (step k's
block is :math:`[u_{k-1}, x_k]`) of

.. math::
    \min_{x, u}\ Z = \sum_{k=1}^{N} \|x_k - x_{\text{target}}\|^2 + \|u_{k-1}\|^2 \quad\text{s.t.}\quad
    x_{k+1} = A x_k + B u_k,\ \ |u_k| \le 1,\ \ x_k^\top Q x_k \le 10,\ \ x_0 = x_{\text{in}},

:math:`n_x = 5`, :math:`n_u = 4`, :math:`N = 10`, :math:`A = I_5`, :math:`B = [I_4; e_4^\top]`,
:math:`Q = \mathrm{blkdiag}([[0.05, 0.025], [0.025, 0.1]], 0.1 I_3)`, :math:`x_{\text{target}} = [3, 12, 10, 10,
10]` (outside the ellipsoid). Output constraints: :math:`h` = the 50 dynamics rows
:math:`x_k - A x_{k-1} - B u_{k-1}`; :math:`g` = the 40 controls in :math:`[-1, 1]` and the 10 values
:math:`x_k^\top Q x_k \le 10` (their Jacobians and the Lagrangian Hessian are supplied in closed form).
Self-supervised: the loss is the batch mean of :math:`Z` of the (projected) output.

Data: initial states uniform in the ellipsoid :math:`\{x : x^\top Q x \le 10\}` (a uniform direction and radius
:math:`U^{1/5}` in the unit ball, mapped by :math:`\sqrt{10}\,L^{-\top}`, :math:`Q = LL^\top`); each is a
feasible initial condition and the QCQP is then feasible (:math:`u = 0` keeps :math:`x_k = x_0`). Seeds 50,
51, 52 for the training, validation and test states (``numpy.random.SeedSequence(seed).spawn(2)``: one stream
for the directions, one for the radii); smaller sizes are prefixes. The reference
(:mod:`problems.reference.mpc_solver`: SLSQP polished by Newton on the active set, KKT residuals ~1e-14) is solved
for every validation and test state and cached with the data.

Metrics (Table I, on the test states): suboptimality :math:`S = \max(0, Z(\bar y) - Z^\star)/Z^\star` with
:math:`Z` evaluated on the output's own states and controls (mean and max over the instances); the absolute
violation of every dynamics row, every box row (:math:`\mathrm{ReLU}(|u| - 1)`) and every quadratic row
(:math:`\mathrm{ReLU}(x^\top Q x - 10)`), mean and max over rows and instances. Paper Table I (HardNet++):
suboptimality 5.6e-3 / 0.016, dynamics 3.8e-5 / 3.6e-3, box 4.6e-5 / 4.1e-3, quadratic 5.7e-9 / 9.5e-7.

Keys of :meth:`LearnedMPC.metrics`: ``objective`` (mean Z over the training states), ``test_subopt_mean``,
``test_subopt_max``, ``test_dyn_viol_mean``/``_max``, ``test_box_viol_mean``/``_max``,
``test_quad_viol_mean``/``_max``, ``test_mean_violation``/``test_max_violation`` (all rows),
``test_mse`` (to the optimal trajectories), ``val_subopt_mean`` and ``max_abs_c`` (max |dynamics| at the
constraint inputs). :meth:`LearnedMPC.prediction` keys: ``t`` (1..N), ``u_true``/``u_pred`` ([N, 9]: the
optimal and predicted step blocks of the first test state).

Notes and deviations
--------------------
* The paper sums :math:`\|u_k\|^2` for k = 1..N but its dynamics use :math:`u_0..u_{N-1}`; the N controls that
  exist are :math:`u_0..u_{N-1}` and the cost sums those (a :math:`u_N` would not enter the dynamics and be 0
  at the optimum).
* The paper does not give the activation, learning rate, batch size or budget: ReLU, Adam lr 1e-3, 16 states
  per mini-batch (small because one HardNet++ step of 500 iterations on 16 states already costs seconds on a
  CPU); the budgets below are ours. Its reference is CVXPY; ours is scipy with the KKT check.
* Training-time methods impose the dynamics at the first 10 training states (m = 500; "small" 4, "tiny" 2);
  the inequalities only the layers handle.
* Sizes: "paper" 800/100/100, "small" 200/50/50, "tiny" 8/4/4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sqpoptim.layers import OutputConstraints

from ..core.data import cached_arrays
from ..core.nets import relu_mlp
from ..core.problem import Batch, ProblemDefaults, Size, batch_indices
from ..reference.mpc_solver import MPCData, solve_mpc
from .task import LayerProblem

__all__ = ["HORIZON", "X_TARGET", "A", "B", "LearnedMPC", "Q", "mpc_cost", "mpc_data", "sample_initial_states"]

NX, NU, HORIZON = 5, 4, 10
STEP = NU + NX
A = np.eye(NX)
B = np.vstack([np.eye(NU), np.eye(NU)[-1:]])
Q = np.diag([0.0, 0.0, 0.1, 0.1, 0.1])
Q[:2, :2] = [[0.05, 0.025], [0.025, 0.1]]
X_TARGET = np.array([3.0, 12.0, 10.0, 10.0, 10.0])
U_BOUND, X_BOUND = 1.0, 10.0
LAYERS = (NX, 200, 200, HORIZON * STEP)
_SIZES = {"paper": (800, 100, 100), "small": (200, 50, 50), "tiny": (8, 4, 4)}
_CONSTRAINT_STATES = {"paper": 10, "small": 4, "tiny": 2}
_SEEDS = {"train": 50, "val": 51, "test": 52}


def mpc_data() -> MPCData:
    return MPCData(A, B, Q, X_TARGET, HORIZON, U_BOUND, X_BOUND)


def sample_initial_states(n: int, seed: int) -> np.ndarray:
    """``n`` states ``[n, 5]`` uniform in the ellipsoid ``xᵀQx <= 10`` (module docstring)."""
    # Directions and radii from two child streams, so that a smaller n gives a prefix of a larger one.
    directions, radii = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    z = directions.standard_normal((n, NX))
    z *= (radii.random((n, 1)) ** (1 / NX)) / np.linalg.norm(z, axis=1, keepdims=True)
    L = np.linalg.cholesky(Q)
    return np.sqrt(X_BOUND) * np.linalg.solve(L.T, z.T).T


def _generate(sizes: tuple[int, int, int]) -> dict[str, np.ndarray]:
    data = mpc_data()
    out: dict[str, np.ndarray] = {}
    for split, n in zip(("train", "val", "test"), sizes):
        x0 = sample_initial_states(n, _SEEDS[split])
        out[f"x0_{split}"] = x0
        if split == "train":
            continue  # the loss is self-supervised: no reference needed for training
        sols = [solve_mpc(data, x) for x in x0]
        u = np.stack([s[0] for s in sols])  # [n, N nu]
        X = np.stack([data.states(x, ui) for x, ui in zip(x0, u)])  # [n, N nx]
        traj = np.concatenate([u.reshape(n, HORIZON, NU), X.reshape(n, HORIZON, NX)], axis=-1)
        out[f"y_{split}"] = traj.reshape(n, HORIZON * STEP)
        out[f"z_{split}"] = np.array([data.cost(x, ui) for x, ui in zip(x0, u)])
        out[f"kkt_{split}"] = np.array([[s[1][k] for k in ("stationarity", "primal", "complementarity")] for s in sols])
    return out


def _split(y: Tensor) -> tuple[Tensor, Tensor]:
    steps = y.reshape(y.shape[0], HORIZON, STEP)
    return steps[..., :NU], steps[..., NU:]  # [B, N, nu], [B, N, nx]


class _Constraints:
    """The MPC constraints with closed-form Jacobians and Hessian, built for one device/dtype at a time."""

    def __init__(self) -> None:
        n = HORIZON * STEP
        Jh = np.zeros((HORIZON * NX, n))  # d h / d y: rows x_k - A x_{k-1} - B u_{k-1}
        Jg = np.zeros((HORIZON * (NU + 1), n))  # rows u (box) then q_k
        sel = np.zeros((HORIZON, n, NX))  # sel[k] maps x_k into y
        for k in range(HORIZON):
            u_cols, x_cols = slice(k * STEP, k * STEP + NU), slice(k * STEP + NU, (k + 1) * STEP)
            rows = slice(k * NX, (k + 1) * NX)
            Jh[rows, x_cols] = np.eye(NX)
            Jh[rows, u_cols] = -B
            if k > 0:
                Jh[rows, (k - 1) * STEP + NU : k * STEP] = -A
            Jg[k * NU : (k + 1) * NU, u_cols] = np.eye(NU)
            sel[k, x_cols] = np.eye(NX)
        self._np = {"Jh": Jh, "Jg": Jg, "sel": sel, "A": A, "B": B, "Q": Q}
        self._cache: dict[tuple, dict[str, Tensor]] = {}

    def t(self, ref: Tensor) -> dict[str, Tensor]:
        key = (ref.device, ref.dtype)
        if key not in self._cache:
            self._cache[key] = {k: torch.as_tensor(v, device=ref.device, dtype=ref.dtype) for k, v in self._np.items()}
        return self._cache[key]

    def h(self, x0: Tensor, y: Tensor) -> Tensor:
        c = self.t(y)
        u, x = _split(y)
        prev = torch.cat([x0.unsqueeze(1), x[:, :-1]], dim=1)  # [B, N, nx]
        return (x - prev @ c["A"].T - u @ c["B"].T).reshape(y.shape[0], -1)  # [B, 50]

    def g(self, x0: Tensor, y: Tensor) -> Tensor:
        u, x = _split(y)
        q = torch.einsum("bki,ij,bkj->bk", x, self.t(y)["Q"], x)  # [B, N]
        return torch.cat([u.reshape(y.shape[0], -1), q], dim=-1)  # [B, 50]

    def h_jac(self, x0: Tensor, y: Tensor) -> Tensor:
        return self.t(y)["Jh"].expand(y.shape[0], -1, -1)  # [B, 50, 90]

    def g_jac(self, x0: Tensor, y: Tensor) -> Tensor:
        c = self.t(y)
        _, x = _split(y)
        quad = 2 * torch.einsum("bki,ij,knj->bkn", x, c["Q"], c["sel"])  # [B, N, 90]: 2 Q x_k at x_k's columns
        return torch.cat([c["Jg"][: HORIZON * NU].expand(y.shape[0], -1, -1), quad], dim=1)  # [B, 50, 90]

    def lagrangian_hessian(self, x0: Tensor, y: Tensor, w_h: Tensor | None, w_g: Tensor | None) -> Tensor:
        c = self.t(y)
        if w_g is None:
            return y.new_zeros(y.shape[0], y.shape[1], y.shape[1])
        blocks = 2 * torch.einsum("kni,ij,kmj->knm", c["sel"], c["Q"], c["sel"])  # [N, 90, 90]
        return torch.einsum("bk,knm->bnm", w_g[:, HORIZON * NU :], blocks)  # [B, 90, 90]

    def output_constraints(self) -> OutputConstraints:
        # Tensors of the bounds are cast to g's dtype and device by OutputConstraints.bounds.
        lower = torch.tensor([-U_BOUND] * (HORIZON * NU) + [-torch.inf] * HORIZON, dtype=torch.float64)
        upper = torch.tensor([U_BOUND] * (HORIZON * NU) + [X_BOUND] * HORIZON, dtype=torch.float64)
        return OutputConstraints(
            h=self.h,
            g=self.g,
            lower=lower,
            upper=upper,
            h_jac=self.h_jac,
            g_jac=self.g_jac,
            lagrangian_hessian=self.lagrangian_hessian,
        )


def mpc_cost(y: Tensor) -> Tensor:
    """Z of each trajectory ``[B]`` (the output's own states and controls)."""
    u, x = _split(y)
    target = torch.as_tensor(X_TARGET, device=y.device, dtype=y.dtype)
    return (x - target).square().sum((1, 2)) + u.square().sum((1, 2))


class LearnedMPC(LayerProblem):
    """HardNet++'s learned MPC: x₀ ↦ the optimal trajectory, trained on the MPC cost (module docstring)."""

    name = "mpc"
    defaults = ProblemDefaults(
        lrs=(1e-3,),
        iterations_full=5000,
        iterations_mini=5000,
        quick_iterations=300,
        extra={
            "network": "ReLU MLP 5-200-200-90",
            "data": "800 / 100 / 100 initial states uniform in x'Qx <= 10 (paper size)",
            "mini_batch": 16,
            "constraint_states": _CONSTRAINT_STATES,
            "soft_rho": 100.0,
            "layer": "HardNet++ eps = 0.3, 500 iterations (paper)",
        },
    )
    batch_size = 16
    soft_rho = 100.0

    def __init__(
        self,
        size: Size = "paper",
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(size, device=device, dtype=dtype, cache_dir=cache_dir)
        sizes = _SIZES[size]
        params = {
            "sizes": sizes,
            "seeds": _SEEDS,
            "states": "uniform in the ellipsoid, spawned direction/radius streams",
            "reference": "slsqp+active-set newton",
            "target": X_TARGET,
        }
        data = cached_arrays("mpc", params, lambda: _generate(sizes), cache_dir)
        as_tensor = lambda a: torch.as_tensor(a, device=self.device, dtype=self.dtype)  # noqa: E731
        self.x0_train, self.x0_val, self.x0_test = (as_tensor(data[f"x0_{s}"]) for s in ("train", "val", "test"))
        self.y_val, self.y_test = as_tensor(data["y_val"]), as_tensor(data["y_test"])  # [n, 90]
        # Optimal costs stay float64: suboptimality ~1e-3 of Z ~ 2e3 needs more digits than float32 keeps.
        self.z_val = torch.as_tensor(data["z_val"], device=self.device, dtype=torch.float64)
        self.z_test = torch.as_tensor(data["z_test"], device=self.device, dtype=torch.float64)
        self.reference_kkt = {s: data[f"kkt_{s}"] for s in ("val", "test")}
        self._k = _CONSTRAINT_STATES[size]
        self._oc = _Constraints().output_constraints()

    # --- LayerProblem ------------------------------------------------------------------------------------
    def make_model(self, seed: int) -> nn.Module:
        return relu_mlp(LAYERS, seed, device=self.device, dtype=self.dtype)

    def inputs(self, batch: Batch | None = None) -> Tensor:
        if batch is None:
            return self.x0_train
        return self.x0_train[batch_indices(batch, "train", self.x0_train.shape[0], self.name, self.device)]

    def output_loss(self, x: Tensor, y: Tensor, batch: Batch | None = None) -> Tensor:
        if y.dim() != 2 or y.shape[-1] != HORIZON * STEP or y.shape[0] != x.shape[0]:
            raise ValueError(f"mpc: outputs must be [B, {HORIZON * STEP}] for B = {x.shape[0]}; got {list(y.shape)}")
        return mpc_cost(y).mean()

    def output_constraints(self) -> OutputConstraints:
        return self._oc

    def constraint_inputs(self) -> Tensor:
        return self.x0_train[: self._k]

    @property
    def num_constraints(self) -> int:
        return self._k * HORIZON * NX

    def sample_batch(self, generator: torch.Generator) -> Batch:
        n = self.x0_train.shape[0]
        return {"train": torch.randperm(n, generator=generator)[: min(self.batch_size, n)]}

    # --- evaluation --------------------------------------------------------------------------------------
    def table_metrics(self, x0: Tensor, y: Tensor, z_star: Tensor) -> dict[str, Tensor]:
        """Table I's quantities for outputs ``y`` at states ``x0`` with optimal costs ``z_star``."""
        y64, x64 = y.double(), x0.double()
        ev = self._oc.evaluate(x64, y64, jacobian=False)
        n_box = HORIZON * NU
        dyn = ev.h.abs()  # [B, 50]
        box = torch.relu(ev.g[:, :n_box].abs() - U_BOUND)  # [B, 40]
        quad = torch.relu(ev.g[:, n_box:] - X_BOUND)  # [B, 10]
        subopt = torch.relu(mpc_cost(y64) - z_star) / z_star  # [B]
        rows = torch.cat([dyn, box, quad], dim=-1)
        return {"subopt": subopt, "dyn": dyn, "box": box, "quad": quad, "all": rows}

    def metrics(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            y_train, y_val, y_test = model(self.x0_train), model(self.x0_val), model(self.x0_test)
            test = self.table_metrics(self.x0_test, y_test, self.z_test)
            val = self.table_metrics(self.x0_val, y_val, self.z_val)
            xc = self.constraint_inputs()
            max_abs_c = self._oc.h(xc.double(), y_train[: self._k].double()).abs().max()
            out = {
                "objective": float(mpc_cost(y_train).mean()),
                "test_mse": float((y_test - self.y_test).square().mean()),
                "val_subopt_mean": float(val["subopt"].mean()),
                "test_mean_violation": float(test["all"].mean()),
                "test_max_violation": float(test["all"].max()),
                "max_abs_c": float(max_abs_c),
            }
            for key, name in (("subopt", "subopt"), ("dyn", "dyn_viol"), ("box", "box_viol"), ("quad", "quad_viol")):
                out[f"test_{name}_mean"] = float(test[key].mean())
                out[f"test_{name}_max"] = float(test[key].max())
        return out

    def prediction(self, model: nn.Module) -> dict[str, np.ndarray]:
        with torch.no_grad():
            y_pred = model(self.x0_test[:1])
        numpy = lambda a: a.detach().cpu().double().numpy().reshape(HORIZON, STEP)  # noqa: E731
        return {"t": np.arange(1.0, HORIZON + 1), "u_true": numpy(self.y_test[:1]), "u_pred": numpy(y_pred)}
