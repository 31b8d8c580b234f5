"""Prototype: the heavy-ball SQP step with the *parameters* sharded over ranks (FSDP / ZeRO layout), measured.

Rank s owns the column block :math:`x_s` (n/P entries) of the flat parameter vector, its gradient block
:math:`g_s`, its momentum block and the column block :math:`J_s` (m × n/P) of the Jacobian; c is replicated.
Everything in the step is then local except

* the Gram matrix :math:`JJ^\\top = \\sum_s J_sJ_s^\\top`: one all-reduce of m×m float64 (8m² bytes);
* each product :math:`Jx = \\sum_s J_sx_s` (two per step: the projection of g and of the momentum): an
  all-reduce of m;
* the updated parameters, all-gathered for the next forward pass (what FSDP does at every forward anyway).

:math:`J^\\top y` stays local (:math:`(J^\\top y)_s = J_s^\\top y`). The script checks the sharded step against the
dense :func:`sqpoptim.heavy_ball_sqp_direction` on the assembled J (to 1e-10, float64), then times one step's
direction on P ranks against the dense direction each rank computes today, and probes whether
``torch.autograd.grad`` — how the optimizers form g and J — can reach FSDP2's sharded parameters.

    python benchmarks/distributed_sharded_params.py --n 250000 --m 64,256,1024 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sqpoptim import heavy_ball_sqp_direction
from sqpoptim._distributed import RankGroup
from sqpoptim._linalg import factor_gram, gram

LR, MOMENTUM, GAMMA, RANK_TOL = 1e-2, 0.9, 1.0, 1e-7


def sharded_heavy_ball(
    group: RankGroup, g_s: torch.Tensor, c: torch.Tensor, J_s: torch.Tensor, buf_s: torch.Tensor
) -> torch.Tensor:
    """δ_s, this rank's block of the heavy-ball SQP step (momentum block ``buf_s`` updated in place)."""
    G = group.all_reduce_(gram(J_s))  # Σ_s J_s J_sᵀ (float64)
    F = factor_gram(G, RANK_TOL)

    def project(x_s: torch.Tensor) -> torch.Tensor:
        Jx = group.all_reduce_(J_s @ x_s)  # Σ_s J_s x_s
        return x_s - J_s.T @ F.solve(Jx).to(J_s.dtype)

    buf_s.lerp_(project(g_s), 1.0 - MOMENTUM)
    u_s = -project(LR * buf_s)
    v_s = J_s.T @ F.solve(-c).to(J_s.dtype)
    return GAMMA * v_s + u_s


def _blocks(n: int, world: int) -> list[slice]:
    edges = [round(n * s / world) for s in range(world + 1)]
    return [slice(edges[s], edges[s + 1]) for s in range(world)]


def _rank(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    try:
        torch.save(_measure(rank, world, args), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _problem(n: int, m: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(m)
    return (
        torch.randn(n, generator=gen, dtype=dtype),
        torch.randn(m, generator=gen, dtype=dtype),
        torch.randn(m, n, generator=gen, dtype=dtype) / n**0.5,
    )


def _measure(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    group = RankGroup(dist.group.WORLD)
    out: dict[str, Any] = {}
    # correctness, float64, small
    g, c, J = _problem(2000, 40, torch.float64)
    mine = _blocks(2000, world)[rank]
    buf = torch.zeros(2000, dtype=torch.float64)
    dense, _ = heavy_ball_sqp_direction(
        g, c, J, buf.clone(), lr=LR, momentum=MOMENTUM, normal_lr=GAMMA, rank_tol=RANK_TOL
    )
    delta_s = sharded_heavy_ball(group, g[mine], c, J[:, mine].contiguous(), buf[mine].clone())
    out["max_error"] = float((delta_s - dense[mine]).abs().max())
    # timing, float32
    for m in (int(v) for v in args.m.split(",")):
        g, c, J = _problem(args.n, m, torch.float32)
        mine = _blocks(args.n, world)[rank]
        g_s, J_s = g[mine].clone(), J[:, mine].contiguous()
        del J
        buf_s = torch.zeros_like(g_s)
        parts = [torch.empty(J_s.shape[1], dtype=g.dtype) for _ in range(world)]
        times, cpus, sent = [], [], []
        for _ in range(args.repeats):
            dist.barrier()
            before = group.sent_bytes
            t0, cpu0 = time.perf_counter(), time.process_time()
            if world == 1:  # the dense step every rank computes today
                delta_s, _ = heavy_ball_sqp_direction(
                    g_s, c, J_s, buf_s, lr=LR, momentum=MOMENTUM, normal_lr=GAMMA, rank_tol=RANK_TOL
                )
            else:
                delta_s = sharded_heavy_ball(group, g_s, c, J_s, buf_s)
            if world > 1:  # the next forward needs every block (equal blocks here: n divisible by P)
                dist.all_gather(parts, delta_s)
                group.sent_bytes += (world - 1) * delta_s.numel() * delta_s.element_size()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - cpu0)
            sent.append(group.sent_bytes - before)
        out[m] = {"step": statistics.median(times), "cpu": statistics.median(cpus), "sent": statistics.median(sent)}
    return out


def _fsdp_probe(rank: int, world: int, store: str, out: str) -> None:
    """Does torch.autograd.grad reach FSDP2's sharded parameters?"""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        fully_shard(model)
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(rank))
        params = list(model.parameters())  # what an optimizer holds: the sharded DTensors
        loss = model(x).square().mean()
        # during the forward FSDP swaps the module's parameters for unsharded copies, and only those are in the graph
        swapped = list(model.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        full = torch.autograd.grad(loss, swapped, allow_unused=True)
        reached = sum(g is not None for g in grads)
        shapes = [tuple(g.shape) for g in full if g is not None]
        result = (
            f"torch.autograd.grad reached {reached} of {len(grads)} sharded parameters the optimizer holds (the "
            f"others: None, not in the graph); through the unsharded copies FSDP swaps in during the forward it "
            f"gives this rank's unaveraged full-size gradients {shapes}"
        )
        torch.save({"probe": result}, os.path.join(out, f"probe{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(target, world: int, *args: Any) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="sqpoptim-fsdp-") as tmp:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=target, args=(r, world, os.path.join(tmp, "store"), *args, tmp)) for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError("a rank failed")
        names = sorted(f for f in os.listdir(tmp) if f.endswith(".pt"))
        return [torch.load(os.path.join(tmp, f), weights_only=True) for f in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=250_000)
    parser.add_argument("--m", default="64,256,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--probe-only", action="store_true", help="only the FSDP2 probe")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    probe = _spawn(_fsdp_probe, 2)[0]["probe"]
    if args.probe_only:
        print(f"FSDP2 probe: {probe}")
        return
    one = _spawn(_rank, 1, args)[0]
    many = _spawn(_rank, args.ranks, args)
    print(f"\nFSDP2 probe: {probe}")
    print(f"sharded step vs dense step (float64, n = 2000, m = 40): max |Δδ| = {max(r['max_error'] for r in many):.1e}")
    print(
        f"\n{datetime.date.today()} · torch {torch.__version__} · 2 shared x86 cores · 1 thread per rank · "
        f"float32 · n = {args.n:,} · load average {load:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    P = args.ranks
    print(
        f"| m | dense step, 1 rank: wall / CPU (ms) | sharded step, {P} ranks: wall / CPU per rank (ms) | "
        "CPU speed-up | sent/rank/step |"
    )
    print("|---:|---:|---:|---:|---:|")
    for m in (int(v) for v in args.m.split(",")):
        w1, c1 = one[m]["step"], one[m]["cpu"]
        wp, cp = max(r[m]["step"] for r in many), max(r[m]["cpu"] for r in many)
        print(
            f"| {m} | {1e3 * w1:.0f} / {1e3 * c1:.0f} | {1e3 * wp:.0f} / {1e3 * cp:.0f} | {c1 / cp:.2f}× | "
            f"{many[0][m]['sent'] / 1e6:.2f} MB |"
        )


if __name__ == "__main__":
    main()
