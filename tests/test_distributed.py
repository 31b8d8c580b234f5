"""The collectives and the agreement of a distributed step on 2 CPU ranks (gloo), against single-process oracles.

All distributed scenarios of the suite run in one spawn of two ranks (starting a rank costs a torch import; see
:mod:`tests.distributed_scenarios`); each test reads its part.
"""

from __future__ import annotations

import pytest
import torch

from sqpoptim._agreement import checksum
from sqpoptim._distributed import Sharded

from .distributed_scenarios import ROWS, N
from .distributed_scenarios import collective_data as _data
from .ranks import two_rank_results

f64 = torch.float64


@pytest.fixture(scope="module")
def ranks():
    return [r["collectives"] for r in two_rank_results()]


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


def test_sharded_in_one_process_is_the_plain_closure():
    """Without a process group a Sharded closure is this process's rows, that is all of them."""
    import sqpoptim

    from .distributed_scenarios import FACTORIES, PTS, X, Y
    from .helpers import TinyPINN, burgers_residual

    runs = []
    for wrap in (lambda c: c, Sharded):
        model = TinyPINN(seed=4)
        opt = FACTORIES["penalty"](model.parameters(), None)
        opt2_model = TinyPINN(seed=4)
        opt2 = sqpoptim.ProjectedAdamSQP(opt2_model.parameters(), lr=1e-2)
        for _ in range(3):
            opt.step(lambda m=model, w=wrap: (((m(X) - Y) ** 2).mean(), w(burgers_residual(m, PTS))))
            opt2.step(lambda m=opt2_model, w=wrap: (((m(X) - Y) ** 2).mean(), w(burgers_residual(m, PTS))))
        runs.append(torch.cat([p.detach().reshape(-1) for p in [*model.parameters(), *opt2_model.parameters()]]))
    assert torch.equal(runs[0], runs[1])


def test_process_group_needs_torch_distributed():
    import sqpoptim

    from .helpers import TinyPINN

    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialised"):
        sqpoptim.ProjectedAdamSQP(TinyPINN().parameters(), process_group=object())


def _one_rank_stalls(rank: int, world: int) -> None:
    import time

    if rank == 1:
        time.sleep(60)  # never reaches the collective
    torch.distributed.barrier()


@pytest.mark.slow
def test_the_harness_names_a_hung_rank_instead_of_hanging():
    from .ranks import run_ranks

    with pytest.raises(AssertionError, match=r"rank\(s\) \[(0, )?1\] still running"):
        run_ranks(_one_rank_stalls, timeout=15.0, collective_timeout=5.0)


@pytest.mark.cuda
def test_cuda_parameters_over_gloo_equal_one_cpu_process():
    from .distributed_scenarios import FACTORIES, cuda_scenario, run_case
    from .ranks import run_ranks

    assert "sqp-adam" in FACTORIES
    ranks = run_ranks(cuda_scenario)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    ref = run_case(("sqp-adam", "replicated", "autograd"), None, None)["params"][:6]
    torch.testing.assert_close(ranks[0]["params"], ref, rtol=0, atol=1e-10)
