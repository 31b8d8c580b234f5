r"""Matrix-free solves with :math:`G_W = JWJ^\top`: MINRES and an inexact-SQP termination rule.

Every step of the package solves systems with :math:`G_W` (module :mod:`sqpoptim._linalg`). Without J in memory
they are solved by a Krylov method on :math:`G_W\lambda = b`, each iteration one :math:`J^\top` and one
:math:`J` product (:mod:`sqpoptim._jacobian_operator`). The method is MINRES on :math:`G_W` (not CG on
:math:`G_W`, nor LSQR/LSMR on J), for three reasons. The unknowns are m-vectors, the multipliers, so warm
starts from the last step's multipliers and a Jacobi preconditioner :math:`\operatorname{diag}(G_W)` (from the
row norms) apply directly (LSQR and LSMR iterate on n-vectors and start from the step). The
termination tests below are conditions on the residual :math:`\|r\|`, which MINRES minimises over the Krylov
space, so its residual never increases and a capped solve ends at the best iterate it saw. And the Gram
matrices of network Jacobians are very ill-conditioned — condition numbers 1e8 (m = 100) to 1e14 (m = 1000)
measured on a tanh MLP with 1e5 parameters, singular beyond — where CG's residual, which CG does not
minimise, was measured to grow by 10³–10⁴ over hundreds of iterations before falling.

The step. With :math:`H = W^{-1}` and the model gradient :math:`p = Hx` (x the tangential direction the method
wants: Adam's :math:`D^{-1}p`, the heavy-ball momentum, :math:`\alpha g`), the step :math:`s = \gamma v_W - P_W x`
solves

.. math::

    \begin{bmatrix} H & J^\top \\ J & 0 \end{bmatrix} \begin{bmatrix} s \\ \lambda \end{bmatrix}
    = -\begin{bmatrix} p \\ \gamma c \end{bmatrix},
    \qquad G_W\lambda = \gamma c - Jx,\quad s = -x - WJ^\top\lambda .

For any iterate :math:`\lambda_j` the first block holds exactly (dual residual :math:`\rho_j = 0`) and the primal
residual is the solver's residual, :math:`r_j = \gamma c + Js_j = (\gamma c - Jx) - G_W\lambda_j`. Iterations stop at
the first iterate that passes one of the termination tests of Byrd, Curtis and Nocedal ("An inexact SQP method
for equality constrained optimization", SIAM J. Optim. 19(1), 2008), with :math:`\rho = 0`, the merit function
:math:`\phi_\pi(x) = f(x) + \pi\|c(x)\|` and its model reduction
:math:`\operatorname{mred}_\pi(s) = -p^\top s + \pi(\|\gamma c\| - \|r\|)`:

* Test I: :math:`\|r_j\| \le \kappa\,\|(p + J^\top\lambda_0,\ \gamma c)\|` and
  :math:`\operatorname{mred}_\pi(s_j) \ge \tfrac12 s_j^\top H s_j + \sigma\pi\max(\|\gamma c\|, \|r_j\| - \|\gamma c\|)`
  (λ₀ the warm start, the last step's multipliers);
* Test II: :math:`\|r_j\| \le \epsilon\|\gamma c\|`; then π is raised to
  :math:`\max\{\pi,\ (p^\top s + \tfrac12 s^\top H s)/((1-\tau)(\|\gamma c\| - \|r\|)) + 10^{-4}\}`.

With :math:`\sigma = \tau(1-\epsilon)` either test gives :math:`\operatorname{mred}_\pi(s) \ge \tfrac12 s^\top Hs
+ \sigma\pi\|\gamma c\|`, so the directional derivative of :math:`\phi_\pi` along s (the stochastic gradient in
place of :math:`\nabla f`) is negative: every accepted step is a descent step for the merit function, however
inexact. π is optimizer state (it persists between steps, as in the paper). Deviations: H is the method's
positive-definite diagonal metric, so the paper's :math:`\max(\tfrac12 s^\top Hs, \theta\|s\|^2)` is
:math:`\tfrac12 s^\top Hs`; the iteration count is capped (``max_iter``), and a capped solve is reported
(``krylov_converged=False``) and its last iterate used; ``rtol`` replaces both tests by the classical
:math:`\|r\| \le \text{rtol}\,\|b\|` (solving "to tolerance", the oracle comparisons of the tests). Projections
that do not enter the step (the projected gradient fed to a method's moments) stop at
:math:`\|r\| \le \text{projection\_rtol}\,\|Jx\|`. The damped normal step, a solve of its own, stops at Test II and must
reach a tenth of its Cauchy point's decrease of the Levenberg–Marquardt model, or is that point
(:func:`cauchy_safeguard`).

Precision: the m-vectors (λ, r, the search directions) are float64; the products run in the parameters' dtype.
Every iteration reads a few scalars on the host (the recurrences and the termination tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._jacobian_operator import JacobianOperator

__all__ = [
    "CAUCHY_FRACTION",
    "KrylovOptions",
    "KrylovResult",
    "cauchy_safeguard",
    "inexact_step",
    "krylov_project",
    "minres",
]

CAUCHY_FRACTION = 0.1  # share of the Cauchy point's model decrease a damped normal step must reach


@dataclass(frozen=True)
class KrylovOptions:
    r"""Settings of the matrix-free solves (see the module docstring for their meaning).

    ``max_iter`` bounds the work of a solve: an iteration costs a :math:`J` and a :math:`J^\top` product, about a
    forward and a backward pass over the m constraint points, so the default of 10 keeps a step within about 25
    such passes. On the very ill-conditioned Gram matrices of large networks the termination tests are often not
    met within it (measured: m = 10,000 pointwise constraints of a 10⁵-parameter tanh MLP); the step then takes
    the capped iterate, whose residual MINRES has made as small as the Krylov space allows, and
    ``diagnostics()`` reports ``krylov_converged=False``. Raise it (or set ``rtol``) for accurate solves.

    ``jacobi`` preconditions MINRES with :math:`\operatorname{diag}(G_W)`. Off by default because it did not pay
    where measured: on the Gram matrices of the scaling benchmark's MLP (m = 1,000 and 3,000) the linearised
    residual after 10 and after 50 iterations was the same with and without it (within 1 %), and its row norms
    cost a pass over the factors."""

    max_iter: int = 10  # iterations per solve (see the class docstring)
    kappa: float = 0.1  # Test I: residual relative to the KKT residual at the warm start
    epsilon: float = 0.1  # Test II: residual relative to ||γ c||
    tau: float = 0.1  # share of the model reduction kept when π is raised (σ = τ(1 - ε))
    penalty0: float = 1.0  # π before the first step
    projection_rtol: float = 1e-2
    rtol: float | None = None  # solve every system to ||r|| <= rtol ||b|| instead of the tests
    jacobi: bool = False  # diagonal preconditioner diag(G_W) (see the class docstring)

    def __post_init__(self) -> None:
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ValueError(f"Invalid krylov max_iter: {self.max_iter!r} (a positive int)")
        for name in ("kappa", "epsilon", "tau", "projection_rtol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
                raise ValueError(f"Invalid krylov {name}: {value!r} (expected 0 < {name} < 1)")
        if not (isinstance(self.penalty0, (int, float)) and self.penalty0 > 0.0):
            raise ValueError(f"Invalid krylov penalty0: {self.penalty0!r} (expected > 0)")
        if self.rtol is not None and not (isinstance(self.rtol, (int, float)) and 0.0 < self.rtol < 1.0):
            raise ValueError(f"Invalid krylov rtol: {self.rtol!r} (None or 0 < rtol < 1)")


@dataclass
class KrylovResult:
    """λ, :math:`z = WJ^\\top\\lambda` (parameters' dtype), the recurrence residual r (float64), iterations,
    and whether a stopping rule (rather than the cap) ended the iteration. ``first``: the images
    :math:`(WJ^\\top b,\\ JWJ^\\top b)` of the right-hand side that an unpreconditioned solve from zero forms in
    its first iteration, where asked for (``keep_first``) and formed."""

    lam: Tensor
    z: Tensor
    r: Tensor
    iterations: int
    converged: bool
    first: tuple[Tensor, Tensor] | None = None


def minres(
    op: JacobianOperator,
    b: Tensor,
    lam0: Tensor | None,
    *,
    weight: Tensor | None,
    shift: float | Tensor = 0.0,
    inv_diag: Tensor | None,
    stop: Callable[[Tensor, Tensor, Tensor], bool],
    max_iter: int,
    keep_first: bool = False,
) -> KrylovResult:
    r"""Preconditioned MINRES (Paige and Saunders, SIAM J. Numer. Anal. 12(4), 1975) on
    :math:`(JWJ^\top + \mu I)\lambda = b` (float64 ``b``), keeping :math:`z = WJ^\top\lambda` and the residual
    :math:`r = b - (JWJ^\top + \mu I)\lambda` alongside (both by the recurrences of the search directions, so an
    iteration costs one :math:`J^\top` and one :math:`J` product). ``stop(lam, z, r)`` is asked at the start and
    after every iteration. ``inv_diag`` (a positive ``[m]``) is the Jacobi preconditioner :math:`M^{-1}`; MINRES
    then minimises :math:`\|r\|_{M^{-1}}` over the Krylov space. ``keep_first``: keep the first iteration's images
    of b (``KrylovResult.first``, for the Cauchy point of :func:`cauchy_safeguard`; formed only by an
    unpreconditioned solve started from zero)."""
    dtype = op.dtype

    def wjt(y: Tensor) -> Tensor:
        t = op.rmv(y.to(dtype))
        return t if weight is None else t * weight

    def precond(y: Tensor) -> Tensor:
        return y if inv_diag is None else y * inv_diag

    cold = lam0 is None or not bool(lam0.any())
    if cold:
        lam = torch.zeros_like(b)
        z = torch.zeros(op.n, dtype=dtype, device=b.device)
        r = b.clone()
    else:
        lam = lam0.to(b.dtype).clone()
        z = wjt(lam)
        r = b - op.mv(z).double() - shift * lam
        if float(torch.linalg.vector_norm(r)) >= float(torch.linalg.vector_norm(b)):  # a warm start worse than 0
            lam, z, r = torch.zeros_like(b), torch.zeros_like(z), b.clone()
            cold = True
    keep_first = keep_first and cold and inv_diag is None
    first = None
    if stop(lam, z, r):
        return KrylovResult(lam, z, r, 0, True)
    y = precond(r)
    beta1 = float(torch.dot(r, y))
    if not beta1 > 0.0:  # r = 0 (nothing to solve) or a non-positive preconditioner
        return KrylovResult(lam, z, r, 0, beta1 == 0.0)
    beta = math.sqrt(beta1)
    r1, r2 = r, r
    oldb, dbar, epsln, cs, sn = 0.0, 0.0, 0.0, -1.0, 0.0
    phibar = beta
    # search directions w (m), their images W J^T w (n) and (G + mu I) w (m), two back
    w = w2 = torch.zeros_like(b)
    wt = wt2 = torch.zeros_like(z)
    gw = gw2 = torch.zeros_like(b)
    for it in range(1, max_iter + 1):
        v = y / beta
        vt = wjt(v)
        gv = op.mv(vt).double() + shift * v  # (G + mu I) v
        if it == 1 and keep_first:  # v = b / ||b||: the images of b
            first = (vt * beta, (gv - shift * v) * beta)
        y = gv if it == 1 else gv - (beta / oldb) * r1
        alfa = float(torch.dot(v, y))
        y = y - (alfa / beta) * r2
        r1, r2 = r2, y
        y = precond(r2)
        oldb = beta
        beta = math.sqrt(max(float(torch.dot(r2, y)), 0.0))
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = max(math.hypot(gbar, beta), 1e-300)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        wt1, wt2 = wt2, wt
        wt = (vt - oldeps * wt1 - delta * wt2) / gamma
        gw1, gw2 = gw2, gw
        gw = (gv - oldeps * gw1 - delta * gw2) / gamma
        lam = lam + phi * w
        z = z + phi * wt
        r = r - phi * gw
        if stop(lam, z, r):
            return KrylovResult(lam, z, r, it, True, first)
        if beta == 0.0:  # the Krylov space is exhausted: lam is the (least-squares) solution on it
            return KrylovResult(lam, z, r, it, False, first)
    return KrylovResult(lam, z, r, max_iter, False, first)


def cauchy_safeguard(
    op: JacobianOperator,
    b: Tensor,
    res: KrylovResult,
    shift: float,
    *,
    weight: Tensor | None,
    fraction: float = CAUCHY_FRACTION,
) -> tuple[Tensor, Tensor, bool]:
    r"""The normal step :math:`v = WJ^\top\lambda` of a solve of :math:`(JWJ^\top + \mu I)\lambda = b` (``res``,
    :math:`b = -c`), or the Cauchy point where it falls short of a fraction of the Cauchy decrease; returns
    ``(λ, v, replaced)``.

    The damped normal step is the minimiser of the Levenberg–Marquardt model
    :math:`q(v) = \tfrac12\|c + Jv\|^2 + \tfrac12\mu\|v\|^2_{W^{-1}}`, and MINRES on the shifted system
    minimises another function over the Krylov space, :math:`\|b - (G_W + \mu I)\lambda\|`; a truncated
    iterate can raise q — and even the linearised violation :math:`\|c + Jv\| = \|r + \mu\lambda\|`, which
    the exact step never does. Following the normal-component condition of Byrd, Curtis and Nocedal ("An inexact
    SQP method for equality constrained optimization", SIAM J. Optim. 19(1), 2008) and Curtis, Nocedal and
    Wächter ("A matrix-free algorithm for equality constrained optimization problems with rank-deficient
    Jacobians", SIAM J. Optim. 20(3), 2009), the step must reduce q by at least ``fraction`` of what the Cauchy
    point reduces it, the minimiser of q along the steepest descent direction :math:`WJ^\top b`:

    .. math::

        v_C = t\,WJ^\top b,\qquad t = \frac{b^\top G_W b}{\|G_W b\|^2 + \mu\, b^\top G_W b},\qquad
        q(0) - q(v) \ge \text{fraction}\,(q(0) - q(v_C));

    otherwise the step is :math:`v_C`. Every step so taken has :math:`q(v) < q(0)`, hence
    :math:`\|c + Jv\| < \|c\|` (unless :math:`J^\top c = 0`, where it is 0): the linear model predicts a
    decrease, as for the exact step, so the damping's ratio test judges it. With :math:`G_W\lambda = b - r -
    \mu\lambda`, q of the iterate costs m-vector products only; :math:`WJ^\top b` and :math:`G_W b` are the
    solve's first iteration (``res.first``) or, where it did not form them (a warm or preconditioned start), one
    more :math:`J^\top` and :math:`J` product."""
    lam, r = res.lam, res.r
    Glam = b - r - shift * lam  # G_W λ
    q0 = 0.5 * float(torch.dot(b, b))
    q = 0.5 * float(torch.linalg.vector_norm(b - Glam)) ** 2 + 0.5 * shift * float(torch.dot(lam, Glam))
    if res.first is not None:
        wjtb, gb = res.first
    else:
        wjtb = op.rmv(b.to(op.dtype))
        wjtb = wjtb if weight is None else wjtb * weight
        gb = op.mv(wjtb).double()
    bgb = float(torch.dot(b, gb))  # b^T G_W b = ||W^{1/2} J^T b||^2 >= 0
    t = bgb / (float(torch.dot(gb, gb)) + shift * bgb) if bgb > 0.0 else 0.0
    qc = 0.5 * float(torch.linalg.vector_norm(b - t * gb)) ** 2 + 0.5 * shift * t * t * bgb
    if q0 - q >= fraction * (q0 - qc):
        return lam, res.z, False
    return t * b, t * wjtb, True


def _inv_diag(op: JacobianOperator, weight: Tensor | None, enabled: bool) -> Tensor | None:
    if not enabled:
        return None
    d = op.row_sq_norms(weight)
    return torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), torch.ones_like(d))


def krylov_project(
    op: JacobianOperator,
    x: Tensor,
    lam0: Tensor | None,
    options: KrylovOptions,
    *,
    weight: Tensor | None = None,
    inv_diag: Tensor | None = None,
) -> tuple[Tensor, KrylovResult]:
    r""":math:`P_W x = x - WJ^\top\lambda` with :math:`G_W\lambda \approx Jx` (stopping at
    :math:`\|r\| \le \text{projection\_rtol}\,\|Jx\|`, or ``rtol`` when set); warm-started from ``lam0``."""
    b = op.mv(x).double()
    target = (options.rtol if options.rtol is not None else options.projection_rtol) * float(
        torch.linalg.vector_norm(b)
    )
    res = minres(
        op,
        b,
        lam0,
        weight=weight,
        inv_diag=inv_diag,
        stop=lambda lam, z, r: float(torch.linalg.vector_norm(r)) <= target,
        max_iter=options.max_iter,
    )
    return x - res.z, res


def inexact_step(
    op: JacobianOperator,
    x: Tensor,
    c: Tensor,
    gamma: float,
    lam0: Tensor | None,
    penalty: float,
    options: KrylovOptions,
    *,
    weight: Tensor | None = None,
    inv_diag: Tensor | None = None,
) -> tuple[Tensor, KrylovResult, dict[str, float]]:
    r"""``(s, cg, info)``: the step :math:`s = \gamma v_W - P_W x` of the module docstring from one MINRES solve
    with the termination tests of Byrd, Curtis and Nocedal (2008); ``info`` has the test that ended it
    (1, 2, 0 for ``rtol``, -1 when capped), the new penalty π and the final relative residual."""
    gc = gamma * c.double()
    b = gc - op.mv(x).double()
    gc_norm = float(torch.linalg.vector_norm(gc))
    H = None if weight is None else weight.reciprocal()
    p = x if H is None else H * x
    sigma = options.tau * (1.0 - options.epsilon)
    which = [-1]
    kkt0 = [math.nan]

    def stop(lam: Tensor, z: Tensor, r: Tensor) -> bool:
        rn = float(torch.linalg.vector_norm(r))
        if options.rtol is not None:
            which[0] = 0
            return rn <= options.rtol * max(float(torch.linalg.vector_norm(b)), 1e-300)
        s = -(x + z)
        if math.isnan(kkt0[0]):  # dual residual at the warm start: p + J^T λ0 = H(x + z0)
            dual = x + z if H is None else H * (x + z)
            kkt0[0] = math.hypot(float(torch.linalg.vector_norm(dual)), gc_norm)
        if rn <= options.epsilon * gc_norm:
            which[0] = 2
            return True
        Hs = s if H is None else H * s
        sHs = float(torch.dot(s, Hs))
        mred = -float(torch.dot(p, s)) + penalty * (gc_norm - rn)
        if rn <= options.kappa * kkt0[0] and mred >= 0.5 * sHs + sigma * penalty * max(gc_norm, rn - gc_norm):
            which[0] = 1
            return True
        return False

    res = minres(op, b, lam0, weight=weight, inv_diag=inv_diag, stop=stop, max_iter=options.max_iter)
    s = -(x + res.z)
    rn = float(torch.linalg.vector_norm(res.r))
    if not res.converged:
        which[0] = -1
    new_penalty = penalty
    if which[0] == 2 and gc_norm > rn:
        Hs = s if H is None else H * s
        trial = (float(torch.dot(p, s)) + 0.5 * float(torch.dot(s, Hs))) / ((1.0 - options.tau) * (gc_norm - rn))
        if trial > penalty:
            new_penalty = trial + 1e-4
    info = {
        "krylov_test": float(which[0]),
        "penalty": new_penalty,
        "krylov_residual": rn / max(float(torch.linalg.vector_norm(b)), 1e-300),
    }
    return s, res, info
