"""Strong scaling of the optimizers under torch.distributed on this CPU: 1 vs P ranks, one thread each.

The global batch is fixed; with P ranks each takes 1/P of it (data parallel). Modes:

* ``dp``: no constraints (``AdamUnc``): the pure data-parallel part, against ``torch.optim.Adam`` on a model
  wrapped in ``DistributedDataParallel`` (PyTorch's own data parallelism: bucketed all-reduces overlapped with
  the backward pass) on the same batch;
* ``replicated``: ``ProjectedAdamSQP`` with m output constraints that every rank evaluates (the model's value
  at m fixed points), so the Jacobian and the step are formed redundantly on every rank;
* ``sharded``: the same m constraints, rank r evaluating its m/P rows (``Sharded(c)``) and the rows all-gathered.

Per step and rank: wall time and process CPU time (the median over the timed steps; a step starts after a
barrier, so that every rank's clock measures the same step), the bytes this rank sent (the optimizer's
``comm_bytes`` diagnostic), and a CPU-time profile: the local work (closure, gradient, Jacobian of the local
rows), the agreement round and the exchange (all-reduce [+ all-gather]) timed on their own, the rest (the step's
direction and update, computed alike on every rank) by difference. The machine's load average is printed before
and after: on a shared machine the wall times measure the other processes as much as these, and the CPU times
are the figures to read.

    python benchmarks/distributed_scaling.py --width 256 --depth 3 --batch 4096 --m 32 --steps 15 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sqpoptim
from sqpoptim._agreement import LocalInputs, agree
from sqpoptim._distributed import RankGroup
from sqpoptim._gradient import flat_gradient
from sqpoptim._jacobian import batched_jacobian
from sqpoptim._layout import build_layout


def mlp(width: int, depth: int) -> nn.Module:
    layers, d = [], 2
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


def problem(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(args.batch, 2, generator=gen)
    return {
        "X": X,
        "Y": torch.sin(3 * X[:, :1]) * torch.cos(2 * X[:, 1:]),
        "Xc": torch.rand(args.m, 2, generator=gen),
        "Yc": torch.rand(args.m, generator=gen),
    }


def _rank(rank: int, world: int, store: str, args: argparse.Namespace, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    try:
        result = _measure(rank, world, args, mode)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _measure(rank: int, world: int, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    data = problem(args)
    part = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    X, Y = data["X"][part], data["Y"][part]
    rows = slice(rank * args.m // world, (rank + 1) * args.m // world) if mode == "sharded" else slice(None)
    Xc, Yc = data["Xc"][rows], data["Yc"][rows]
    torch.manual_seed(0)
    model = mlp(args.width, args.depth)
    group = dist.group.WORLD
    if mode == "ddp-adam":
        net = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            ((net(X) - Y) ** 2).mean().backward()
            opt.step()

    else:
        if mode == "dp":
            opt = sqpoptim.AdamUnc(model.parameters(), lr=1e-4, process_group=group)

            def closure():
                return ((model(X) - Y) ** 2).mean()

        else:
            opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-4, process_group=group)
            wrap = sqpoptim.Sharded if mode == "sharded" else (lambda c: c)

            def closure():
                return ((model(X) - Y) ** 2).mean(), wrap(model(Xc).squeeze(1) - Yc)

        def step() -> None:
            opt.step(closure)

    walls, cpus = [], []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        w, c = time.perf_counter(), time.process_time()
        step()
        w, c = time.perf_counter() - w, time.process_time() - c
        if i >= args.warmup:
            walls.append(w)
            cpus.append(c)
    result: dict[str, Any] = {"wall": statistics.median(walls), "cpu": statistics.median(cpus)}
    if mode in ("dp", "replicated", "sharded"):
        result["comm_bytes"] = opt.diagnostics()["comm_bytes"]
        result.update(_profile(model, X, Y, Xc, Yc, mode, args, group))
    result["n"] = sum(p.numel() for p in model.parameters())
    return result


def _profile(model, X, Y, Xc, Yc, mode, args, group) -> dict[str, float]:
    """The step's parts timed on their own, in process CPU seconds (median): this rank's closure, gradient and
    Jacobian; the agreement round; the all-reduce of [g; loss] (and the all-gather of the sharded rows)."""
    layout = build_layout([{"params": list(model.parameters())}])
    ranks = RankGroup(group)
    parts: dict[str, list[float]] = {"local": [], "agree": [], "exchange": []}
    for _ in range(args.steps):
        dist.barrier()
        t = time.process_time()
        with torch.enable_grad():
            loss = ((model(X) - Y) ** 2).mean()
            c = model(Xc).squeeze(1) - Yc if mode != "dp" else None
            g = flat_gradient(loss, layout, retain_graph=c is not None)
            J = batched_jacobian(c, layout.params, layout.n) if c is not None else None
        parts["local"].append(time.process_time() - t)
        dist.barrier()
        t = time.process_time()
        c_rows = c.detach() if c is not None else loss.new_zeros(0)
        shared = LocalInputs(loss.detach(), c_rows, g, J, mode == "sharded")
        counts = agree(ranks, shared, None, layout.params, layout.n).counts
        parts["agree"].append(time.process_time() - t)
        dist.barrier()
        t = time.process_time()
        buf = torch.cat([g, loss.detach().reshape(1)])
        ranks.average_(buf)
        if mode == "sharded":
            ranks.gather_constraints(c_rows, J, counts)
        parts["exchange"].append(time.process_time() - t)
    return {k: statistics.median(v) for k, v in parts.items()}


def run(world: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sqpoptim-scaling-") as tmp:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "store"), args, mode, tmp))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"a rank failed ({mode}, P={world})")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(world)]
    out = {k: statistics.mean(r[k] for r in results) for k in results[0] if k != "n"}
    out["n"] = results[0]["n"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4096, help="global batch (split over the ranks)")
    parser.add_argument("--m", type=int, default=32, help="constraints (replicated and sharded modes)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="alternating 1-rank and P-rank runs")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--modes", default="ddp-adam,dp,replicated,sharded")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = {}
    for mode in args.modes.split(","):
        samples: dict[int, list[dict[str, Any]]] = {1: [], args.ranks: []}
        for _ in range(args.repeats):  # alternate, so that load drift hits both alike
            for world in (1, args.ranks):
                samples[world].append(run(world, mode, args))
                print(f"{mode} P={world}: {samples[world][-1]}", flush=True)
        rows[mode] = {
            world: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for world, runs in samples.items()
        }
    load_after = os.getloadavg()
    P = args.ranks
    print(
        f"\n{datetime.date.today()} · torch {torch.__version__} · 2 shared x86 cores · 1 thread per rank · "
        f"MLP {args.width}x{args.depth} · global batch {args.batch} · m = {args.m} · load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after\n"
    )
    print(
        f"| mode | n | step wall 1 rank (ms) | step wall {P} ranks (ms) | wall speed-up | CPU/rank 1 (ms) | "
        f"CPU/rank {P} (ms) | CPU speed-up | sent/rank/step | CPU/rank {P}: local / agreement / exchange / rest "
        "(ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r in rows.items():
        one, many = r[1], r[P]
        prof = "|"
        if "local" in many:
            rest = many["cpu"] - many["local"] - many["agree"] - many["exchange"]
            prof = (
                f"{1e3 * many['local']:.1f} / {1e3 * many['agree']:.1f} / {1e3 * many['exchange']:.1f} / "
                f"{1e3 * rest:.1f} |"
            )
        sent = f"{many['comm_bytes'] / 1e6:.2f} MB" if "comm_bytes" in many else "(DDP buckets)"
        print(
            f"| {mode} | {int(one['n']):,} | {1e3 * one['wall']:.1f} | {1e3 * many['wall']:.1f} | "
            f"{one['wall'] / many['wall']:.2f}× | {1e3 * one['cpu']:.1f} | {1e3 * many['cpu']:.1f} | "
            f"{one['cpu'] / many['cpu']:.2f}× | {sent} | {prof}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "load": [load_before, load_after]}, f, indent=1)


if __name__ == "__main__":
    main()
