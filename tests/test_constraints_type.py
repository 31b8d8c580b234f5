"""The Constraints value type: what it accepts, and the errors for what it refuses."""

import pytest
import torch

from sqpoptim._constraints import Constraints
from sqpoptim._jacobian import PointwiseConstraints

f32, f64 = torch.float32, torch.float64


def test_either_part_may_be_absent_or_empty():
    c = torch.zeros(3)
    assert (Constraints(eq=c).num_eq, Constraints(eq=c).num_ineq) == (3, 0)
    assert (Constraints(ineq=c).num_eq, Constraints(ineq=c).num_ineq) == (0, 3)
    assert (Constraints().num_eq, Constraints().num_ineq) == (0, 0)
    e = Constraints(eq=torch.zeros(0, dtype=f64), ineq=torch.zeros(2))  # an empty part does not fix the dtype
    assert (e.num_eq, e.num_ineq) == (0, 2)


def test_jacobians_dense_and_per_parameter():
    Constraints(eq=torch.zeros(2), eq_jac=torch.zeros(2, 7), ineq=torch.zeros(3), ineq_jac=torch.zeros(3, 7))
    Constraints(ineq=torch.zeros(3), ineq_jac=[torch.zeros(3, 2, 2), torch.zeros(3, 3)])
    z = torch.zeros(2, 4, dtype=torch.complex64)  # a complex parameter's block, real-viewed by the optimizer
    Constraints(eq=torch.zeros(2), eq_jac=[z])


def test_pointwise_parts_are_counted():
    model = torch.nn.Linear(1, 1)
    pc = PointwiseConstraints(model, lambda f, x: f(x).squeeze(), torch.zeros(5, 1))
    assert Constraints(ineq=pc, eq=torch.zeros(2)).num_ineq == 5


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(eq=torch.zeros(2, 2)),
            ValueError,
            r"Constraints.eq must be a 1-D tensor of residuals; got shape \(2, 2\)",
        ),
        (dict(ineq=torch.tensor(1.0)), ValueError, r"use .reshape\(1\)"),
        (dict(ineq=torch.zeros(2, dtype=torch.long)), ValueError, "real floating-point"),
        (dict(eq=[0.0, 1.0]), TypeError, "got list"),
        (dict(eq_jac=torch.zeros(1, 3)), ValueError, "eq_jac was given but eq is no residuals"),
        (dict(ineq=torch.zeros(2), ineq_jac=torch.zeros(3, 5)), ValueError, "must have 2 rows"),
        (dict(ineq=torch.zeros(2), ineq_jac=torch.zeros(2)), ValueError, r"must be \[m, n\]"),
        (dict(ineq=torch.zeros(2), ineq_jac=[torch.zeros(2, 3), torch.zeros(1, 3)]), ValueError, "block 1 must have"),
        (dict(ineq=torch.zeros(2), ineq_jac="J"), TypeError, "tensor or a sequence of tensors"),
        (dict(ineq=torch.zeros(2), ineq_jac=torch.zeros(2, 3, dtype=f64)), ValueError, "has dtype torch.float64"),
        (dict(eq=torch.zeros(2), ineq=torch.zeros(2, dtype=f64)), ValueError, "eq has dtype torch.float32 but"),
        (dict(eq=torch.zeros(2), eq_jac=torch.zeros(2, 3).to_sparse()), ValueError, "sparse"),
    ],
)
def test_refused_with_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        Constraints(**kwargs)


def test_jacobian_with_pointwise_constraints_is_refused():
    model = torch.nn.Linear(1, 1)
    pc = PointwiseConstraints(model, lambda f, x: f(x).squeeze(), torch.zeros(5, 1))
    with pytest.raises(ValueError, match="PointwiseConstraints"):
        Constraints(ineq=pc, ineq_jac=torch.zeros(5, 2))


def test_frozen():
    cons = Constraints(eq=torch.zeros(1))
    with pytest.raises(AttributeError):
        cons.eq = torch.zeros(2)  # type: ignore[misc]


@pytest.mark.cuda
def test_parts_on_different_devices_are_refused():
    with pytest.raises(ValueError, match=r"Constraints\.eq is on cpu but Constraints\.ineq is on cuda"):
        Constraints(eq=torch.zeros(1), ineq=torch.zeros(1, device="cuda"))
