"""One run on several processes: ``--nproc N`` spawns N CPU ranks (gloo), or the runner joins the group that
``torchrun`` started; the optimizer steps as one across them (``sqpoptim``'s ``process_group``).

How a batch is split. Every rank draws the same global batch from the same seeded generator, then keeps a
contiguous share of each of the batch's index tensors: with K indices and P ranks, rank r keeps entries
``[⌊rK/P⌋, ⌊(r+1)K/P⌋)``. Each rank's objective is the problem's objective on its share, and the optimizer
averages the ranks' losses and gradients. Every objective term is a mean over its points, so the average is the
global batch's objective exactly (up to the order of floating-point additions) when every K is divisible by P;
otherwise the ranks' means are over shares that differ by one point, and the result records
``"batch_split": "uneven"``. Full-batch runs have no index set to split (``batch=None`` is "everything"), so every
rank evaluates the whole objective: the run is correct but not faster. The constraints are replicated: every rank
evaluates all of them (the problems' m is at most a few hundred).

One writer: rank 0 writes the checkpoints, the results and the progress lines; every rank reads a checkpoint to
resume. The number of processes is part of the run's identity (``nproc`` of :class:`~problems.runner.RunSpec`:
like the thread count it changes the last bits), so an interrupted N-process run resumes on N processes, and its
results never replace a one-process run's.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["Ranks", "from_torchrun", "run_sweep_on_ranks", "shard_batch", "split_is_even"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group the run steps across."""

    group: Any
    rank: int
    world: int

    @property
    def writer(self) -> bool:
        """Whether this rank writes files and prints (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (a decision only the writer can make, such as "already finished")."""
        value = torch.tensor([int(flag)])
        dist.broadcast(value, src=dist.get_global_rank(self.group, 0), group=self.group)
        return bool(value.item())


def _share(n: int, rank: int, world: int) -> slice:
    return slice(rank * n // world, (rank + 1) * n // world)


def shard_batch(batch: Mapping[str, torch.Tensor], ranks: Ranks) -> dict[str, torch.Tensor]:
    """This rank's share of every index tensor of ``batch`` (a boolean mask keeps its share of the selected
    points); see the module docstring."""
    out = {}
    for key, idx in batch.items():
        if idx.dtype == torch.bool:
            chosen = idx.nonzero().squeeze(1)
            mask = torch.zeros_like(idx)
            mask[chosen[_share(chosen.numel(), ranks.rank, ranks.world)]] = True
            out[key] = mask
        else:
            out[key] = idx[_share(idx.numel(), ranks.rank, ranks.world)]
    return out


def split_is_even(batch: Mapping[str, torch.Tensor] | None, world: int) -> bool:
    """Whether every term's share is the same size on every rank (then the split is exact)."""
    if batch is None:
        return True
    sizes = [int(idx.sum()) if idx.dtype == torch.bool else idx.numel() for idx in batch.values()]
    return all(k % world == 0 for k in sizes)


def from_torchrun(threads: int | None) -> Ranks | None:
    """The ranks ``torchrun`` started (gloo), or ``None`` when the process was not started by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    torch.set_num_threads(threads or 1)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Ranks(dist.group.WORLD, dist.get_rank(), dist.get_world_size())


def _rank_main(
    rank: int, world: int, store: str, specs: list, results_dir: str, kwargs: dict[str, Any], threads: int, out: str
) -> None:
    from .loop import run_sweep  # in the child: the parent passes only plain data

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
    )
    try:
        ranks = Ranks(dist.group.WORLD, rank, world)
        options = {**kwargs, "progress": kwargs.get("progress", True) and ranks.writer}
        results = run_sweep(specs, results_dir, ranks=ranks, **options)
        if ranks.writer:
            Path(out).write_text(json.dumps(results, allow_nan=True))
    finally:
        dist.destroy_process_group()


def run_sweep_on_ranks(
    specs: list, nproc: int, results_dir: str | Path = "results", *, threads: int = 1, **kwargs: Any
) -> list[dict[str, Any]]:
    """:func:`~problems.runner.run_sweep` on ``nproc`` spawned CPU processes (gloo, ``threads`` intra-op threads
    each); returns rank 0's results. A rank that fails makes every rank fail (the optimizer's agreement), and
    this raises naming the exit codes."""
    from .loop import validate_spec

    for spec in specs:  # a bad spec is refused here in one line, not in N tracebacks
        validate_spec(spec)
        if spec.nproc != nproc:
            raise ValueError(f"spec {spec.key()} says nproc={spec.nproc}, not {nproc}")
    with tempfile.TemporaryDirectory(prefix="sqpoptim-runner-") as tmp:
        out = os.path.join(tmp, "results.json")
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(r, nproc, os.path.join(tmp, "store"), specs, str(results_dir), kwargs, threads, out),
            )
            for r in range(nproc)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        codes = [p.exitcode for p in procs]
        if any(codes) or not os.path.exists(out):
            raise RuntimeError(f"the {nproc} ranks of the run exited with codes {codes} (see their tracebacks above)")
        return json.loads(Path(out).read_text())
