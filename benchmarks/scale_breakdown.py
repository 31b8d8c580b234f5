"""Where a ProjectedAdamSQP step's time goes, phase by phase (the scaling benchmark's model and closure).

The phases of ``ConstrainedOptimizer.step`` are re-run one by one with the library's own functions and timed in
process CPU time (median over steps): the closure's forwards (objective and the m constraint points, with the
``nn.Linear`` calls recorded), the Jacobian operator (the layer factors' backward pass), the objective's
gradient, the Gram matrix and its factorisation (dense) or the row norms (matrix-free), and the direction (the
projections, the normal step and the moments; for the matrix-free solver all its MINRES iterations). As in the
optimizer, the dense solver keeps its matrices in a workspace reused from step to step, and the normal step is
damped with the default ν0 (a second factorisation, of G + μI, in the direction).

    python benchmarks/scale_breakdown.py --constraints 100,1000,10000 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scale_grid import WIDTHS, mlp  # (run as a script: benchmarks/ is on the path)

from sqpoptim._damping import DEFAULT_NU0
from sqpoptim._gradient import flat_gradient
from sqpoptim._jacobian_path import JacobianPath
from sqpoptim._krylov import KrylovOptions
from sqpoptim._layout import build_layout
from sqpoptim._solver_choice import make_solver
from sqpoptim._workspace import Workspace
from sqpoptim.adam import adam_sqp_direction


def breakdown(m: int, n: float, solver: str, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = mlp(WIDTHS[n])
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.rand(1024, 8, generator=gen), torch.rand(1024, 1, generator=gen)
    Xc, Yc = torch.rand(m, 8, generator=gen), torch.rand(m, generator=gen)
    layout = build_layout([{"params": list(model.parameters())}])
    path = JacobianPath("auto", None)
    exp_avg, exp_avg_sq = torch.zeros(layout.n), torch.zeros(layout.n)
    krylov_state: dict = {}
    workspace = Workspace()  # the optimizer's reused m x m buffers
    nu = torch.tensor(DEFAULT_NU0, dtype=torch.float64)  # the default damping's first ν
    times: dict[str, list[float]] = {}

    def tick(name: str, t0: float) -> float:
        t1 = time.process_time()
        times.setdefault(name, []).append(t1 - t0)
        return t1

    for k in range(1, steps + 1):
        t = time.process_time()
        with torch.enable_grad():
            with path.recording(True) as recorder:
                loss, c = ((model(X) - Y) ** 2).mean(), model(Xc).squeeze(1) - Yc
            t = tick("forwards", t)
            op, keep = path.operator(c, None, layout, recorder, solver=solver)
            t = tick("J operator", t)
            g = flat_gradient(loss, layout, retain_graph=keep)
            t = tick("gradient", t)
        S = make_solver(
            op, solver, rank_tol=1e-6, sync_free=False, options=KrylovOptions(), state=krylov_state, workspace=workspace
        )
        S.row_check()
        if S.kind == "dense":
            S.factor  # noqa: B018 - the factorisation, timed here
        t = tick("Gram + factor" if S.kind == "dense" else "row norms", t)
        delta, _ = adam_sqp_direction(
            g, c.detach(), S, exp_avg, exp_avg_sq, float(k), lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-7,
            normal_lr=1.0, rank_tol=1e-6, damping=nu,
        )  # fmt: skip
        S.commit()
        with torch.no_grad():
            layout.add_(delta)
        tick("direction", t)
    return {name: 1e3 * statistics.median(v[1:] if len(v) > 1 else v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--constraints", default="100,1000,10000")
    parser.add_argument("--params", default="1e5")
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| m | n | phase | ms (CPU) |\n|---:|---:|---|---:|")
    for n in (float(v) for v in args.params.split(",")):
        for m in (int(v) for v in args.constraints.split(",")):
            for phase, ms in breakdown(m, n, args.solver, args.steps).items():
                print(f"| {m:,} | {n:g} | {phase} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
