"""Run a function on P CPU ranks (gloo, started with torch.multiprocessing) and collect what each returns.

Rendezvous goes through a file in a fresh temporary directory, so concurrent test runs never compete for a port.
Every collective has a timeout, every process a deadline: a rank that hangs makes the run fail with the rank's
name instead of blocking the suite. Results travel as ``torch.save`` files read back with ``weights_only=True``
(tensors, numbers, strings, lists and dicts).

Ranks are forked where that is safe (Linux, CUDA not initialised in the parent): a forked rank inherits the
parent's imports, where a spawned one pays a fresh interpreter, the torch import and the ``torch._dynamo`` import
of the first optimizer (about 3.5 s of CPU per rank here); each rank still initialises its own process group.
Elsewhere they are spawned, and the suite runs all of its scenarios in one call.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(fn: Callable[..., Any], rank: int, world: int, tmp: str, collective_timeout: float, args: tuple) -> None:
    torch.set_num_threads(1)
    out: dict[str, Any]
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(tmp, 'rendezvous')}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        try:
            out = {"result": fn(rank, world, *args)}
        finally:
            dist.destroy_process_group()
    except BaseException:  # everything goes back to the parent as text
        out = {"error": traceback.format_exc()}
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))


def run_ranks(
    fn: Callable[..., Any],
    *args: Any,
    world: int = 2,
    timeout: float = 120.0,
    collective_timeout: float = 30.0,
) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each run in its own process.

    ``fn`` must be importable (a module-level function). Raises ``AssertionError`` with the rank's traceback
    when a rank raised, or naming the ranks still running after ``timeout`` seconds (they are killed)."""
    method = start_method()
    if method == "fork":  # every rank's first optimizer imports it (torch.optim's add_param_group): import it once
        import torch._dynamo
    ctx = mp.get_context(method)
    with tempfile.TemporaryDirectory(prefix="sqpoptim-ranks-") as tmp:
        procs = [
            ctx.Process(target=_rank_main, args=(fn, r, world, tmp, collective_timeout, args), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise AssertionError(f"rank(s) {hung} still running after {timeout:.0f} s: a collective hung")
        results = []
        for r, p in enumerate(procs):
            path = os.path.join(tmp, f"rank{r}.pt")
            if not os.path.exists(path):
                raise AssertionError(f"rank {r} exited with code {p.exitcode} and no result")
            out = torch.load(path, weights_only=True)
            if "error" in out:
                raise AssertionError(f"rank {r} raised:\n{out['error']}")
            results.append(out["result"])
        return results


def start_method() -> str:
    """``fork`` where the parent's state may be inherited (CUDA cannot be initialised again in a forked child),
    else ``spawn``."""
    # (Linux only: macOS system frameworks are not fork-safe once loaded)
    fork = sys.platform.startswith("linux") and not torch.cuda.is_initialized()
    return "fork" if fork else "spawn"


@functools.cache
def two_rank_results() -> list[dict[str, Any]]:
    """Every scenario of :mod:`tests.distributed_scenarios` on two ranks, run once per test session; the runner's
    files are under :func:`two_rank_results_dir`."""
    from .distributed_scenarios import all_scenarios

    return run_ranks(all_scenarios, two_rank_results_dir(), world=2, timeout=300.0, collective_timeout=60.0)


@functools.cache
def two_rank_results_dir() -> str:
    path = tempfile.mkdtemp(prefix="sqpoptim-ranks-results-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
