"""Feasibility from a random network: max|c| per step of the default ProjectedAdamSQP with and without the trust
radius of the damped normal step, and the best any damping could do.

The problem is the scaling benchmark's (``benchmarks/scale_grid.py``): a tanh MLP 8 → 224 → 224 → 224 → 1
(n = 103,041), a mean squared error over a batch, and m output constraints at random points equal to random
targets in [0, 1]. ``--variant radius`` is the package's default; ``--variant nu`` replaces the radius by the
ν-damped step alone (the rule before the radius: ν doubles per failure), by patching
``sqpoptim._optimizer.damping_within``. Each line: step k, max|c| and ‖c‖ at the point the step returned, ν
applied, ρ, ‖v‖, Δ, rejected, CPU seconds.

``--oracle`` instead runs the greedy oracle: float64, the explicit J (``torch.func.jacrev``), and at every step the
Levenberg–Marquardt step v(μ) = -Jᵀ(JJᵀ + μI)⁻¹c for ν = μ/mean diag(JJᵀ) on a grid from 1e-6 to 3, taking the one
whose new ‖c‖ is least (no objective, no rejection): what the best choice of damping at each step reaches.

    python benchmarks/normal_step_trust.py --m 100 --variant radius --steps 21
    python benchmarks/normal_step_trust.py --m 100 --oracle --steps 12
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_grid import mlp

import sqpoptim

GRID = (1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


def problem(m: int, batch: int, dtype: torch.dtype):
    torch.manual_seed(0)
    model = mlp(224).to(dtype)
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.rand(1024, 8, generator=gen), torch.rand(1024, 1, generator=gen)
    Xc, Yc = torch.rand(m, 8, generator=gen), torch.rand(m, generator=gen)
    X, Y, Xc, Yc = (t.to(dtype) for t in (X[:batch], Y[:batch], Xc, Yc))
    return model, X, Y, Xc, Yc


def run(m: int, batch: int, steps: int, variant: str, lr: float) -> None:
    if variant == "nu":
        sqpoptim._optimizer.damping_within = lambda S, c, nu, *a, **k: (nu, torch.zeros((), dtype=torch.bool))
    model, X, Y, Xc, Yc = problem(m, batch, torch.float32)
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=lr)

    def closure():
        return ((model(X) - Y) ** 2).mean(), model(Xc).squeeze(1) - Yc

    print(f"# m={m} batch={batch} variant={variant} lr={lr}")
    for k in range(steps):
        t0 = time.process_time()
        _, c = opt.step(closure)
        d = opt.diagnostics()
        print(
            f"{k:3d} max|c|={float(c.abs().max()):.3g} |c|={float(c.norm()):.3g} nu={d.get('damping', math.nan):.3g} "
            f"rho={d.get('damping_ratio', math.nan):.3g} |v|={d['v_norm']:.3g} radius={d.get('radius', math.nan):.3g} "
            f"rejected={d.get('rejected')} cpu={time.process_time() - t0:.2f}",
            flush=True,
        )


def oracle(m: int, steps: int) -> None:
    from torch.func import functional_call, jacrev

    model, _, _, Xc, Yc = problem(m, 1, torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def cfun(x):
        params = {n: t.view(s) for n, t, s in zip(names, x.split(sizes), shapes)}
        return functional_call(model, params, (Xc,)).squeeze(1) - Yc

    x = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    print(f"# m={m} greedy oracle over nu in {GRID}")
    for k in range(steps):
        c = cfun(x)
        J = jacrev(cfun)(x)
        G = J @ J.T
        scale = G.diagonal().mean()
        best = None
        row = []
        for nu in GRID:
            v = -J.T @ torch.linalg.solve(G + nu * scale * torch.eye(m, dtype=G.dtype), c)
            new = float(cfun(x + v).norm())
            row.append(f"{nu:g}:{new:.3g}")
            if best is None or new < best[0]:
                best = (new, v, nu)
        print(
            f"{k:3d} max|c|={float(c.abs().max()):.3g} |c|={float(c.norm()):.3g} best nu={best[2]:g} | " + " ".join(row)
        )
        x = x + best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--variant", choices=("radius", "nu"), default="radius")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--oracle", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.oracle:
        oracle(args.m, args.steps)
    else:
        run(args.m, args.batch, args.steps, args.variant, args.lr)


if __name__ == "__main__":
    main()
