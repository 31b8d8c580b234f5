"""Per-iteration cost of every method on the PINN problems, as a ratio to Adam(unc) in the same process.

An iteration is what the runner does per step: draw the batch (mini-batch mode), build the closure (objective
and constraints, or the problem's per-point constraint description) and ``optimizer.step``. Methods are timed
in interleaved rounds after a warm-up: on the CPU one iteration of each method in turn, with process CPU time
(the ratio to read on a shared machine) beside wall time, for at least ``--rounds`` rounds and
``--min-time`` seconds per method; on CUDA with ``torch.utils.benchmark`` (device synchronisation around the
timed region only) and with the peak GPU memory of each method's iterations.

    python benchmarks/problem_step_time.py --problems spring,chemistry,burgers,darcy --size paper
    python benchmarks/problem_step_time.py --device cuda --problems spring --methods sqp-adam,adam-unc,adam-con
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
from torch.utils import benchmark

from problems import get_problem
from problems.methods import resolve_method


def iteration_timer(problem, spec: str, lr: float, batch_mode: str, seed: int = 0):
    """One runner iteration of method ``spec`` on ``problem`` as a callable; the method's ``Training`` (model,
    optimizer, closure) rides along as ``iteration.training``."""
    method, options = resolve_method(spec, lr)
    torch.manual_seed(0)
    training = method.setup(problem, problem.make_model(0), lr, options)
    gen = torch.Generator().manual_seed(seed)

    def iteration():
        batch = None if batch_mode == "full" else problem.sample_batch(gen)
        training.optimizer.step(training.closure(batch))

    iteration.training = training
    return iteration


def measure(problem_name: str, batch_mode: str, methods: list[str], args: argparse.Namespace) -> list[dict]:
    problem = get_problem(problem_name, size=args.size, device=args.device, dtype=getattr(torch, args.dtype))
    lr = problem.defaults.lrs[0]
    names = ["adam-unc", *[m for m in methods if m != "adam-unc"]]
    iterations = {m: iteration_timer(problem, m, lr, batch_mode) for m in names}
    peak = {}
    for m, it in iterations.items():  # warm-up, and peak memory of a few iterations on CUDA
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            it()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak[m] = torch.cuda.max_memory_allocated() / 2**20
    samples: dict[str, list[float]] = {m: [] for m in names}
    cpu: dict[str, list[float]] = {m: [] for m in names}
    if args.device.startswith("cuda"):
        timers = {m: benchmark.Timer("f()", globals={"f": it}) for m, it in iterations.items()}
        for _ in range(args.rounds):
            for m, t in timers.items():
                samples[m].append(t.blocked_autorange(min_run_time=args.min_time).median)
    else:  # one iteration of each method in turn, process CPU time beside wall time (the machine is shared)
        rounds = max(args.rounds, 1)
        started = time.perf_counter()
        for r in range(10**6):
            for m, it in iterations.items():
                t0, w0 = time.process_time(), time.perf_counter()
                it()
                cpu[m].append(time.process_time() - t0)
                samples[m].append(time.perf_counter() - w0)
            if r + 1 >= rounds and time.perf_counter() - started >= args.min_time * len(names):
                break
    base = statistics.median(samples["adam-unc"])
    base_cpu = statistics.median(cpu["adam-unc"]) if cpu["adam-unc"] else None
    return [
        dict(
            problem=problem_name,
            batch=batch_mode,
            method=m,
            ms=1e3 * statistics.median(s),
            ratio=statistics.median(s) / base,
            cpu_ms=1e3 * statistics.median(cpu[m]) if base_cpu else None,
            cpu_ratio=statistics.median(cpu[m]) / base_cpu if base_cpu else None,
            iterations=len(s),
            peak_mib=peak.get(m),
        )
        for m, s in samples.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", default="spring,chemistry,burgers,darcy")
    parser.add_argument("--methods", default="sqp-adam,sqp-hb,adam-con,adam-unc")
    parser.add_argument("--batch", default="full,mini")
    parser.add_argument("--size", default="paper")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    for problem in args.problems.split(","):
        for batch_mode in args.batch.split(","):
            rows += measure(problem, batch_mode, methods, args)
            print(f"done {problem} {batch_mode}", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or "cpu")
    print(
        f"\n{datetime.date.today()} · torch {torch.__version__} · {args.device} ({device}) · "
        f"{torch.get_num_threads()} threads · {args.dtype} · size {args.size}\n"
    )
    if args.device.startswith("cuda"):
        print("| problem | batch | method | ms / iteration | ratio to Adam(unc) | peak MiB |")
        print("|---|---|---|---:|---:|---:|")
        for r in rows:
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "–"
            print(f"| {r['problem']} | {r['batch']} | {r['method']} | {r['ms']:.2f} | {r['ratio']:.2f}× | {peak} |")
        return
    print("| problem | batch | method | CPU ms / iteration | ratio to Adam(unc), CPU | ratio, wall | iterations |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['problem']} | {r['batch']} | {r['method']} | {r['cpu_ms']:.2f} | {r['cpu_ratio']:.3f}× | "
            f"{r['ratio']:.3f}× | {r['iterations']} |"
        )


if __name__ == "__main__":
    main()
