"""Constraints by the thousand: ProjectedAdamSQP's step against torch.optim.Adam over m constraints and n parameters.

The model is a tanh MLP 8 → w → w → w → 1 (w = 224 for n ≈ 1e5, w = 705 for n ≈ 1e6), the objective a mean
squared error over a batch of 1024, the constraints its output at m random points equal to random targets in
[0, 1] (c_i = f(x_i) - y_i). Each cell of the grid — (m, n, variant) with variant one of ``dense``
(``solver="dense"``), ``krylov`` (``solver="krylov"``), ``auto`` (the defaults), ``batched`` (the batched
Jacobian with the dense solver: the path before the layer factors; only where m·n ≤ 1.1e8); ``dense64`` (the
float64 dense reference) and ``damped`` (``normal_damping=0.1``) on request — runs in a fresh
process, so that its peak resident memory (``ru_maxrss``) is its own. In the process the optimizer's step and
a ``torch.optim.Adam`` step on a copy of the model are interleaved; the ratio is median(process CPU time of a
step) / median(Adam's), with wall times beside. ``c10`` is max|c| after 10 steps from the random network (the
closure's value at step 11). ``--first-scale s`` multiplies the first layer's initial weights by s (a rougher
random network, as the first-layer frequency of SIREN or of Fourier-feature networks; 1: PyTorch's default);
``--blocks`` times all of Adam's steps first and then the optimizer's, instead of one of each in turn.

    python benchmarks/scale_grid.py --threads 1 > grid.jsonl          # the whole grid, one process per cell
    python benchmarks/scale_grid.py --cell 1000,1e5,auto --steps 12   # one cell, printed as a JSON line
    python benchmarks/scale_grid.py --table grid.jsonl                 # the Markdown table of a finished grid
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

WIDTHS = {1e5: 224, 1e6: 705}
VARIANTS = {
    "dense": dict(solver="dense"),
    "krylov": dict(solver="krylov"),
    "auto": {},
    "batched": dict(jacobian="batched", solver="dense"),
    # not in the default grid: the float64 dense reference and the globalised normal step
    "dense64": dict(solver="dense"),
    "damped": dict(normal_damping=0.1),
}


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 1),
    )  # fmt: skip


def run_cell(
    m: int, n: float, variant: str, steps: int, budget: float, lr: float, first_scale: float = 1.0, blocks: bool = False
) -> dict:
    import sqpoptim

    dtype = torch.float64 if variant.endswith("64") else torch.float32
    torch.manual_seed(0)
    model = mlp(WIDTHS[n]).to(dtype)
    with torch.no_grad():
        model[0].weight.mul_(first_scale)
    twin = mlp(WIDTHS[n]).to(dtype)
    twin.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.rand(1024, 8, generator=gen), torch.rand(1024, 1, generator=gen)
    Xc, Yc = torch.rand(m, 8, generator=gen), torch.rand(m, generator=gen)
    X, Y, Xc, Yc = (t.to(dtype) for t in (X, Y, Xc, Yc))
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=lr, **VARIANTS[variant])
    adam = torch.optim.Adam(twin.parameters(), lr=lr)

    def closure():
        return ((model(X) - Y) ** 2).mean(), model(Xc).squeeze(1) - Yc

    def adam_step():
        adam.zero_grad(set_to_none=True)
        ((twin(X) - Y) ** 2).mean().backward()
        adam.step()

    cpu, wall, cpu_adam, wall_adam, c_max, diags = [], [], [], [], [], []
    started = time.perf_counter()

    def timed_adam_step() -> None:
        t0, w0 = time.process_time(), time.perf_counter()
        adam_step()
        cpu_adam.append(time.process_time() - t0)
        wall_adam.append(time.perf_counter() - w0)

    if blocks:  # all of Adam's steps first, then the optimizer's (as a training loop runs one method)
        for _ in range(steps):
            timed_adam_step()
    for k in range(steps):
        if not blocks:
            timed_adam_step()
        t0, w0 = time.process_time(), time.perf_counter()
        _, c = opt.step(closure)
        cpu.append(time.process_time() - t0)
        wall.append(time.perf_counter() - w0)
        c_max.append(float(c.abs().max()))
        diags.append(opt.diagnostics())
        if k >= 2 and time.perf_counter() - started > budget:
            break
    measured = slice(1, None) if len(cpu) > 1 else slice(0, None)  # the first step warms up (and verifies)
    last = diags[-1]
    return dict(
        m=m,
        n=sum(p.numel() for p in model.parameters()),
        variant=variant,
        steps=len(cpu),
        ms=1e3 * statistics.median(cpu[measured]),
        adam_ms=1e3 * statistics.median(cpu_adam[measured]),
        ratio=statistics.median(cpu[measured]) / statistics.median(cpu_adam[measured]),
        wall_ratio=statistics.median(wall[measured]) / statistics.median(wall_adam[measured]),
        peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        c0=c_max[0],
        c10=c_max[10] if len(c_max) > 10 else None,
        c20=c_max[20] if len(c_max) > 20 else None,
        jacobian=last.get("jacobian"),
        solver=last.get("solver"),
        krylov_iterations=statistics.median(d.get("krylov_iterations", 0) for d in diags),
        krylov_converged=sum(bool(d.get("krylov_converged", True)) for d in diags) / len(diags),
        first_scale=first_scale,
        blocks=blocks,
        rejected=sum(bool(d.get("rejected", False)) for d in diags[:11]),
    )


def table(rows: list[dict]) -> str:
    out = [
        "| m | n | variant | path | ms / step | Adam ms | ratio (CPU) | ratio (wall) | peak GiB "
        "| max\\|c\\| at 0 → 10 | Krylov it. / step |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        c10 = "—" if r["c10"] is None else f"{r['c10']:.2g}"
        it = f"{r['krylov_iterations']:.0f}" if r["solver"] == "krylov" else ""
        out.append(
            f"| {r['m']:,} | {r['n']:,} | {r['variant']} | {r['jacobian']} + {r['solver']} | {r['ms']:.0f} | "
            f"{r['adam_ms']:.1f} | {r['ratio']:.1f}× | {r['wall_ratio']:.1f}× | {r['peak_gib']:.2f} | "
            f"{r['c0']:.2g} → {c10} | {it} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cell", help="m,n,variant: run one cell here and print it as a JSON line")
    parser.add_argument("--constraints", default="10,100,1000,10000")
    parser.add_argument("--params", default="1e5,1e6")
    parser.add_argument("--variants", default="auto,dense,krylov,batched")
    parser.add_argument("--steps", type=int, default=12, help="steps per cell (11 give max|c| after 10 steps)")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per cell after which it stops")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--first-scale", type=float, default=1.0, help="scale of the first layer's initial weights")
    parser.add_argument("--blocks", action="store_true", help="Adam's steps first, then the optimizer's (not in turn)")
    parser.add_argument("--table", help="print the Markdown table of a JSON-lines file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.table:
        with open(args.table) as fh:
            print(table([json.loads(line) for line in fh if line.strip()]))
        return
    if args.cell:
        m, n, variant = args.cell.split(",")
        row = run_cell(int(m), float(n), variant, args.steps, args.budget, args.lr, args.first_scale, args.blocks)
        print(json.dumps(row), flush=True)
        return
    print(f"# {platform.processor() or 'cpu'} · torch {torch.__version__} · {args.threads} thread(s)", file=sys.stderr)
    for n in (float(v) for v in args.params.split(",")):
        for m in (int(v) for v in args.constraints.split(",")):
            for variant in args.variants.split(","):
                if variant == "batched" and m * n > 1.1e8:  # the explicit J alone would not fit or take minutes
                    continue
                cmd = [sys.executable, __file__, "--cell", f"{m},{n:g},{variant}", "--steps", str(args.steps)]
                cmd += ["--budget", str(args.budget), "--lr", str(args.lr), "--threads", str(args.threads)]
                cmd += ["--first-scale", str(args.first_scale)] + (["--blocks"] if args.blocks else [])
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    print(json.dumps(dict(m=m, n=n, variant=variant, error=done.stderr.strip().splitlines()[-1:])))
                else:
                    print(done.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
