"""The collectives and the agreement of a distributed step on 2 CPU ranks (gloo), against single-process oracles.

All scenarios run in one spawn of two ranks (starting a rank costs a torch import); each test reads its part.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import torch
import torch.distributed as dist

from sqpoptim._agreement import LocalInputs, agree, checksum
from sqpoptim._distributed import RankGroup, Sharded, gram_block_rows

from .ranks import run_ranks

f64 = torch.float64
N = 7
ROWS = (3, 2)  # uneven shards


def _data(rank: int, dtype: torch.dtype = f64) -> dict[str, torch.Tensor]:
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


def _outcome(fn) -> dict[str, Any]:
    try:
        value = fn()
        return {"ok": getattr(value, "counts", value)}
    except Exception as exc:  # the test compares what every rank raised
        return {"type": type(exc).__name__, "message": str(exc)}


def _scenarios(rank: int, world: int) -> dict[str, Any]:
    group = RankGroup(None)
    params = _params()
    d = _data(rank)
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

    out["agree_sharded"] = _outcome(lambda: agree(group, local(), None, params, N).counts)
    same = _data(0)  # replicated rows: the same on both ranks
    out["agree_replicated"] = _outcome(
        lambda: agree(group, local(False, c=same["c"], J=same["J"]), None, params, N).counts
    )
    boom = ValueError("the closure failed") if rank == 1 else None
    out["closure_raises"] = _outcome(lambda: agree(group, None if boom else local(), boom, params, N))
    nan_g = d["g"].clone()
    nan_g[2] = float("nan")
    out["nan_gradient"] = _outcome(lambda: agree(group, local(g=nan_g if rank == 0 else d["g"]), None, params, N))
    inf_J = d["J"].clone()
    inf_J[0, 0] = float("inf")
    out["inf_jacobian_both"] = _outcome(lambda: agree(group, local(J=inf_J), None, params, N))
    out["replicated_differ"] = _outcome(lambda: agree(group, local(False, c=d["c"][:2], J=d["J"][:2]), None, params, N))
    swapped = same["J"][[1, 0, 2]] if rank == 1 else same["J"]
    out["replicated_rows_permuted"] = _outcome(
        lambda: agree(group, local(False, c=same["c"], J=swapped), None, params, N)
    )
    out["replicated_counts_differ"] = _outcome(lambda: agree(group, local(False), None, params, N))
    out["modes_differ"] = _outcome(lambda: agree(group, local(sharded=rank == 0), None, params, N))
    out["params_differ"] = _outcome(lambda: agree(group, local(), None, _params(seed=rank), N))
    drift = [p.clone() for p in params]
    if rank == 1:  # one ulp on one entry
        drift[1][0] = torch.nextafter(drift[1][0], torch.tensor(1e300, dtype=f64))
    out["params_one_ulp"] = _outcome(lambda: agree(group, local(), None, drift, N))
    out["sizes_differ"] = _outcome(lambda: agree(group, local(), None, params, N + rank))
    out["float32_params"] = _outcome(lambda: agree(group, local(), None, [p.float() for p in params], N).counts)

    # after all these refusals the ranks are still in step
    out["after"] = group.average_(torch.full((3,), float(rank)))

    # a rank that skips a collective makes the other time out with an error, not hang
    short = dist.new_group(ranks=list(range(world)), timeout=datetime.timedelta(seconds=2))
    if rank == 0:
        out["timeout"] = _outcome(lambda: dist.all_reduce(torch.ones(1), group=short))
    out["bytes"] = group.sent_bytes
    out["calls"] = group.calls
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_scenarios, world=2, timeout=120.0, collective_timeout=30.0)


def test_gradient_average_is_the_mean_and_bit_identical(ranks):
    d0, d1 = _data(0), _data(1)
    expected = (torch.cat([d0["g"], d0["loss"].reshape(1)]) + torch.cat([d1["g"], d1["loss"].reshape(1)])) / 2
    torch.testing.assert_close(ranks[0]["average"], expected, rtol=1e-15, atol=1e-15)
    assert torch.equal(ranks[0]["average"], ranks[1]["average"])  # the same bits on every rank


def test_gather_rows_of_different_heights(ranks):
    d0, d1 = _data(0), _data(1)
    c = torch.cat([d0["c"], d1["c"]])
    J = torch.cat([d0["J"], d1["J"]])
    for r in ranks:
        assert torch.equal(r["gathered"][0], c) and torch.equal(r["gathered"][1], J)
        assert torch.equal(r["gathered_mixed"][0], c.float()) and torch.equal(r["gathered_mixed"][1], J)
        assert torch.equal(r["gathered_c_only"], c)


def test_gram_block_rows_equals_the_full_gram(ranks):
    J = torch.cat([_data(0)["J"], _data(1)["J"]])
    w = torch.rand(N, generator=torch.Generator().manual_seed(7), dtype=f64) + 0.5
    for r in ranks:
        torch.testing.assert_close(r["gram_blocks"], J @ J.T, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(r["gram_blocks_weighted"], (J * w) @ J.T, rtol=1e-14, atol=1e-14)
        assert torch.equal(r["gram_blocks"], r["gram_blocks"].T)
    assert torch.equal(ranks[0]["gram_blocks"], ranks[1]["gram_blocks"])


def test_sharded_rows_matrix_free_product(ranks):
    J = torch.cat([_data(0)["J"], _data(1)["J"]])
    y = torch.cat([torch.arange(1.0, ROWS[0] + 1, dtype=f64), 2 * torch.arange(1.0, ROWS[1] + 1, dtype=f64)])
    for r in ranks:
        torch.testing.assert_close(r["rmatvec"], J.T @ y, rtol=1e-14, atol=1e-14)


def test_agreement_returns_the_row_counts(ranks):
    for r in ranks:
        assert r["agree_sharded"] == {"ok": list(ROWS)}
        assert r["agree_replicated"] == {"ok": [ROWS[0], ROWS[0]]}


@pytest.mark.parametrize(
    "scenario,kind,words",
    [
        ("closure_raises", "ValueError", "rank 1 raised in step(): ValueError: the closure failed"),
        ("nan_gradient", "FloatingPointError", "gradient on rank 0 at this step"),
        ("inf_jacobian_both", "FloatingPointError", "Jacobian J on ranks 0, 1"),
        ("replicated_differ", "ValueError", "replicated constraints differ across ranks"),
        ("replicated_rows_permuted", "ValueError", "replicated constraints differ across ranks"),
        ("replicated_counts_differ", "ValueError", "the ranks returned 2 to 3 rows"),
        ("modes_differ", "ValueError", "Sharded(c)"),
        ("params_differ", "RuntimeError", "parameters are not identical"),
        ("params_one_ulp", "RuntimeError", "parameters are not identical"),
        ("sizes_differ", "ValueError", "differ in size or dtype"),
    ],
)
def test_every_rank_refuses_with_the_same_error(ranks, scenario, kind, words):
    outcomes = [r[scenario] for r in ranks]
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].get("type") == kind, outcomes[0]
    assert words in outcomes[0]["message"]


def test_float32_parameters_agree(ranks):
    assert ranks[0]["float32_params"] == ranks[1]["float32_params"] == {"ok": list(ROWS)}


def test_ranks_still_in_step_after_refusals(ranks):
    for r in ranks:
        assert torch.equal(r["after"], torch.full((3,), 0.5))


def test_skipped_collective_times_out_instead_of_hanging(ranks):
    assert ranks[0]["timeout"].get("type") in ("RuntimeError", "DistBackendError"), ranks[0]["timeout"]


def test_bytes_are_counted(ranks):
    # the first collective: all-reduce of n + 1 float64 on 2 ranks sends (n + 1) * 8 bytes per rank (ring)
    assert ranks[0]["calls"] == ranks[1]["calls"]
    assert ranks[0]["bytes"] > (N + 1) * 8


def test_checksum_sees_bits_and_positions():
    a = torch.randn(5, 3, dtype=f64)
    assert torch.equal(checksum([a]), checksum([a.clone()]))
    b = a.clone()
    b[4, 2] = torch.nextafter(b[4, 2], torch.tensor(1e300, dtype=f64))
    assert not torch.equal(checksum([a]), checksum([b]))
    assert not torch.equal(checksum([a]), checksum([a[[1, 0, 2, 3, 4]]]))
    big = torch.randn(3000, 7)  # float32, several position blocks and a tail of half a word
    perm = big.clone()
    perm[[0, 2999]] = big[[2999, 0]]
    assert not torch.equal(checksum([big]), checksum([perm]))
    assert checksum([a]).item() >= 0
    assert checksum([]).item() == 0


def test_sharded_marker_checks_its_argument():
    with pytest.raises(TypeError, match="Sharded wraps"):
        Sharded([1.0, 2.0])
