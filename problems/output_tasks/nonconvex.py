r"""C2/C3: learning solutions of nonconvex programs, self-supervised (ENFORCE Sec. 5.2, Tables 2-5; DC3).

For an input :math:`x \in \mathbb{R}^{N_C}` the network predicts :math:`y \in \mathbb{R}^{N_O}` for

.. math::
    \min_y\ f(y) = \tfrac12 y^\top Q y + p^\top \sin y \quad \text{s.t.} \quad
    \begin{cases} A y = x & \text{(C2, ``nonconvex_linear``)} \\
    y^\top A_i y + c_i^\top y + d_i = x_i^3,\ i = 1..N_C & \text{(C3, ``nonconvex_quadratic``)}
    \end{cases}

Data (DC3's generator, ``np.random.seed(17)`` and its draw order, with the ENFORCE paper's input range):
``q = random(N_O)`` (Q = diag q ⪰ 0), ``p = random(N_O)``, ``A = normal(0, 1, (N_C, N_O))``,
``X = uniform(-5, 5, (10000, N_C))``; for C3 the same ``Q, p, X``, the linear terms :math:`c_i` = the rows of
that ``A``, then :math:`A_i = (G_i + G_i^\top)/2` with :math:`G = ` ``normal(0, 1, (N_C, N_O, N_O))`` and
``d = normal(0, 1, N_C)``. Split as DC3: 8,334 training, 833 validation (unused), 833 test instances.

Deviations and choices
----------------------
* The paper does not state the distributions of :math:`A_i` and :math:`d` ("randomly generated symmetric
  matrices", "the remaining parameters follow the same sampling procedure"). The choice above reproduces the
  paper's IPOPT references closely (a few instances each, scipy): 100/10: −25.3 (paper −26.27), 100/50: −18.0
  (−18.05), 200/150: −30.1 (−29.45). With DC3's seed, C2's 200/150 reference mean is −10.4 over 20 test
  instances (paper −10.64) and the unconstrained optimum is −53.09 (the paper's MLP: −52.99).
* Backbone: ReLU MLP N_C-200-200-N_O without DC3's batch norm and dropout (the paper: "fully connected ReLU
  neural network backbone consisting of 2 hidden layers with 200 neurons"); training as the paper: batch 200,
  Adam lr 1e-4, 1000 epochs = 42,000 mini-batch iterations (8,334 / 200 rounded up, times 1000). Mini-batches
  are 200 instances drawn without replacement per batch (not epoch-wise reshuffles).
* Task loss (self-supervised): the batch mean of :math:`f(y)` of the (projected) output.
* The products :math:`A_i y` in float32 use :func:`sqpoptim.fast_float32_products` (float32-accurate bfloat16
  splits on CPUs that have native bfloat16 arithmetic, IEEE products elsewhere); float64 runs are unaffected.
* Reference optima: scipy (SLSQP for C2, trust-constr with exact Hessians for C3; several starts, best
  feasible kept), computed once per test set and cached (:mod:`problems.reference.nlp_solver`). About 0.2 s per C2
  instance and 5-15 s per C3 instance at 200/150 on one core: the paper-size C3 set takes hours once.
* ``metrics()["objective"]`` is the mean objective over the *test* instances (the paper's "Obj. value"), not
  over the training set: for C3 a layer's projection of all 8,334 training instances costs ~10x the test set
  at every evaluation, and the paper reports test values.
* Training-time constraints (SQP methods): :math:`h = 0` at the first 10 training instances (m = 1,500 of
  110,600 parameters at 200/150); 2 instances at ``small`` (m = 300: the Gram matrix of a 1,500-row Jacobian
  costs seconds per step on a CPU). They constrain the outputs at those instances only.

Metrics: ``objective`` / ``reference_objective`` (means over the test instances), ``optimality_gap``
(relative, ``(objective − reference) / |reference|``), ``test_max_violation`` / ``test_mean_violation``
(max and mean of |h| over all test instances and constraints: the paper's "Max eq." and "Mean eq."),
``test_mse`` (mean squared distance to the reference solutions), ``max_abs_c`` (at the constraint
instances), ``time_per_batch_ms`` (forward pass on the whole test batch, projection included; the paper
times one batch of 833), and ``raw_objective``/``raw_test_max_violation`` for a backbone with a layer.

Sizes: ``"paper"`` as above; ``"small"``: the same program, the first 2,000 training and first 100 test
instances; ``"tiny"``: N_O/N_C = 12/6, 150 instances (125 train, 13 test), hidden width 32.
Other dimensions: the registered variants ``*_100x50``, ``*_100x70`` (Tables 4-5), ``nonconvex_quadratic_100x10``
(Table 5), or ``dims=(N_O, N_C)`` in the constructor.

:meth:`NonconvexProgram.prediction` keys: ``t`` (test instance rank by reference objective), ``u_true`` (the
reference objective per instance), ``u_pred`` (the model's), ``violation`` (max |h| per instance).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from sqpoptim import fast_float32_products
from sqpoptim.layers import OutputConstraints

from ..core.data import cached_arrays
from ..core.nets import relu_mlp
from ..core.problem import Batch, ProblemDefaults, Size, batch_indices
from ..reference.nlp_solver import solve_references
from .task import LayerProblem, backbone_output, forward_seconds

__all__ = [
    "NonconvexLinear",
    "NonconvexLinear100x50",
    "NonconvexLinear100x70",
    "NonconvexProgram",
    "NonconvexQuadratic",
    "NonconvexQuadratic100x10",
    "NonconvexQuadratic100x50",
    "NonconvexQuadratic100x70",
    "generate_program",
]

SEED = 17
X_RANGE = 5.0
FRACTIONS = (0.8334, 0.0833)  # DC3: train, validation; the test set is the rest
HIDDEN = {"paper": 200, "small": 200, "tiny": 32}
NUM_EXAMPLES = {"paper": 10_000, "small": 10_000, "tiny": 150}
SUBSET = {"paper": (None, None), "small": (2_000, 100), "tiny": (None, None)}  # (train, test) prefixes
CONSTRAINT_INSTANCES = {"paper": 10, "small": 2, "tiny": 4}
TINY_DIMS = (12, 6)
MINI_BATCH = 200
REFERENCE_STARTS = {"linear": (2, 4), "quadratic": (1, 4)}  # (always run, at most while none is feasible)
TINY_REFERENCE_STARTS = (2, 4)
REFERENCE_VERSION = 1


def generate_program(kind: str, num_var: int, num_eq: int, num_examples: int, seed: int = SEED) -> dict:
    """The program's data and inputs (see the module docstring), as float64 numpy arrays."""
    if kind not in ("linear", "quadratic"):
        raise ValueError(f"Invalid kind {kind!r}: expected 'linear' or 'quadratic'")
    rs = np.random.RandomState(seed)  # DC3's legacy stream and draw order
    data = {"q": rs.random_sample(num_var), "p": rs.random_sample(num_var)}
    data["A"] = rs.normal(loc=0, scale=1.0, size=(num_eq, num_var))
    data["X"] = rs.uniform(-X_RANGE, X_RANGE, size=(num_examples, num_eq))
    if kind == "quadratic":
        G = rs.normal(loc=0, scale=1.0, size=(num_eq, num_var, num_var))
        data["quad"] = 0.5 * (G + G.transpose(0, 2, 1))
        data["d"] = rs.normal(loc=0, scale=1.0, size=num_eq)
    return data


class NonconvexProgram(LayerProblem):
    """min ½yᵀQy + pᵀsin y s.t. linear (C2) or quadratic (C3) equalities in (x, y) (see the module docstring)."""

    kind: ClassVar[str]
    paper_dims: ClassVar[tuple[int, int]] = (200, 150)
    defaults = ProblemDefaults(
        lrs=(1e-4,),
        iterations_full=1_000,
        iterations_mini=42_000,
        quick_iterations=500,
        extra={
            "objective": "1/2 y^T Q y + p^T sin(y)",
            "data": "DC3 generator, seed 17, x ~ U[-5, 5]",
            "backbone": "ReLU MLP N_C-200-200-N_O",
            "mini_batch": MINI_BATCH,
            "loss": "batch mean of f(y) (self-supervised)",
        },
    )
    #: Weight of mean ‖h‖ in ENFORCE's activation-rule loss measure (App. D.2: needed for optimisation tasks).
    activation_penalty = 1.0

    def __init__(
        self,
        size: Size = "paper",
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | Path | None = None,
        dims: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(size, device=device, dtype=dtype, cache_dir=cache_dir)
        n, m = TINY_DIMS if size == "tiny" else (dims or self.paper_dims)
        if not 0 < m < n:
            raise ValueError(f"Invalid dims (N_O, N_C) = {(n, m)}: need 0 < N_C < N_O")
        self.num_var, self.num_eq, self.hidden = int(n), int(m), HIDDEN[size]
        N = NUM_EXAMPLES[size]
        params = {"kind": self.kind, "num_var": n, "num_eq": m, "num_examples": N, "seed": SEED, "x_range": X_RANGE}
        data = cached_arrays(f"nonconvex_{self.kind}", params, lambda: generate_program(self.kind, n, m, N), cache_dir)
        n_train, n_valid = int(N * FRACTIONS[0]), int(N * FRACTIONS[1])
        train_rows = np.arange(n_train)[: SUBSET[size][0]]
        test_rows = np.arange(n_train + n_valid, N)[: SUBSET[size][1]]
        starts = TINY_REFERENCE_STARTS if size == "tiny" else REFERENCE_STARTS[self.kind]
        program = {k: data[k] for k in ("q", "p", "A", "quad", "d") if k in data}
        ref_params = {**params, "test_rows": [int(test_rows[0]), len(test_rows)], "starts": starts}
        # the reference optima are solved (or read from the cache) when first needed: the metrics need them,
        # training and timing a step do not (C3's take 10-25 minutes on a fresh machine)
        self._solve_reference = lambda: cached_arrays(
            f"nonconvex_{self.kind}_reference",
            {**ref_params, "version": REFERENCE_VERSION},
            lambda: solve_references(
                {**program, "seed": SEED}, data["X"][test_rows], test_rows, starts=starts[0], max_starts=starts[1]
            ),
            cache_dir,
        )
        as_tensor = lambda a: torch.as_tensor(a, device=self.device, dtype=self.dtype)  # noqa: E731
        self.x_train = as_tensor(data["X"][train_rows])  # [N_train, m]
        self.x_test = as_tensor(data["X"][test_rows])  # [N_test, m]
        self._numpy = program
        self._tensors: dict[torch.dtype, dict[str, Tensor]] = {}
        self._constraints = OutputConstraints(
            h=self._h, h_jac=self._h_and_jacobian, lagrangian_hessian=self._lagrangian_hessian
        )

    @functools.cached_property
    def reference(self) -> dict[str, np.ndarray]:
        """The reference optima of the test instances (``objective``, ``y``, ``seconds``), solved on first use."""
        return self._solve_reference()

    @property
    def reference_ok(self) -> np.ndarray:
        """Test instances whose reference solve succeeded."""
        return np.isfinite(self.reference["objective"])

    @functools.cached_property
    def y_ref(self) -> Tensor:
        """The reference solutions, ``[N_test, n]``."""
        return torch.as_tensor(self.reference["y"], device=self.device, dtype=self.dtype)

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "kind": self.kind,
            "dims": (self.num_var, self.num_eq),
            "hidden": self.hidden,
            "train_instances": len(self.x_train),
            "test_instances": len(self.x_test),
            "constraint_instances": CONSTRAINT_INSTANCES[self.size],
            "reference_seconds": float(self.reference["seconds"]),
        }

    # --- the program in torch ----------------------------------------------------------------------------
    def _data(self, like: Tensor) -> dict[str, Tensor]:
        """The program's constants in ``like``'s dtype and device (converted once per dtype); for C3 the
        :math:`A_i` are kept doubled and flattened, ``quad2`` ``[m n, n]`` holding the rows of :math:`2 A_i`
        (doubling is exact in floating point, so every product below equals twice its undoubled form)."""
        if like.dtype not in self._tensors:
            t = {k: torch.as_tensor(v, dtype=like.dtype, device=self.device) for k, v in self._numpy.items()}
            if "quad" in t:
                t["quad2"] = (2.0 * t.pop("quad")).reshape(-1, self.num_var)
            self._tensors[like.dtype] = t
        return self._tensors[like.dtype]

    def objective_values(self, y: Tensor) -> Tensor:
        """:math:`f(y)` per row, ``[B]``."""
        d = self._data(y)
        return 0.5 * (d["q"] * y * y).sum(-1) + (d["p"] * torch.sin(y)).sum(-1)

    def _h_and_jacobian(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        d = self._data(y)
        x = x.to(y.dtype)
        if self.kind == "linear":
            return y @ d["A"].T - x, d["A"].expand(y.shape[0], -1, -1)  # [B, m], [B, m, n]
        P = self._quad_products(y)  # [B, m, n]: rows 2 A_i y
        h = self._quad_h(x, y, P, d)
        if torch.is_grad_enabled() and y.requires_grad:
            return h, P + d["A"]  # J rows 2 A_i y + c_i
        return h, P.add_(d["A"])  # in place without a graph: no second [B, m, n] allocation

    def _quad_products(self, y: Tensor) -> Tensor:
        """``2 A_i y`` for every constraint and sample, ``[B, m, n]``, as one GEMM ``[B, n] x [n, m n]`` (the A_i are
        symmetric, so ``y^T A_i`` is ``(A_i y)^T``); ``h`` then needs one row-wise product with ``y`` and ``J``
        one pass adding :math:`c_i`. In float32 on a CPU with native bfloat16 arithmetic the GEMM runs as
        :func:`sqpoptim.fast_float32_products` (float32's accuracy, checked; 12.8 against 29.8 ms at batch 200)."""
        with fast_float32_products(y.device):
            return (y @ self._data(y)["quad2"].T).view(y.shape[0], -1, y.shape[-1])

    @staticmethod
    def _quad_h(x: Tensor, y: Tensor, P: Tensor, d: dict[str, Tensor]) -> Tensor:
        """:math:`h_i = y^\top A_i y + c_i^\top y + d_i - x_i^3` from ``P`` = :meth:`_quad_products` ``(y)``;
        :math:`y^\top (2 A_i y)` as ``[B, 1, n] x [B, n, m]`` products (dot products along ``P``'s contiguous rows:
        half the time of the ``[B, m, n] x [B, n, 1]`` form on ``150 x 200`` float32 blocks)."""
        quad_form = 0.5 * (y[:, None, :] @ P.mT).squeeze(1)  # [B, m]
        return quad_form + y @ d["A"].T + d["d"] - x**3

    def _h(self, x: Tensor, y: Tensor) -> Tensor:
        d = self._data(y)
        x = x.to(y.dtype)
        if self.kind == "linear":
            return y @ d["A"].T - x
        return self._quad_h(x, y, self._quad_products(y), d)

    def _lagrangian_hessian(self, x: Tensor, y: Tensor, w_h: Tensor, w_g: Tensor | None) -> Tensor:
        if self.kind == "linear":
            return y.new_zeros(y.shape[0], self.num_var, self.num_var)
        quad2 = self._data(y)["quad2"].view(self.num_eq, self.num_var, self.num_var)
        return torch.einsum("bm,mij->bij", w_h, quad2)  # [B, n, n]: sum_i w_i 2 A_i

    # --- model -------------------------------------------------------------------------------------------
    def make_model(self, seed: int) -> nn.Module:
        sizes = (self.num_eq, self.hidden, self.hidden, self.num_var)
        return relu_mlp(sizes, seed, device=self.device, dtype=self.dtype)

    # --- LayerProblem ------------------------------------------------------------------------------------
    def inputs(self, batch: Batch | None = None) -> Tensor:
        if batch is None:
            return self.x_train
        return self.x_train[batch_indices(batch, "train", len(self.x_train), self.name, self.device)]

    def output_loss(self, x: Tensor, y: Tensor, batch: Batch | None = None) -> Tensor:
        if y.shape != (x.shape[0], self.num_var):
            raise ValueError(f"{self.name}: outputs of shape {list(y.shape)}, expected [{x.shape[0]}, {self.num_var}]")
        return self.objective_values(y).mean()

    def output_constraints(self) -> OutputConstraints:
        return self._constraints

    def constraint_inputs(self) -> Tensor:
        return self.x_train[: CONSTRAINT_INSTANCES[self.size]]

    @property
    def num_constraints(self) -> int:
        return CONSTRAINT_INSTANCES[self.size] * self.num_eq

    def sample_batch(self, generator: torch.Generator) -> Batch:
        n = len(self.x_train)
        return {"train": torch.randperm(n, generator=generator)[: min(MINI_BATCH, n)]}

    # --- evaluation --------------------------------------------------------------------------------------
    def metrics(self, model: nn.Module) -> dict[str, float]:
        ok = torch.as_tensor(self.reference_ok, device=self.device)
        y, seconds = forward_seconds(model, self.x_test, repeats=1)  # [N_test, n]
        with torch.no_grad():
            c = self.constraints(model)
            values = self.objective_values(y.double())  # [N_test]
            viol = self._h(self.x_test.double(), y.double()).abs()  # [N_test, m], evaluated without rounding
        reference = float(self.reference["objective"][self.reference_ok].mean())
        objective = float(values.mean())
        out = {
            "objective": objective,
            "reference_objective": reference,
            "optimality_gap": (objective - reference) / abs(reference),
            "test_mse": float((y - self.y_ref)[ok].square().mean()),
            "max_abs_c": float(c.abs().max()),
            "test_max_violation": float(viol.max()),
            "test_mean_violation": float(viol.mean()),
            "time_per_batch_ms": 1e3 * seconds,
        }
        raw = backbone_output(model, self.x_test)
        if raw is not None:
            out["raw_objective"] = float(self.objective_values(raw.double()).mean())
            out["raw_test_max_violation"] = float(self._h(self.x_test.double(), raw.double()).abs().max())
        return out

    def prediction(self, model: nn.Module) -> dict[str, np.ndarray]:
        with torch.no_grad():
            y = model(self.x_test)
            values = self.objective_values(y.double()).cpu().numpy()
            viol = self._h(self.x_test.double(), y.double()).abs().amax(-1).cpu().numpy()
        order = np.argsort(self.reference["objective"])
        return {
            "t": np.arange(len(order), dtype=np.float64),
            "u_true": self.reference["objective"][order],
            "u_pred": values[order],
            "violation": viol[order],
        }


class NonconvexLinear(NonconvexProgram):
    """C2: linear equalities A y = x (ENFORCE Table 2: 200 variables, 150 constraints)."""

    name = "nonconvex_linear"
    kind = "linear"


class NonconvexQuadratic(NonconvexProgram):
    """C3: quadratic equalities yᵀA_i y + c_iᵀy + d_i = x_i³ (ENFORCE Table 3: 200 variables, 150 constraints)."""

    name = "nonconvex_quadratic"
    kind = "quadratic"


class NonconvexLinear100x50(NonconvexLinear):
    """C2 with 100 variables and 50 constraints (ENFORCE Table 4)."""

    name = "nonconvex_linear_100x50"
    paper_dims = (100, 50)


class NonconvexLinear100x70(NonconvexLinear):
    """C2 with 100 variables and 70 constraints (ENFORCE Table 4)."""

    name = "nonconvex_linear_100x70"
    paper_dims = (100, 70)


class NonconvexQuadratic100x10(NonconvexQuadratic):
    """C3 with 100 variables and 10 constraints (ENFORCE Table 5)."""

    name = "nonconvex_quadratic_100x10"
    paper_dims = (100, 10)


class NonconvexQuadratic100x50(NonconvexQuadratic):
    """C3 with 100 variables and 50 constraints (ENFORCE Table 5)."""

    name = "nonconvex_quadratic_100x50"
    paper_dims = (100, 50)


class NonconvexQuadratic100x70(NonconvexQuadratic):
    """C3 with 100 variables and 70 constraints (ENFORCE Table 5)."""

    name = "nonconvex_quadratic_100x70"
    paper_dims = (100, 70)
