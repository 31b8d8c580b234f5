r"""Small hard-constrained problems written as a new user would write them, each with an exact solution.

Every problem is a tiny tanh network trained with an optimizer's *default* settings — only the learning rate and
the number of steps are chosen, as a user would — and judged against its closed-form solution on a dense grid
that lies *between* the constraint points, not only at them. A run that satisfies its constraints at the chosen
points while the function between them is wrong (the failure of an overshooting normal step: the network
interpolates the constraint points with a wild function) fails the check.

The problems (none of them is in ``problems/``):

``poisson``
    :math:`u'' = -\pi^2\sin\pi x` on [0, 1], :math:`u(0) = u(1) = 0`; the ODE residual at 20 points is the
    hard constraint, the boundary values are the objective. Exact :math:`u = \sin\pi x`.
``heat``
    :math:`u_t = \kappa u_{xx}` on [0, 1] × [0, 1], κ = 0.1; the PDE residual at 24 points is the constraint,
    the initial and boundary values are the objective. Exact :math:`u = e^{-\kappa\pi^2 t}\sin\pi x`.
``advection``
    :math:`u_t + a u_x = 0` on [0, 1] × [0, 1], a = 0.5; the PDE residual at 16 points is the constraint, the
    initial and inflow values and the mean squared residual at 64 other points are the objective. Exact
    :math:`u = \sin\pi(x - at)`.
``stiff``
    :math:`y' = -\lambda(y - \cos t) - \sin t` on [0, 2], λ = 10, :math:`y(0) = 0`; the initial value and the
    ODE residual at 10 points of the boundary layer are the constraints, the mean squared residual at 64 other
    points is the objective. Exact :math:`y = \cos t - e^{-\lambda t}`.
``oscillator``
    :math:`x'' + \omega^2 x = 0` on [0, 2], ω = 2, :math:`x(0) = 1,\ x'(0) = 0`; the initial values and the
    energy :math:`\tfrac12(x'^2 + \omega^2x^2) = \tfrac12\omega^2` at 16 points (conservation) are the
    constraints, the mean squared ODE residual at 64 points is the objective. Exact :math:`x = \cos\omega t`.
    The constant x ≡ 1 also satisfies every constraint (a feasible trap with objective 16): from some
    initialisations the run ends there whatever the normal step (with the default, Adam from seeds 0-9: six in
    ten in float32, one or two in ten in float64).
``mass_balance``
    A → B at rate k = 2 on [0, 1.5], the network gives (a, b); the total mass a + b = 1 at 16 points and
    a(0) = 1 are the constraints, the mean squared rate equations :math:`a' = -ka,\ b' = ka` at 64 points are
    the objective. Exact :math:`a = e^{-kt},\ b = 1 - e^{-kt}`.

Each problem states its learning rate and number of steps per optimizer, and its tolerance: the largest error
against the exact solution on the evaluation grid, relative to the solution's largest value — 3 % for every
problem, about twice the worst error the default settings left at the tests' seed (RESULTS.md, "Defaults for
a first problem"); the papers' undamped normal step misses by 100 % to 10⁶ % on poisson, stiff and oscillator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["PROBLEMS", "Outcome", "UserProblem", "mlp", "train"]


def mlp(inputs: int, outputs: int, width: int, dtype: torch.dtype, seed: int) -> nn.Sequential:
    """``inputs``-width-width-``outputs`` tanh network with torch's default initialisation (as a user writes it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Linear(inputs, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, outputs)
        )
    return net.to(dtype)


def _d(y: Tensor, x: Tensor) -> Tensor:
    """dy/dx for a batch of scalar outputs ``y`` [N] of inputs ``x`` [N, d] (each y_i depends on x_i only)."""
    return torch.autograd.grad(y.sum(), x, create_graph=True)[0]


def _points(n: int, lo: float, hi: float, dtype: torch.dtype) -> Tensor:
    """n interior points of [lo, hi], equally spaced, as an ``[n, 1]`` column."""
    return torch.linspace(lo, hi, n + 2, dtype=dtype)[1:-1].unsqueeze(1)


def _grid2(n: int, dtype: torch.dtype, seed: int) -> Tensor:
    """n quasi-random points of the unit square (a scrambled Sobol sequence)."""
    return torch.quasirandom.SobolEngine(2, scramble=True, seed=seed).draw(n).to(dtype)


@dataclass(frozen=True)
class Setup:
    """One instance of a problem: the network, the closure (objective, c), and the exact solution with the
    evaluation points between the constraint points."""

    model: nn.Module
    closure: Callable[[], tuple[Tensor, Tensor]]
    exact: Callable[[Tensor], Tensor]
    grid: Tensor


@dataclass(frozen=True)
class UserProblem:
    name: str
    build: Callable[[torch.dtype, int], Setup]
    settings: dict[str, tuple[float, int]]  # (learning rate, steps) per optimizer class name
    tolerance: float  # largest error on the grid, relative to max |exact|


@dataclass(frozen=True)
class Outcome:
    error: float  # max |u - exact| on the grid / max |exact|
    c_inf: float  # max |c| at the end
    first_step: float  # ‖δ_1‖, the first step's norm
    theta: float  # ‖θ_0‖
    rejected: int


# ----------------------------------------------------------------------------------------------------- problems
def _poisson(dtype: torch.dtype, seed: int) -> Setup:
    net = mlp(1, 1, 20, dtype, seed)
    xc = _points(20, 0.0, 1.0, dtype).requires_grad_(True)
    xb = torch.tensor([[0.0], [1.0]], dtype=dtype)

    def closure():
        u = net(xc)
        u_xx = _d(_d(u, xc), xc)
        return (net(xb) ** 2).mean(), (u_xx + math.pi**2 * torch.sin(math.pi * xc)).squeeze(1)

    grid = torch.linspace(0, 1, 401, dtype=dtype).unsqueeze(1)
    return Setup(net, closure, lambda x: torch.sin(math.pi * x), grid)


_KAPPA = 0.1


def _heat(dtype: torch.dtype, seed: int) -> Setup:
    net = mlp(2, 1, 20, dtype, seed)
    z = _grid2(24, dtype, seed=1).requires_grad_(True)  # (x, t)
    z_data = _edges(dtype, x1=True)
    u_data = _heat_exact(z_data)

    def closure():
        du = _d(net(z), z)
        u_xx = _d(du[:, :1], z)[:, :1]
        return ((net(z_data) - u_data) ** 2).mean(), (du[:, 1:] - _KAPPA * u_xx).squeeze(1)

    return Setup(net, closure, _heat_exact, _grid2(1024, dtype, seed=7))


def _edges(dtype: torch.dtype, x1: bool) -> Tensor:
    """21 points on each of t = 0 and x = 0 (and x = 1 if ``x1``) of the unit square, as (x, t) rows."""
    s = torch.linspace(0, 1, 21, dtype=dtype).unsqueeze(1)
    zero, one = torch.zeros_like(s), torch.ones_like(s)
    edges = [torch.cat([s, zero], 1), torch.cat([zero, s], 1)] + ([torch.cat([one, s], 1)] if x1 else [])
    return torch.cat(edges)


def _heat_exact(z: Tensor) -> Tensor:
    return torch.exp(-_KAPPA * math.pi**2 * z[:, 1:]) * torch.sin(math.pi * z[:, :1])


_SPEED = 0.5


def _advection_exact(z: Tensor) -> Tensor:
    return torch.sin(math.pi * (z[:, :1] - _SPEED * z[:, 1:]))


def _advection(dtype: torch.dtype, seed: int) -> Setup:
    net = mlp(2, 1, 20, dtype, seed)
    z_c = _grid2(16, dtype, seed=3).requires_grad_(True)
    z_o = _grid2(64, dtype, seed=4).requires_grad_(True)
    z_data = _edges(dtype, x1=False)  # t = 0 and the inflow boundary x = 0
    u_data = _advection_exact(z_data)

    def residual(z):
        du = _d(net(z), z)
        return du[:, 1] + _SPEED * du[:, 0]

    def closure():
        return ((net(z_data) - u_data) ** 2).mean() + (residual(z_o) ** 2).mean(), residual(z_c)

    return Setup(net, closure, _advection_exact, _grid2(1024, dtype, seed=7))


_LAMBDA = 10.0


def _stiff(dtype: torch.dtype, seed: int) -> Setup:
    net = mlp(1, 1, 20, dtype, seed)
    t_c = _points(10, 0.0, 0.3, dtype).requires_grad_(True)  # the boundary layer e^{-λt}
    t_o = _points(64, 0.0, 2.0, dtype).requires_grad_(True)
    t0 = torch.zeros(1, 1, dtype=dtype)

    def residual(t):
        y = net(t)
        return (_d(y, t) + _LAMBDA * (y - torch.cos(t)) + torch.sin(t)).squeeze(1)

    def closure():
        return (residual(t_o) ** 2).mean(), torch.cat([net(t0).squeeze(1), residual(t_c)])

    exact = lambda t: torch.cos(t) - torch.exp(-_LAMBDA * t)  # noqa: E731
    return Setup(net, closure, exact, torch.linspace(0, 2, 401, dtype=dtype).unsqueeze(1))


_OMEGA = 2.0


def _oscillator(dtype: torch.dtype, seed: int) -> Setup:
    net = mlp(1, 1, 20, dtype, seed)
    t_c = _points(16, 0.0, 2.0, dtype).requires_grad_(True)
    t_o = _points(64, 0.0, 2.0, dtype).requires_grad_(True)
    t0 = torch.zeros(1, 1, dtype=dtype, requires_grad=True)

    def closure():
        x = net(t_o)
        residual = _d(_d(x, t_o), t_o) + _OMEGA**2 * x
        xc = net(t_c)
        energy = 0.5 * (_d(xc, t_c) ** 2 + _OMEGA**2 * xc**2) - 0.5 * _OMEGA**2
        x0 = net(t0)
        c = torch.cat([(x0 - 1.0).squeeze(1), _d(x0, t0).squeeze(1), energy.squeeze(1)])
        return (residual**2).mean(), c

    exact = lambda t: torch.cos(_OMEGA * t)  # noqa: E731
    return Setup(net, closure, exact, torch.linspace(0, 2, 401, dtype=dtype).unsqueeze(1))


_RATE = 2.0


def _mass_balance(dtype: torch.dtype, seed: int) -> Setup:
    net = mlp(1, 2, 20, dtype, seed)
    t_c = _points(16, 0.0, 1.5, dtype)
    t_o = _points(64, 0.0, 1.5, dtype).requires_grad_(True)
    t0 = torch.zeros(1, 1, dtype=dtype)

    def closure():
        ab = net(t_o)
        a, b = ab[:, :1], ab[:, 1:]
        rates = torch.cat([_d(a, t_o) + _RATE * a, _d(b, t_o) - _RATE * a], 1)
        c = torch.cat([net(t_c).sum(1) - 1.0, net(t0)[:, 0] - 1.0])
        return (rates**2).mean(), c

    def exact(t):
        a = torch.exp(-_RATE * t)
        return torch.cat([a, 1.0 - a], 1)

    return Setup(net, closure, exact, torch.linspace(0, 1.5, 401, dtype=dtype).unsqueeze(1))


_ADAM, _HB = "ProjectedAdamSQP", "ProjectedHeavyBallSQP"

PROBLEMS: dict[str, UserProblem] = {
    p.name: p
    for p in [
        UserProblem("poisson", _poisson, {_ADAM: (1e-2, 300), _HB: (0.3, 300)}, 3e-2),
        UserProblem("heat", _heat, {_ADAM: (1e-2, 300), _HB: (1.0, 1500)}, 3e-2),
        UserProblem("advection", _advection, {_ADAM: (1e-2, 300), _HB: (1.0, 600)}, 3e-2),
        UserProblem("stiff", _stiff, {_ADAM: (1e-2, 300), _HB: (3e-2, 300)}, 3e-2),
        UserProblem("oscillator", _oscillator, {_ADAM: (1e-2, 600), _HB: (0.3, 1000)}, 3e-2),
        UserProblem("mass_balance", _mass_balance, {_ADAM: (1e-2, 300), _HB: (0.3, 300)}, 3e-2),
    ]
}


def train(
    problem: UserProblem,
    optimizer: type[torch.optim.Optimizer],
    dtype: torch.dtype,
    *,
    seed: int = 0,
    steps: int | None = None,
    **options,
) -> Outcome:
    """Train ``problem`` with ``optimizer(params, lr=<the problem's>, **options)`` and measure the outcome."""
    setup = problem.build(dtype, seed)
    params = list(setup.model.parameters())
    theta = float(torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in params])))
    lr, default_steps = problem.settings[optimizer.__name__]
    opt = optimizer(params, lr=lr, **options)
    first = math.nan
    for k in range(default_steps if steps is None else steps):
        opt.step(setup.closure)
        if k == 0:
            first = float(opt.diagnostics()["step_norm"])
    c = setup.closure()[1]  # at the final parameters (step returns the values it started from)
    with torch.no_grad():
        exact = setup.exact(setup.grid)
        err = (setup.model(setup.grid) - exact).abs().max() / exact.abs().max()
    rejected = opt.diagnostics().get("rejected_steps", 0)
    return Outcome(float(err), float(c.detach().abs().max()), first, theta, int(rejected))
