"""Every optimizer under torch.distributed on 2 CPU ranks (gloo): 20 steps with the data split over the ranks and
the constraints replicated or sharded equal, in float64, the single-process run on the union of the data and the
constraints; the replicas' parameters are bit-identical after every step; a rank that raises in its closure, or
sees a NaN, makes every rank refuse the step with the same error and leaves every rank's state unchanged."""

from __future__ import annotations

import functools

import pytest
import torch

from .distributed_scenarios import CASES, PTS, STEPS, case_key, run_case
from .helpers import TinyPINN, burgers_residual
from .ranks import two_rank_results


@pytest.fixture(scope="module")
def ranks():
    return [r["optimizers"] for r in two_rank_results()]


@functools.cache
def _single_process(name):
    return run_case((name, "replicated", "autograd"), None, None)


def single_process(case):
    """The run on the union: every mode and every way of giving J of one optimizer has the same one (the
    sharded rows, in rank order, are the replicated rows)."""
    return _single_process(case[0])


@pytest.mark.parametrize("case", CASES, ids=case_key)
def test_equal_to_single_process_on_the_union(ranks, case):
    ref = single_process(case)
    got = ranks[0][case_key(case)]
    assert got["params"].shape == (STEPS + 1, ref["params"].shape[1])
    torch.testing.assert_close(got["params"], ref["params"], rtol=0, atol=1e-10)
    # the returned loss is the mean over the union's batch, the returned c all of the constraints
    torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["c"], ref["c"], rtol=1e-10, atol=1e-10)
    assert got["c"].shape == (PTS.shape[0],)


@pytest.mark.parametrize("case", CASES, ids=case_key)
def test_replicas_bit_identical_after_every_step(ranks, case):
    a, b = ranks[0][case_key(case)], ranks[1][case_key(case)]
    assert torch.equal(a["params"], b["params"])
    assert torch.equal(a["losses"], b["losses"]) and torch.equal(a["c"], b["c"])
    assert torch.equal(a["state"], b["state"])  # the optimizer state too: one writer can checkpoint it


@pytest.mark.parametrize("case", CASES, ids=case_key)
def test_a_failing_rank_makes_every_rank_refuse(ranks, case):
    raised = [r[case_key(case)]["refusals"]["raise"] for r in ranks]
    nan = [r[case_key(case)]["refusals"]["nan"] for r in ranks]
    for outcomes in (raised, nan):
        assert outcomes[0] == outcomes[1], outcomes  # same type, same message, on both ranks
        assert outcomes[0]["unchanged"], outcomes
    assert raised[0]["type"] == "RuntimeError"
    assert "rank 1 raised in step(): RuntimeError: injected failure" in raised[0]["message"]
    assert nan[0]["type"] == "FloatingPointError"
    assert "loss on rank 0" in nan[0]["message"]


def test_the_problem_is_constrained_and_moves():
    """The oracle is not trivial: the constraints start violated and the SQP steps reduce them."""
    ref = single_process(("sqp-hb", "replicated", "autograd"))
    assert (ref["params"][-1] - ref["params"][0]).abs().max() > 1e-3
    model = TinyPINN(seed=4)
    c0 = burgers_residual(model, PTS).detach()
    assert c0.abs().max() > 1e-2 and ref["c"].abs().max() < 0.1 * c0.abs().max()


def test_without_a_process_group_each_rank_is_warned(ranks):
    for r in ranks:
        assert "no process_group" in r["warning"] and "drift apart" in r["warning"]
