"""What the two ranks of the distributed tests run: the collectives and the agreement on fixed data, and 20 steps
of every optimizer on a small physics-informed fit with data split over the ranks and constraints replicated or
sharded. Module-level so that spawned ranks can import it; the single-process oracles in the test modules use
the same problem definitions."""

from __future__ import annotations

import datetime
import warnings
from typing import Any

import torch
import torch.distributed as dist

import problems
import sqpoptim
from problems.pinn.spring import NUM_RESIDUAL, Spring
from sqpoptim import Sharded
from sqpoptim._agreement import LocalInputs, agree, checksum
from sqpoptim._distributed import RankGroup, gram_block_rows

from .helpers import TinyPINN, burgers_residual, burgers_residual_pointwise
from .optimizers import factories

f64 = torch.float64

# ---------------------------------------------------------------------------------------------- collectives
N = 7
ROWS = (3, 2)  # uneven shards


def collective_data(rank: int, dtype: torch.dtype = f64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return {
        "g": torch.randn(N, generator=gen, dtype=dtype),
        "loss": torch.randn((), generator=gen, dtype=dtype),
        "c": torch.randn(ROWS[rank], generator=gen, dtype=dtype),
        "J": torch.randn(ROWS[rank], N, generator=gen, dtype=dtype),
    }


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, generator=gen, dtype=f64), torch.randn(3, generator=gen, dtype=f64)]


def outcome(fn) -> dict[str, Any]:
    try:
        value = fn()
        return {"ok": getattr(value, "counts", value)}
    except Exception as exc:  # the tests compare what every rank raised
        return {"type": type(exc).__name__, "message": str(exc)}


def collective_scenarios(rank: int, world: int) -> dict[str, Any]:
    group = RankGroup(None)
    params = _params()
    d = collective_data(rank)
    out: dict[str, Any] = {}

    # the gradient and loss, averaged in one all-reduce
    flat = torch.cat([d["g"], d["loss"].reshape(1)])
    out["average"] = group.average_(flat.clone())

    # sharded rows of different heights, packed [J | c] (one all-gather) or separately (c in another dtype)
    counts = list(ROWS)
    out["gathered"] = group.gather_constraints(d["c"], d["J"], counts)
    out["gathered_mixed"] = group.gather_constraints(d["c"].float(), d["J"], counts)
    out["gathered_c_only"] = group.gather_constraints(d["c"], None, counts)[0]
    J_all = out["gathered"][1]
    w = torch.rand(N, generator=torch.Generator().manual_seed(7), dtype=f64) + 0.5
    out["gram_blocks"] = gram_block_rows(group, J_all, counts)
    out["gram_blocks_weighted"] = gram_block_rows(group, J_all, counts, w)
    # a matrix-free product J^T y with each rank holding its own rows: one all-reduce of an n-vector
    y = torch.arange(1.0, ROWS[rank] + 1, dtype=f64) * (rank + 1)
    out["rmatvec"] = group.all_reduce_(d["J"].T @ y)

    def local(sharded=True, **change):
        base = dict(loss=d["loss"], c=d["c"], g=d["g"], J=d["J"], sharded=sharded)
        base.update(change)
        return LocalInputs(**base)

    out["agree_sharded"] = outcome(lambda: agree(group, local(), None, params, N).counts)
    same = collective_data(0)  # replicated rows: the same on both ranks
    out["agree_replicated"] = outcome(
        lambda: agree(group, local(False, c=same["c"], J=same["J"]), None, params, N).counts
    )
    boom = ValueError("the closure failed") if rank == 1 else None
    out["closure_raises"] = outcome(lambda: agree(group, None if boom else local(), boom, params, N))
    nan_g = d["g"].clone()
    nan_g[2] = float("nan")
    out["nan_gradient"] = outcome(lambda: agree(group, local(g=nan_g if rank == 0 else d["g"]), None, params, N))
    inf_J = d["J"].clone()
    inf_J[0, 0] = float("inf")
    out["inf_jacobian_both"] = outcome(lambda: agree(group, local(J=inf_J), None, params, N))
    out["replicated_differ"] = outcome(lambda: agree(group, local(False, c=d["c"][:2], J=d["J"][:2]), None, params, N))
    swapped = same["J"][[1, 0, 2]] if rank == 1 else same["J"]
    out["replicated_rows_permuted"] = outcome(
        lambda: agree(group, local(False, c=same["c"], J=swapped), None, params, N)
    )
    out["replicated_counts_differ"] = outcome(lambda: agree(group, local(False), None, params, N))
    out["modes_differ"] = outcome(lambda: agree(group, local(sharded=rank == 0), None, params, N))
    out["params_differ"] = outcome(lambda: agree(group, local(), None, _params(seed=rank), N))
    drift = [p.clone() for p in params]
    if rank == 1:  # one ulp on one entry
        drift[1][0] = torch.nextafter(drift[1][0], torch.tensor(1e300, dtype=f64))
    out["params_one_ulp"] = outcome(lambda: agree(group, local(), None, drift, N))
    out["sizes_differ"] = outcome(lambda: agree(group, local(), None, params, N + rank))
    out["float32_params"] = outcome(lambda: agree(group, local(), None, [p.float() for p in params], N).counts)

    # after all these refusals the ranks are still in step
    out["after"] = group.average_(torch.full((3,), float(rank)))

    # a rank that skips a collective makes the other time out with an error, not hang
    short = dist.new_group(ranks=list(range(world)), timeout=datetime.timedelta(seconds=2))
    # both ranks have connected the new group before rank 1 moves on (and may exit): without this, gloo's
    # connection of rank 0 could still be in progress when rank 1's process ends (a flaky "closed by peer")
    dist.barrier()
    if rank == 0:
        out["timeout"] = outcome(lambda: dist.all_reduce(torch.ones(1), group=short))
    out["bytes"] = group.sent_bytes
    out["calls"] = group.calls
    return out


# ---------------------------------------------------------------------------------------------- optimizers
STEPS = 20
FAIL_AT = 10  # before this step: one closure raising on rank 1, then a NaN loss on rank 0 (both refused)
LOCAL_BATCH = 8
X = torch.rand(64, 2, dtype=f64, generator=torch.Generator().manual_seed(2))
Y = torch.sin(3 * X[:, :1]) * torch.cos(2 * X[:, 1:])
PTS = torch.tensor([[0.2, 0.3], [0.6, 0.4], [0.8, 0.9], [0.1, 0.7], [0.5, 0.5]], dtype=f64)
SHARDS = (slice(0, 3), slice(3, 5))  # constraint rows of ranks 0 and 1 (uneven)

FACTORIES = {
    name: (lambda p, pg, _make=make: _make(p, process_group=pg))
    for name, make in factories(
        "sqp-hb",
        "sqp-adam",
        "sqp-adam-sync-free",
        "sqp-adam-scaled-damped",
        "sqp",
        "sqp-adaptive",
        "adam-con",
        "adam-unc",
        "penalty",
        "primal-dual",
        lr=1e-2,
    ).items()
}
# (optimizer, constraints mode, how the closure gives the constraints)
CASES = [(name, mode, "autograd") for name in FACTORIES for mode in ("replicated", "sharded")]
CASES = [case for case in CASES if case != ("sqp-adam-sync-free", "replicated", "autograd")] + [
    ("sqp-adam", "sharded", "pointwise"),
    ("sqp-hb", "sharded", "given-J"),
    ("sqp-adam", "sharded", "ddp"),
]


def case_key(case: tuple[str, str, str]) -> str:
    return "/".join(case)


def batch_indices(k: int) -> torch.Tensor:
    """The global mini-batch of step k; rank r takes the r-th block of LOCAL_BATCH."""
    return torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(1000 + k))[: 2 * LOCAL_BATCH]


def make_closure(model, k: int, mode: str, how: str, part: int | None, inject: str | None = None):
    """Step k's closure: rank ``part``'s share of the data and constraints, or the union when ``part`` is None."""
    idx = batch_indices(k)
    if part is not None:
        idx = idx[part * LOCAL_BATCH : (part + 1) * LOCAL_BATCH]
    rows = PTS if (mode == "replicated" or part is None) else PTS[SHARDS[part]]
    mark = Sharded if (mode == "sharded" and part is not None) else (lambda c: c)

    def closure():
        if inject == "raise":
            raise RuntimeError("injected failure")
        loss = ((model(X[idx]) - Y[idx]) ** 2).mean()
        if inject == "nan":
            loss = loss * float("nan")
        if how == "pointwise":
            net = model.module if hasattr(model, "module") else model
            return loss, mark(sqpoptim.PointwiseConstraints(net, burgers_residual_pointwise, rows))
        c = burgers_residual(model, rows)
        if how == "given-J":
            params = list(model.parameters())
            J = torch.cat(
                [torch.cat([g.reshape(-1) for g in torch.autograd.grad(ci, params, retain_graph=True)]) for ci in c]
            ).reshape(len(c), -1)
            return loss, mark(c), J
        return loss, mark(c)

    return closure


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def state_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in state_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in state_tensors(v)]
    return []


def run_case(case: tuple[str, str, str], part: int | None, group: Any) -> dict[str, Any]:
    """20 steps of one case; with ``group`` also the two refused steps, checking that nothing changed."""
    name, mode, how = case
    model = TinyPINN(seed=4)
    stepped = model
    if how == "ddp" and group is not None:
        stepped = torch.nn.parallel.DistributedDataParallel(model)
    opt = FACTORIES[name](model.parameters(), group)
    params, losses, cs, refusals = [flat_params(model)], [], [], {}
    for k in range(STEPS):
        if k == FAIL_AT and group is not None:
            for inject, rank in (("raise", 1), ("nan", 0)):
                before = checksum([flat_params(model), *state_tensors(opt.state_dict())])
                closure = make_closure(stepped, k, mode, how, part, inject if part == rank else None)
                result = outcome(lambda closure=closure: opt.step(closure))
                after = checksum([flat_params(model), *state_tensors(opt.state_dict())])
                refusals[inject] = {**result, "unchanged": bool(torch.equal(before, after))}
        loss, c = opt.step(make_closure(stepped, k, mode, how, part))
        params.append(flat_params(model))
        losses.append(loss.detach().reshape(()))
        cs.append(c.detach())
    return {
        "params": torch.stack(params),
        "losses": torch.stack(losses),
        "c": cs[-1],
        "refusals": refusals,
        "state": checksum(state_tensors(opt.state_dict())),
        "diagnostics": {k: float(v) for k, v in opt.diagnostics().items() if isinstance(v, (int, float))},
    }


def optimizer_scenarios(rank: int, world: int) -> dict[str, Any]:
    group = dist.group.WORLD
    out: dict[str, Any] = {case_key(case): run_case(case, rank, group) for case in CASES}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sqpoptim.ProjectedAdamSQP(TinyPINN(seed=4).parameters())
    out["warning"] = " ".join(str(w.message) for w in caught)
    return out


# ---------------------------------------------------------------------------------------------- the runner
class EvenSpring(Spring):
    """The spring PINN with mini-batches of 16 residual points (the problem's own 15 split unevenly over two
    ranks). Spring has well-conditioned constraints: a rounding-level change of g stays at rounding level (on
    the output tasks, whose Gram matrices have condition numbers of 1e8 to 1e13, one ulp of g moves the third
    iterate by 1e-6, in one process as in two)."""

    def sample_batch(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"residual": torch.randperm(NUM_RESIDUAL, generator=generator)[:16]}


problems.register("spring_even_batches", "tests.distributed_scenarios:EvenSpring")
RUNNER_SPEC = dict(
    problem="spring_even_batches", method="sqp-adam", lr=1e-2, batch="mini", seed=0, iterations=6, size="tiny",
    dtype="float64", eval_every=2,
)  # fmt: skip


def runner_scenarios(rank: int, world: int, results_dir: str) -> dict[str, Any]:
    """The runner on the two ranks: interrupted after 3 of 6 iterations, then resumed to the end."""
    from problems.runner import RunSpec, run
    from problems.runner.parallel import Ranks

    spec = RunSpec(**RUNNER_SPEC, nproc=world)
    ranks = Ranks(dist.group.WORLD, rank, world)
    first = run(spec, results_dir, progress=False, stop_after=3, checkpoint_every=3, ranks=ranks)
    second = run(spec, results_dir, progress=False, ranks=ranks)
    return {"first": first, "second": second["status"]}


def all_scenarios(rank: int, world: int, results_dir: str) -> dict[str, Any]:
    # the collectives last: their final scenario leaves a timed-out subgroup behind
    optimizers = optimizer_scenarios(rank, world)
    runner = runner_scenarios(rank, world, results_dir)
    return {"optimizers": optimizers, "runner": runner, "collectives": collective_scenarios(rank, world)}


def cuda_scenario(rank: int, world: int) -> dict[str, Any]:
    """Sharded constraints on CUDA parameters over gloo (sync-free by default there): parameters per step."""
    model = TinyPINN(seed=4).cuda()
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, process_group=dist.group.WORLD)
    params = [flat_params(model).cpu()]
    for k in range(5):
        idx = batch_indices(k)[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH].cuda()
        rows = PTS[SHARDS[rank]].cuda()
        opt.step(lambda idx=idx, rows=rows: (((model(X.cuda()[idx]) - Y.cuda()[idx]) ** 2).mean(),
                                              Sharded(burgers_residual(model, rows))))  # fmt: skip
        params.append(flat_params(model).cpu())
    opt.check_finite()
    return {"params": torch.stack(params)}
