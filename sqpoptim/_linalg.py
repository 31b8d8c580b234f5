r"""Step decomposition for equality-constrained SQP: small pure tensor functions.

With constraint Jacobian :math:`J \in \mathbb{R}^{m\times n}` (full row rank), residual :math:`c`, and a
positive diagonal weight :math:`W = \operatorname{diag}(w)` (``w = None`` means :math:`W = I`), every step of
the package is built from

.. math::

    G_W = J W J^\top \quad (m\times m,\ \text{float64, factored once per step})

    v_W = -W J^\top G_W^{-1} c \qquad\text{(normal step: } J v_W = -c\text{)}

    P_W x = x - W J^\top G_W^{-1} J x \qquad\text{(projector onto Null}(J)\text{: } J P_W x = 0,\ P_W^2 = P_W)

For :math:`W = I` these are the Euclidean least-norm normal step :math:`v = -J^\top(JJ^\top)^{-1}c` and the
orthogonal projector :math:`P = I - J^\top(JJ^\top)^{-1}J`; :math:`u = -Pg` is the tangential step and
:math:`v + u` solves :math:`\min_d g^\top d + \tfrac12\|d\|^2` s.t. :math:`c + Jd = 0`. For the diagonal metric
:math:`H = \operatorname{diag}(h)` take :math:`W = H^{-1}`: the KKT system
:math:`[[H, J^\top], [J, 0]] [s; \lambda] = -[p; c]` has :math:`s = v_W - P_W W p`
(see :func:`kkt_reference`, the dense oracle the tests compare against).

Linear algebra. :math:`G_W` is formed in float64 whatever the parameter dtype and factored once with
``torch.linalg.cholesky_ex`` (no host synchronisation); every right-hand side reuses that factor. A
rank-deficient or ill-conditioned :math:`J` (duplicate constraint points, saturated units) is detected from a
condition estimate :math:`\hat\kappa \le \kappa(G)` built from the Cholesky factor (smallest pivot and three
steps of inverse iteration for :math:`\lambda_{\min}`, a power step for :math:`\lambda_{\max}`; a few m×m
solves) — or, for at most ``EXACT_COND_M`` constraints on the CPU, from the eigenvalues, which is cheaper there
— and handled in one of two ways:

* ``sync_free=False`` (exact; the default on CPU, where reading a flag costs nothing): a truncated
  eigendecomposition keeps the directions with :math:`\sigma_i > \text{rank\_tol}\cdot\sigma_{\max}` (that is
  :math:`\lambda_i > \text{rank\_tol}^2 \lambda_{\max}` of :math:`G`), which gives the least-norm normal step of
  the independent part and the exact projector onto the null space of the kept rows (cf. Berahas, Curtis,
  O'Neill, Robinson, Math. Oper. Res. 2023).
* ``sync_free=True`` (the default on CUDA): the decision cannot be read on the host without a synchronisation,
  so the factor is taken of :math:`G + \mu I` with :math:`\mu = 0` when the pivots are healthy and
  :math:`\mu = \max(\text{rank\_tol}^2, 64\epsilon)\max_i G_{ii}` otherwise, chosen on the device, and every
  solve applies two steps of iterative refinement. For a healthy :math:`G` this is the Cholesky solve (the
  refinement only polishes it); for a rank-deficient :math:`G` it is iterated Tikhonov regularisation, a smooth
  filter (:math:`1 - (\mu/(\lambda_i+\mu))^3`) in place of the hard truncation.

Never ``inv``/``pinv``, never a loop adding :math:`iI` until a solve succeeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._finite import all_finite
from ._workspace import Workspace

__all__ = [
    "EXACT_COND_M",
    "GramFactor",
    "damped",
    "default_rank_tol",
    "factor_gram",
    "gram",
    "kkt_reference",
    "masked",
    "normal_step",
    "project",
    "project_with_multipliers",
    "scaled_normal_step",
    "step_info",
]

EXACT_COND_M = 32  # up to this many constraints (on the CPU) the condition number is computed, not estimated

# Columns of J processed at once when forming the float64 Gram matrix: bounds the float64 temporary to
# m * _GRAM_CHUNK_BYTES / 8 elements whatever n is.
_GRAM_CHUNK_BYTES = 1 << 28


def default_rank_tol(dtype: torch.dtype) -> float:
    """Relative singular-value cutoff used when ``rank_tol`` is not given.

    Rows of a float32 Jacobian carry relative errors near 1e-7, so directions with
    :math:`\\sigma_i < 10^{-6}\\sigma_{\\max}` are mostly rounding; float64 keeps down to 1e-7 (a Gram
    condition number of 1e14, where float64 Cholesky is still accurate).
    """
    return 1e-7 if dtype in (torch.float64, torch.complex128) else 1e-6


def gram(J: Tensor, weight: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
    r""":math:`J W J^\top` in float64, ``[m, m]``; ``J`` is ``[m, n]``, ``weight`` is ``[n]`` or ``None``;
    written into ``out`` (float64 ``[m, m]``) when given.

    Columns are processed in chunks so that the float64 copy of ``J`` never exceeds a fixed budget.
    """
    m, n = J.shape
    if m == 0:
        return J.new_zeros((0, 0), dtype=torch.float64)
    if J.dtype == torch.float64 and weight is None:
        return J @ J.T if out is None else torch.mm(J, J.T, out=out)
    chunk = max(1, _GRAM_CHUNK_BYTES // (8 * max(m, 1)))
    if weight is None and n <= chunk:  # one cast, one product
        J64 = J.to(torch.float64)
        return J64 @ J64.T if out is None else torch.mm(J64, J64.T, out=out)
    out = J.new_zeros((m, m), dtype=torch.float64) if out is None else out.zero_()
    for start in range(0, n, chunk):
        Jc = J[:, start : start + chunk].to(torch.float64)  # [m, k]
        if weight is None:
            out.addmm_(Jc, Jc.T)
        else:
            out.addmm_(Jc * weight[start : start + chunk].to(torch.float64), Jc.T)
    return out


def _cholesky_solve(B: Tensor, L: Tensor) -> Tensor:
    """``torch.cholesky_solve(B, L)`` by two triangular solves: the same result, without the copy of the factor
    that ``cholesky_solve`` makes on every call (8 MB at m = 1000, five times the solves' own cost)."""
    return torch.linalg.solve_triangular(L.mH, torch.linalg.solve_triangular(L, B, upper=False), upper=True)


@dataclass
class GramFactor:
    r"""One factorisation of a Gram matrix, reused for every right-hand side of a step.

    Exactly one of ``chol`` (lower Cholesky factor) and ``eigvecs``/``inv_eigvals`` (truncated
    eigendecomposition, ``inv_eigvals`` zero on dropped directions) is set. ``rank`` and ``cond`` are 0-d
    device tensors (no host synchronisation): the numerical rank used and the estimated condition number of
    :math:`G` (``rank = -1`` when ``sync_free`` regularised a deficient matrix, whose rank it does not know).
    ``shift`` is μ of a damped factor of :math:`G + \mu I` (:func:`damped`), ``None`` otherwise.
    """

    gram: Tensor
    chol: Tensor | None
    eigvecs: Tensor | None
    inv_eigvals: Tensor | None
    rank: Tensor
    cond: Tensor
    refine: int = 0
    shift: Tensor | None = None

    @property
    def exact(self) -> bool:
        """A Cholesky factor of the matrix itself, solved without refinement: ``solve`` returns
        :math:`G^{-1}b` to rounding (not a truncated or regularised inverse)."""
        return self.chol is not None and self.refine == 0

    def solve(self, b: Tensor) -> Tensor:
        r"""Solve :math:`G x = b` (least-norm on the kept directions); ``b`` is ``[m]`` or ``[m, k]``."""
        vec = b.dim() == 1
        B = b.to(torch.float64)
        B = B.unsqueeze(-1) if vec else B
        if self.chol is not None:
            X = _cholesky_solve(B, self.chol)
            for _ in range(self.refine):
                X = X + _cholesky_solve(B - self.gram @ X, self.chol)
        else:
            assert self.eigvecs is not None and self.inv_eigvals is not None
            X = self.eigvecs @ (self.inv_eigvals.unsqueeze(-1) * (self.eigvecs.T @ B))
        return X.squeeze(-1) if vec else X


def _condition(G: Tensor, L: Tensor) -> Tensor:
    """κ(G) exactly from its eigenvalues for small m on the CPU (``EXACT_COND_M``), where one ``eigvalsh`` costs
    less than the estimate's dozen small solves (8-41 µs against ~150 µs for m = 3-32, measured); otherwise the
    sync-free lower bound of :func:`_cond_estimate`. Infinite when G is singular or indefinite, NaN when G holds
    a non-finite entry."""
    if G.device.type != "cpu" or G.shape[0] > EXACT_COND_M:
        return _cond_estimate(G, L)
    return torch.full((), _host_condition(G), dtype=G.dtype)


def _host_condition(G: Tensor) -> float:
    """κ(G) of :func:`_condition` on the CPU as a Python float, from one read of the extreme eigenvalues."""
    if not all_finite(G):  # (LAPACK's eigenvalue iteration may fail on it)
        return math.nan
    lam = torch.linalg.eigvalsh(G).tolist()
    low, high = lam[0], lam[-1]
    return high / low if low > 0 else math.inf


def _cond_estimate(G: Tensor, L: Tensor, iters: int = 3) -> Tensor:
    """Lower bound on the condition number of G from its Cholesky factor, without host synchronisation.

    λ_min is bounded above by the smallest pivot and by ``1/‖G⁻¹x‖`` after a few inverse-iteration steps;
    λ_max is bounded below by the largest diagonal entry and by ``‖Gx‖`` after a power step. NaN when the
    factorisation failed."""
    m = G.shape[0]
    x = 1.0 + 0.5 * torch.sin(2.4 * torch.arange(m, dtype=G.dtype, device=G.device))  # generic start vector
    x = (x / torch.linalg.vector_norm(x)).unsqueeze(-1)
    for _ in range(iters):
        y = _cholesky_solve(x, L)
        x = y / torch.linalg.vector_norm(y)
    lam_min = torch.minimum(torch.diagonal(L).square().min(), 1.0 / torch.linalg.vector_norm(_cholesky_solve(x, L)))
    lam_max = torch.maximum(torch.diagonal(G).max(), torch.linalg.vector_norm(G @ x))
    return lam_max / lam_min


def factor_gram(
    G: Tensor,
    rank_tol: float,
    *,
    sync_free: bool = False,
    truncate: bool = True,
    workspace: Workspace | None = None,
    name: str = "chol",
) -> GramFactor:
    """Factor the float64 Gram matrix ``G`` once (see the module docstring for the two modes). ``truncate=False``
    (exact mode only) handles an ill-conditioned ``G`` by the regularised factorisation of the sync-free mode
    instead of the truncated eigendecomposition, whose cost (about nine Cholesky factorisations) large m
    cannot afford; a healthy ``G`` still costs one factorisation. With a ``workspace`` the Cholesky factor is
    written into its buffer ``name`` (valid until the next factorisation there)."""
    m = G.shape[0]
    if m == 0:
        z = G.new_zeros(())
        return GramFactor(G, G.new_zeros((0, 0)), None, None, z.long(), z + 1.0)
    thresh = rank_tol * rank_tol
    L, info = _cholesky(G, workspace, name)
    host = not sync_free and G.device.type == "cpu" and m <= EXACT_COND_M
    if host:  # decided on the host: reads are free
        kappa = _host_condition(G)
        if int(info) == 0 and math.isfinite(kappa) and kappa * thresh < 1.0:
            rank = torch.full((), m, dtype=torch.long)
            return GramFactor(G, L, None, None, rank, torch.full((), kappa, dtype=G.dtype))
    cond = torch.full((), kappa, dtype=G.dtype) if host else _condition(G, L)
    healthy = (info == 0) & (cond.isfinite()) & (cond * thresh < 1.0)
    full = torch.full((), m, dtype=torch.long, device=G.device)
    if not sync_free and not truncate and bool(healthy):  # one host read; free on the CPU
        return GramFactor(G, L, None, None, full, cond)
    if sync_free or not truncate:
        shift = max(thresh, 64 * torch.finfo(torch.float64).eps) * torch.diagonal(G).max()
        mu = torch.where(healthy, torch.zeros_like(shift), shift)
        L2, _ = torch.linalg.cholesky_ex(G + mu * torch.eye(m, dtype=G.dtype, device=G.device))
        rank = torch.where(healthy, full, -torch.ones_like(full))
        cond = torch.where(healthy, cond, torch.full_like(cond, float("inf")))
        # Refinement residuals use the unshifted G: iterated Tikhonov when mu > 0, plain refinement otherwise.
        return GramFactor(G, L2, None, None, rank, cond, refine=2)
    if bool(healthy):  # one host read; free on the CPU
        return GramFactor(G, L, None, None, full, cond)
    lam, Q = torch.linalg.eigh(G)
    lam_max = lam[-1].clamp_min(0.0)
    keep = lam > thresh * lam_max
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    kept_min = torch.where(keep, lam, torch.full_like(lam, float("inf"))).min()
    return GramFactor(G, None, Q, inv, keep.sum(), lam_max / kept_min)


def damped(
    factor: GramFactor,
    nu: Tensor | None,
    rank_tol: float,
    *,
    sync_free: bool = False,
    truncate: bool = True,
    workspace: Workspace | None = None,
) -> GramFactor:
    r"""The factor of :math:`G + \mu I`, :math:`\mu = \nu \cdot \operatorname{mean}_i G_{ii}` (Levenberg–Marquardt
    damping of the normal step; ``nu`` a 0-d float64 tensor), or ``factor`` itself when ``nu`` is ``None``.

    With it :func:`normal_step` gives :math:`v = -WJ^\top(G_W + \mu I)^{-1}c`, the minimiser of
    :math:`\tfrac12\|c + Jv\|^2 + \tfrac{\mu}{2}\|v\|_{W^{-1}}^2`: every component of the least-norm step
    along a singular direction :math:`\sigma_i` is multiplied by :math:`\sigma_i^2/(\sigma_i^2 + \mu)`, so the
    directions a nearly rank-deficient Jacobian barely sees stop dominating the step. μ is relative to the
    mean diagonal of G, so ν is dimensionless. The projector keeps using the undamped factor (:math:`J u = 0`
    exactly). ``sync_free`` and ``truncate`` as in :func:`factor_gram`: in exact mode a healthy damped matrix
    costs one factorisation, and when ``factor`` is a healthy Cholesky factor its condition estimate stands for
    the damped matrix's too (:math:`\kappa(G + \mu I) \le \kappa(G)` for :math:`\mu > 0`), so none is made.
    With a ``workspace`` the damped matrix and its factor go into its buffers."""
    if nu is None or factor.gram.shape[0] == 0:
        return factor
    m = factor.gram.shape[0]
    out = None if workspace is None else workspace.matrix("damped_gram", m, factor.gram.device)
    mu = _shift(factor.gram, nu)
    Gd = _shifted(factor.gram, mu, out=out)
    if not sync_free and factor.chol is not None and factor.refine == 0 and int(factor.rank) == m:
        L, info = _cholesky(Gd, workspace, "damped_chol")  # (one host read below: exact mode)
        if int(info) == 0:
            return GramFactor(Gd, L, None, None, factor.rank, factor.cond, shift=mu)
    return factor_gram(Gd, rank_tol, sync_free=sync_free, truncate=truncate, workspace=workspace, name="damped_chol")


def _shift(G: Tensor, nu: Tensor) -> Tensor:
    r""":math:`\mu = \nu\,\operatorname{mean}_i G_{ii}`."""
    return nu.to(G.dtype) * torch.diagonal(G).mean()


def _damped_gram(G: Tensor, nu: Tensor) -> Tensor:
    r""":math:`G + \mu I`, μ of :func:`_shift`."""
    return _shifted(G, _shift(G, nu))


def _shifted(G: Tensor, mu: Tensor, out: Tensor | None = None) -> Tensor:
    r""":math:`G + \mu I` (into ``out`` when given): one copy, no m x m identity."""
    out = G.clone() if out is None else out.copy_(G)
    out.diagonal().add_(mu)
    return out


def _cholesky(G: Tensor, workspace: Workspace | None, name: str) -> tuple[Tensor, Tensor]:
    """``torch.linalg.cholesky_ex(G)``, into the workspace's column-major buffer ``name`` when there is one."""
    out = None if workspace is None else workspace.cholesky_out(name, G.shape[0], G.device)
    return torch.linalg.cholesky_ex(G) if out is None else torch.linalg.cholesky_ex(G, out=out)


def normal_step(J: Tensor, c: Tensor, factor: GramFactor, weight: Tensor | None = None) -> Tensor:
    r"""Normal step :math:`v_W = -W J^\top G_W^{-1} c`, in ``J``'s dtype: :math:`J v_W = -c` (on the kept
    directions when :math:`J` is rank-deficient), and :math:`v_W` has the least :math:`W^{-1}`-norm among all
    such steps. ``factor`` must factor :math:`G_W` for the same ``weight``."""
    if J.shape[0] == 0:
        return J.new_zeros(J.shape[1])
    w = factor.solve(-c).to(J.dtype)  # [m]
    v = J.T @ w  # [n]
    return v if weight is None else v * weight


def scaled_normal_step(
    J: Tensor,
    c: Tensor,
    factor: GramFactor,
    gamma: float | Tensor,
    weight: Tensor | None = None,
    *,
    rank_tol: float,
    sync_free: bool = False,
    damping: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""``(δ_n, v)``: the normal displacement taken and the unscaled normal step :math:`v_W`.

    With one step size γ (a float), :math:`\delta_n = \gamma v_W`, so :math:`J\delta_n = -\gamma c`. With a
    per-coordinate γ (a ``[n]`` tensor: param groups with different normal step sizes), scaling :math:`v_W`
    coordinatewise would break that identity; instead :math:`\delta_n` is the :math:`W\Gamma`-weighted
    least-norm solution of :math:`J\delta = -\gamma_{\max} c`, so each group moves in proportion to its γ
    (one extra Gram matrix, only in that case). ``damping`` (ν, see :func:`damped`) replaces the least-norm
    solves by Levenberg–Marquardt ones; ``factor`` stays the undamped factor of :math:`G_W`."""
    v = normal_step(J, c, damped(factor, damping, rank_tol, sync_free=sync_free), weight)
    if not isinstance(gamma, Tensor):
        return gamma * v, v
    if J.shape[0] == 0:
        return v, v
    gmax = gamma.max()
    w = gamma / gmax if weight is None else weight * (gamma / gmax)
    Gw = gram(J, w) if damping is None else _damped_gram(gram(J, w), damping)  # only the damped one is solved
    Fw = factor_gram(Gw, rank_tol, sync_free=sync_free)
    return gmax * normal_step(J, c, Fw, w), v


def project(J: Tensor, x: Tensor, factor: GramFactor, weight: Tensor | None = None) -> Tensor:
    r"""Projection onto the null space of ``J`` along the range of :math:`WJ^\top`:
    :math:`P_W x = x - W J^\top G_W^{-1} J x`. :math:`J P_W x = 0`, :math:`P_W^2 = P_W`; for ``weight=None`` it
    is the orthogonal projector :math:`I - J^\top (JJ^\top)^{-1} J`."""
    return project_with_multipliers(J, x, factor, weight)[0]


def project_with_multipliers(
    J: Tensor, x: Tensor, factor: GramFactor, weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""``(P_W x, λ)`` with :math:`\lambda = -G_W^{-1}Jx`, so that :math:`P_W x = x + W J^\top \lambda`.
    For :math:`x = g` (and ``weight=None``) λ is the
    least-squares multiplier estimate :math:`\lambda = \arg\min_\mu \|g + J^\top\mu\|`, whose
    Lagrangian gradient :math:`g + J^\top\lambda` is the projected gradient. λ is float64, ``[m]``."""
    if J.shape[0] == 0:
        return x, x.new_zeros(0, dtype=torch.float64)
    y = factor.solve(J @ x)  # [m], float64
    r = J.T @ y.to(J.dtype)  # [n]
    return x - (r if weight is None else r * weight), -y


def kkt_reference(J: Tensor, p: Tensor, c: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Dense solve of :math:`[[H, J^\top], [J, 0]] [s; \lambda] = -[p; c]` with :math:`H = \operatorname{diag}(h)`
    (identity when ``h`` is ``None``), in float64. The oracle for the decomposition; O((n+m)^3), tests only."""
    m, n = J.shape
    J64, p64, c64 = J.to(torch.float64), p.to(torch.float64), c.to(torch.float64)
    H = torch.eye(n, dtype=torch.float64, device=J.device) if h is None else torch.diag(h.to(torch.float64))
    K = torch.cat([torch.cat([H, J64.T], 1), torch.cat([J64, J64.new_zeros(m, m)], 1)], 0)
    sol = torch.linalg.solve(K, -torch.cat([p64, c64]))
    return sol[:n], sol[n:]


def step_info(c: Tensor, factor: GramFactor | None, v: Tensor, u: Tensor) -> dict[str, object]:
    """Per-step diagnostics as device tensors (no host synchronisation): ``c_inf`` = max|c|, ``v_norm`` =
    ‖v_k‖, ``u_norm`` = ‖u_k‖, ``rank`` and ``gram_cond`` of the factor; ``truncated`` (a Python bool) says
    whether the exact mode fell back to the truncated eigendecomposition."""
    zero = v.new_zeros((), dtype=torch.float64)
    return {
        "c_inf": c.abs().max() if c.numel() else c.new_zeros(()),
        "v_norm": torch.linalg.vector_norm(v),
        "u_norm": torch.linalg.vector_norm(u),
        "rank": factor.rank if factor is not None else zero.long(),
        "gram_cond": factor.cond if factor is not None else zero + 1.0,
        "truncated": factor is not None and factor.chol is None,
    }


def masked(ok: Tensor, value: float | Tensor, fallback: float, like: Tensor) -> Tensor:
    """``value`` where ``ok`` else ``fallback``, in ``like``'s dtype and device, without a host-to-device copy
    (a Python scalar becomes a fill, not a copied tensor). Used to turn a refused step into an exact no-op."""
    if not isinstance(value, Tensor):
        value = torch.full((), value, dtype=like.dtype, device=like.device)
    return torch.where(ok, value, fallback)
