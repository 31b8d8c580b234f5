"""Step time of each optimizer as a ratio to ``torch.optim.Adam``, same model and batch, measured in one run.

One *iteration* is what a training loop pays per step: for ``torch.optim.Adam``, ``zero_grad`` + forward of the
objective + ``backward`` + ``step``; for the constrained optimizers, ``step(closure)`` with the closure computing
the objective and the m constraint residuals (the model's output minus a target at m fixed points), which
includes the gradient, the batched Jacobian, the Gram factorisation and the update. m = 0 measures the pure
optimizer overhead. Timings use ``torch.utils.benchmark`` (warm-up, device synchronisation, many runs); the
optimizers are timed in rounds, interleaved with Adam, and the ratio is median(ours) / median(Adam).

    python benchmarks/step_time.py                       # CPU, the default grid (writes a Markdown table)
    python benchmarks/step_time.py --device cuda --params 1e5,1e6,1e7 --constraints 10,100,1000 \
        --optimizers sqp-adam --batch 4096           # the scaling sweep of the GPU performance issue
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics

import torch
from torch import nn
from torch.utils import benchmark

import sqpoptim

OPTIMIZERS = {
    "sqp-adam": lambda p: sqpoptim.ProjectedAdamSQP(p, lr=1e-4),
    "sqp-adam-scaled": lambda p: sqpoptim.ProjectedAdamSQP(p, lr=1e-4, projection="scaled"),
    "sqp-adam-damped": lambda p: sqpoptim.ProjectedAdamSQP(p, lr=1e-4, normal_damping=1e-6),
    "sqp-hb": lambda p: sqpoptim.ProjectedHeavyBallSQP(p, lr=1e-4),
    "sqp": lambda p: sqpoptim.StochasticSQP(p, lr=1e-4),
    "adam-con": lambda p: sqpoptim.ConstrainedAdam(p, lr=1e-4),
    "adam-unc": lambda p: sqpoptim.AdamUnc(p, lr=1e-4),
}


def mlp(d_in: int, width: int, depth: int, device: str, dtype: torch.dtype) -> nn.Module:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def width_for(n_params: float, depth: int, d_in: int) -> int:
    """Width of a depth-``depth`` tanh MLP with about ``n_params`` parameters."""
    # n = (d_in + 1) w + (depth - 1)(w + 1) w + w + 1
    a, b, c = depth - 1, d_in + 1 + (depth - 1) + 1, 1 - n_params
    return max(1, round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)) if a else round(-c / b))


def measure(size: str, m: int, names: list[str], args: argparse.Namespace) -> list[dict]:
    width, depth = (int(v) for v in size.split("x"))
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(args.batch, args.d_in, generator=gen, dtype=dtype).to(args.device)
    Y = torch.rand(args.batch, 1, generator=gen, dtype=dtype).to(args.device)
    Xc = torch.rand(m, args.d_in, generator=gen, dtype=dtype).to(args.device)
    Yc = torch.rand(m, generator=gen, dtype=dtype).to(args.device)
    rows = []
    base = mlp(args.d_in, width, depth, args.device, dtype)
    n = sum(p.numel() for p in base.parameters())
    if m > n:
        return rows
    adam_model = mlp(args.d_in, width, depth, args.device, dtype)
    adam_model.load_state_dict(base.state_dict())
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-4)

    def adam_iteration():
        adam.zero_grad(set_to_none=True)
        ((adam_model(X) - Y) ** 2).mean().backward()
        adam.step()

    timers = {"adam": benchmark.Timer("f()", globals={"f": adam_iteration})}
    for name in names:
        model = mlp(args.d_in, width, depth, args.device, dtype)
        model.load_state_dict(base.state_dict())
        opt = OPTIMIZERS[name](model.parameters())

        if args.jacobian == "pointwise" and m:  # one vmap(grad) over the points: each row sees its own point

            def closure(model=model):
                c = sqpoptim.PointwiseConstraints(model, lambda f, p: f(p[0]).squeeze() - p[1], (Xc, Yc))
                return ((model(X) - Y) ** 2).mean(), c

        else:  # one batched backward over c (is_grads_batched), the default path

            def closure(model=model):
                return ((model(X) - Y) ** 2).mean(), (model(Xc).squeeze(1) - Yc) if m else None

        def iteration(opt=opt, closure=closure):
            opt.step(closure)

        timers[name] = benchmark.Timer("f()", globals={"f": iteration})
    samples: dict[str, list[float]] = {k: [] for k in timers}
    peak: dict[str, float] = {}
    for k, t in timers.items():  # warm-up (allocator, autograd caches, lazy init) and peak device memory
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t.timeit(3)
        if args.device.startswith("cuda"):
            peak[k] = torch.cuda.max_memory_allocated() / 2**30
    for _ in range(args.rounds):  # interleaved rounds: drift and contention hit every optimizer alike
        for k, t in timers.items():
            samples[k].append(t.blocked_autorange(min_run_time=args.min_time).median)
    adam_ms = 1e3 * statistics.median(samples["adam"])
    for name in names:
        ms = 1e3 * statistics.median(samples[name])
        rows.append(
            dict(
                size=size,
                n=n,
                m=m,
                optimizer=name,
                ms=ms,
                adam_ms=adam_ms,
                ratio=ms / adam_ms,
                peak_gib=peak.get(name),
                adam_peak_gib=peak.get("adam"),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sizes", default="64x2,256x3,1024x3", help="widthxdepth of the tanh MLPs")
    parser.add_argument("--params", help="instead of --sizes: parameter counts, e.g. 1e5,1e6,1e7 (depth-3 MLPs)")
    parser.add_argument("--constraints", default="0,3,10,50,200")
    parser.add_argument(
        "--jacobian",
        default="batched",
        choices=("batched", "pointwise"),
        help="constraint Jacobian path: the closure returns c (batched backward) or PointwiseConstraints",
    )
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--d-in", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2)
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [s for s in args.optimizers.split(",") if s]
    rows = []
    sizes = args.sizes.split(",")
    if args.params:
        sizes = [f"{width_for(float(n), 3, args.d_in)}x3" for n in args.params.split(",")]
    for size in sizes:
        for m in (int(v) for v in args.constraints.split(",")):
            rows += measure(size, m, names, args)
            print(f"done {size} m={m}", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"\n{datetime.date.today()} · torch {torch.__version__} · {args.device} ({device}) · "
        f"{torch.get_num_threads()} threads · {args.dtype} · batch {args.batch} · {args.jacobian} Jacobian\n"
    )
    mem = args.device.startswith("cuda")
    head = "| model (width×depth) | n | m | " + " | ".join(names) + " | Adam ms/it |"
    print(head + (" peak GiB (ours / Adam) |" if mem else ""))
    print("|---|---:|---:|" + "---:|" * len(names) + "---:|" + ("---:|" if mem else ""))
    for size, m in dict.fromkeys((r["size"], r["m"]) for r in rows):
        sel = {r["optimizer"]: r for r in rows if r["size"] == size and r["m"] == m}
        first = next(iter(sel.values()))
        cells = " | ".join(f"{sel[k]['ratio']:.2f}×" for k in names)
        peak = f" {max(r['peak_gib'] for r in sel.values()):.1f} / {first['adam_peak_gib']:.1f} |" if mem else ""
        print(f"| {size} | {first['n']:,} | {m} | {cells} | {first['adam_ms']:.2f} |{peak}")


if __name__ == "__main__":
    main()
