r"""Darcy-flow data: a Gaussian-random-field generator, a finite-volume solver, and its operator in torch.

Random fields (Li et al. 2021, the FNO paper's Darcy data):
:math:`a \sim \mathcal N(0, (-\Delta + \tau^2 I)^{-\alpha})` with zero Neumann conditions on (0, 1)²,
:math:`\alpha = 2`, :math:`\tau = 3`, thresholded to :math:`\nu = 12` where :math:`a \ge 0` and
:math:`\nu = 3` elsewhere. The field is the Karhunen–Loève (cosine) series

.. math::

    a(x, y) = \sum_{(k_1, k_2) \ne (0, 0)} \tau^{\alpha - 1}
    \bigl(\pi^2 (k_1^2 + k_2^2) + \tau^2\bigr)^{-\alpha/2} \xi_{k_1 k_2} \cos(\pi k_1 x) \cos(\pi k_2 y),
    \qquad \xi_{k_1 k_2} \sim \mathcal N(0, 1),

evaluated *directly* at the grid nodes with :math:`0 \le k_1, k_2 < 64` (the omitted modes carry < 2e-4 of
the variance). As in the authors' GRF.m the constant mode is dropped, so the field has mean zero; the overall
scale is irrelevant after thresholding.

Finite volumes. On the vertex-centred grid :math:`x_i = i h`, :math:`h = 1/(n-1)`, with ν given at the
nodes, the flux across the face between two neighbouring nodes uses the *harmonic* mean
:math:`\nu_{i+1/2} = 2\nu_i\nu_{i+1}/(\nu_i + \nu_{i+1})` (the exact series conductance when ν jumps at the
face, second order for a smooth ν). At every interior node

.. math::

    (A u)_{ij} = h^{-2}\bigl[\nu_{i+\frac12,j}(u_{ij} - u_{i+1,j}) + \nu_{i-\frac12,j}(u_{ij} - u_{i-1,j})
    + \nu_{i,j+\frac12}(u_{ij} - u_{i,j+1}) + \nu_{i,j-\frac12}(u_{ij} - u_{i,j-1})\bigr] = f_{ij},

with :math:`u = 0` at the boundary nodes. :func:`solve_darcy` solves all fields at once (one block-diagonal
sparse system); :func:`darcy_residual` applies the identical operator in torch to any grid (a prediction),
so the reference solution has a residual at round-off level.

Array convention: ``u[..., i, j] = u(x_i, y_j)`` (axis -2 is x, axis -1 is y).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from torch import Tensor

__all__ = ["darcy_residual", "face_coefficients", "gaussian_random_field", "solve_darcy", "threshold_field"]


def gaussian_random_field(
    n_fields: int,
    n: int,
    rng: np.random.Generator,
    *,
    alpha: float = 2.0,
    tau: float = 3.0,
    n_modes: int = 64,
) -> np.ndarray:
    """``n_fields`` samples of the GRF above at the nodes ``x_i = i/(n-1)``: shape ``[n_fields, n, n]``."""
    k = np.arange(n_modes)
    coef = tau ** (alpha - 1) * (np.pi**2 * (k[:, None] ** 2 + k[None, :] ** 2) + tau**2) ** (-alpha / 2)
    coef[0, 0] = 0.0  # zero-mean field, as in GRF.m
    xi = rng.standard_normal((n_fields, n_modes, n_modes))
    basis = np.cos(np.pi * np.outer(k, np.linspace(0.0, 1.0, n)))  # [n_modes, n]
    return np.einsum("bkl,ki,lj->bij", coef * xi, basis, basis, optimize=True)


def threshold_field(a: np.ndarray, high: float = 12.0, low: float = 3.0) -> np.ndarray:
    """ν = ``high`` where ``a >= 0`` and ``low`` elsewhere (the FNO paper's ψ)."""
    return np.where(a >= 0.0, high, low)


def _harmonic(a, b):
    return 2.0 * a * b / (a + b)


def face_coefficients(nu):
    """Harmonic face means ``(ν_x [..., n-1, n], ν_y [..., n, n-1])`` of nodal ``ν [..., n, n]``.

    Works on numpy arrays and torch tensors alike.
    """
    return _harmonic(nu[..., 1:, :], nu[..., :-1, :]), _harmonic(nu[..., :, 1:], nu[..., :, :-1])


def _operator(nu: np.ndarray) -> sp.csc_matrix:
    """Block-diagonal matrix of A over the interior nodes of every field in ``nu [B, n, n]`` (row-major)."""
    b, n = nu.shape[0], nu.shape[-1]
    h2 = (1.0 / (n - 1)) ** 2
    m = n - 2
    wx, wy = face_coefficients(nu)  # [B, n-1, n], [B, n, n-1]
    w_e, w_w = wx[:, 1:, 1:-1], wx[:, :-1, 1:-1]  # faces i+1/2 and i-1/2 of interior nodes, [B, m, m]
    w_n, w_s = wy[:, 1:-1, 1:], wy[:, 1:-1, :-1]
    idx = np.arange(b * m * m).reshape(b, m, m)
    rows, cols, vals = [idx.ravel()], [idx.ravel()], [((w_e + w_w + w_n + w_s) / h2).ravel()]
    # Couplings to interior neighbours (east, west, north, south); boundary neighbours have u = 0.
    inner, outer = slice(0, -1), slice(1, None)
    for node, neighbour, w in [
        ((inner, slice(None)), (outer, slice(None)), w_e),
        ((outer, slice(None)), (inner, slice(None)), w_w),
        ((slice(None), inner), (slice(None), outer), w_n),
        ((slice(None), outer), (slice(None), inner), w_s),
    ]:
        rows.append(idx[:, node[0], node[1]].ravel())
        cols.append(idx[:, neighbour[0], neighbour[1]].ravel())
        vals.append((-w[:, node[0], node[1]] / h2).ravel())
    size = b * m * m
    return sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(size, size))


def solve_darcy(nu: np.ndarray, f: np.ndarray | float = 1.0) -> np.ndarray:
    """Solve ``−∇·(ν∇u) = f`` with ``u = 0`` on the boundary for every field of ``nu [B, n, n]``.

    ``f`` is a scalar or nodal values ``[B, n, n]`` (only interior values are used). Returns ``u [B, n, n]``
    with zero boundary rows and columns.
    """
    nu = np.asarray(nu, dtype=np.float64)
    if nu.ndim != 3 or nu.shape[1] != nu.shape[2] or nu.shape[1] < 3:
        raise ValueError(f"solve_darcy: nu must have shape [B, n, n] with n >= 3, got {nu.shape}")
    if np.any(nu <= 0):
        raise ValueError("solve_darcy: the coefficient nu must be positive")
    b, n = nu.shape[0], nu.shape[-1]
    rhs = np.broadcast_to(np.asarray(f, dtype=np.float64), nu.shape)[:, 1:-1, 1:-1].reshape(-1)
    u = np.zeros_like(nu)
    u[:, 1:-1, 1:-1] = spla.spsolve(_operator(nu), rhs).reshape(b, n - 2, n - 2)
    return u


def darcy_residual(u: Tensor, nu_x: Tensor, nu_y: Tensor, f: Tensor | float = 1.0) -> Tensor:
    """``A u − f`` at the interior nodes, the operator of :func:`solve_darcy` applied to any grid.

    Args:
        u: nodal values ``[..., n, n]``, boundary values included as given (not replaced by zero).
        nu_x, nu_y: face coefficients from :func:`face_coefficients`, ``[..., n-1, n]`` and ``[..., n, n-1]``.
        f: forcing, scalar or interior values ``[..., n-2, n-2]``.

    Returns:
        ``[..., n-2, n-2]``.
    """
    n = u.shape[-1]
    flux_x = nu_x * (u[..., 1:, :] - u[..., :-1, :])  # [..., n-1, n], ν ∂u/∂x at the x-faces
    flux_y = nu_y * (u[..., :, 1:] - u[..., :, :-1])  # [..., n, n-1]
    div = (flux_x[..., 1:, 1:-1] - flux_x[..., :-1, 1:-1]) + (flux_y[..., 1:-1, 1:] - flux_y[..., 1:-1, :-1])
    return -div * (n - 1) ** 2 - f
