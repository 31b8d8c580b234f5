"""The runner on 2 CPU ranks: each rank's share of every mini-batch, one writer, resumption; in float64 the run
equals the single-process run of the same global batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from problems.runner import RunSpec, run
from problems.runner.parallel import Ranks, shard_batch, split_is_even

from .distributed_scenarios import RUNNER_SPEC
from .ranks import two_rank_results, two_rank_results_dir


@pytest.fixture(scope="module")
def ranks():
    return [r["runner"] for r in two_rank_results()]


def test_two_ranks_resume_and_equal_one_process(ranks, tmp_path):
    assert ranks[0]["first"] == ranks[1]["first"] == {"status": "interrupted", "iteration": 3}
    assert ranks[0]["second"] == "complete" and ranks[1]["second"] == "worker"  # rank 0 is the one writer
    spec = RunSpec(**RUNNER_SPEC, nproc=2)
    folder = Path(two_rank_results_dir()) / spec.problem
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".npz"]  # the checkpoint is gone
    two = json.loads((folder / f"{spec.key()}.json").read_text())
    one = run(RunSpec(**RUNNER_SPEC), tmp_path, progress=False)
    assert RunSpec(**RUNNER_SPEC).key() != spec.key()  # the process count is part of the run's identity
    assert two["config"]["nproc"] == 2 and two["config"]["batch_split"] == "even"
    for key, value in one["final"].items():
        assert two["final"][key] == pytest.approx(value, rel=1e-10, abs=1e-13), key
    torch.testing.assert_close(
        torch.tensor(two["curves"]["train_loss"]), torch.tensor(one["curves"]["train_loss"]), rtol=1e-10, atol=0
    )
    assert two["curves"]["iteration"] == one["curves"]["iteration"]


def test_nproc_is_checked():
    with pytest.raises(ValueError, match="nproc=2 but it runs on 1"):
        run(RunSpec(**RUNNER_SPEC, nproc=2), "unused-results", progress=False)
    with pytest.raises(ValueError, match="Invalid nproc 0"):
        RunSpec(**RUNNER_SPEC, nproc=0).validate()
    assert RunSpec(**RUNNER_SPEC).key() == RunSpec(**RUNNER_SPEC, nproc=1).key()


def test_shards_are_contiguous_and_cover_the_batch():
    batch = {"a": torch.arange(10, 17), "mask": torch.tensor([True, False, True, True, False, True, True])}
    shares = [shard_batch(batch, Ranks(None, r, 3)) for r in range(3)]
    assert torch.equal(torch.cat([s["a"] for s in shares]), batch["a"])
    assert [s["a"].tolist() for s in shares] == [[10, 11], [12, 13], [14, 15, 16]]
    masks = torch.stack([s["mask"] for s in shares])
    assert torch.equal(masks.any(0), batch["mask"]) and int(masks.sum()) == int(batch["mask"].sum())
    assert masks.sum(1).tolist() == [1, 2, 2]
    assert not split_is_even(batch, 3) and split_is_even({"a": torch.arange(6)}, 3) and split_is_even(None, 5)
