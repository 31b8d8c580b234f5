"""The runner's files as a hostile or careless user meets them: crafted checkpoints never run code, every field
that changes a result is part of a run's identity, damaged or edited files give one clear line naming the file
and what to do, a typo anywhere in a sweep stops it before anything trains, progress after a resume is honest,
and results files are created like ordinary files."""

from __future__ import annotations

import io
import json
import math
import os
import stat
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from problems.cli import main
from problems.methods import METHODS
from problems.runner import RunSpec, load_results, run, run_sweep
from problems.runner.checkpoint import CheckpointError
from problems.runner.loop import _Progress
from problems.runner.results import ResultsFileError

SPRING = dict(problem="spring", method="adam-unc", lr=1e-3, iterations=3, size="tiny", eval_every=1)


def _files(results, spec):
    folder = results / spec.problem
    return tuple(folder / f"{spec.key()}{ext}" for ext in (".json", ".npz", ".ckpt"))


class _CreatesAFile:
    """Unpickling this calls ``open(path, "w")``: a stand-in for any code a crafted pickle could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_checkpoint_never_runs_code(tmp_path, cache):
    spec = RunSpec(**SPRING)
    _, _, ckpt = _files(tmp_path, spec)
    ckpt.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"spec": {}, "model": _CreatesAFile(marker)}, ckpt)
    with pytest.raises(CheckpointError, match=rf"checkpoint .*{spec.key()}\.ckpt cannot be read as data.*delete it"):
        run(spec, tmp_path, cache_dir=cache, progress=False)
    assert not marker.exists()
    assert ckpt.exists()  # nothing is deleted behind the user's back
    # ... and the command line says so in one line
    argv = ["run", "spring", "--methods", "adam-unc", "--lr", "1e-3", "--iterations", "3", "--size", "tiny"]
    argv += ["--eval-every", "1", "--results", str(tmp_path), "--cache", str(cache), "--quiet", "--no-plot"]
    assert main(argv) == 2
    assert not marker.exists()


_specs = st.builds(
    RunSpec,
    problem=st.sampled_from(["spring", "darcy"]),
    method=st.sampled_from(["sqp-adam", "adam-unc", "penalty:rho=10", "penalty_rho=10", "penalty:rho=1e1"]),
    lr=st.sampled_from([1e-3, 1e-3 + 1e-12, 5e-4]),
    batch=st.sampled_from(["full", "mini"]),
    seed=st.integers(0, 2),
    iterations=st.sampled_from([10, 100]),
    size=st.sampled_from(["tiny", "small"]),
    device=st.sampled_from(["cpu", "cuda", "cuda:0"]),
    dtype=st.sampled_from(["float32", "float64"]),
    model_seed=st.integers(0, 2),
    eval_every=st.sampled_from([None, 1, 10]),
    threads=st.sampled_from([None, 1, 2]),
)


@settings(max_examples=300, deadline=None)
@given(_specs, _specs)
def test_distinct_specs_have_distinct_keys(a, b):
    assert (a.key() == b.key()) == (a == b)


def test_another_model_seed_trains_a_new_run(tmp_path, cache):
    first = run(RunSpec(**SPRING), tmp_path, cache_dir=cache, progress=False)
    second = run(RunSpec(**SPRING, model_seed=1), tmp_path, cache_dir=cache, progress=False)
    assert first["config"]["model_seed"] == 0 and second["config"]["model_seed"] == 1
    assert first["curves"]["objective"][0] != second["curves"]["objective"][0]  # other initial weights
    for change in ({"device": "cpu:0"}, {"eval_every": 3}, {"threads": None}):
        assert RunSpec(**{**SPRING, **change}).key() != RunSpec(**SPRING).key(), change


def test_results_of_the_first_release_are_read_only_for_their_own_spec(tmp_path, cache):
    spec = RunSpec(**SPRING)
    result = run(spec, tmp_path, cache_dir=cache, progress=False)
    out_json, out_npz, _ = _files(tmp_path, spec)
    # the first release: readable key only, no format, checksum or thread count
    old = {k: v for k, v in result.items() if k not in ("format", "checksum", "prediction_sha256")}
    old["config"] = {k: v for k, v in old["config"].items() if k != "threads"}
    legacy = tmp_path / "spring" / f"{spec.legacy_key()}.json"
    legacy.write_text(json.dumps(old))
    out_npz.rename(legacy.with_suffix(".npz"))
    out_json.unlink()
    assert run(spec, tmp_path, cache_dir=cache, progress=False) == old  # read, not retrained
    other = RunSpec(**SPRING, model_seed=1)
    assert other.legacy_key() == spec.legacy_key()
    assert run(other, tmp_path, cache_dir=cache, progress=False)["config"]["model_seed"] == 1  # not the old run
    assert {r["config"]["model_seed"] for r in load_results(tmp_path, "spring")} == {0, 1}


@pytest.fixture
def finished(tmp_path, cache):
    spec = RunSpec(**SPRING)
    run(spec, tmp_path, cache_dir=cache, progress=False)
    return spec, *_files(tmp_path, spec)


def _edit(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda j, n: j.write_text(j.read_text()[:50]), "is not readable JSON"),
        (lambda j, n: j.write_bytes(b"\xff\xfe\x00garbage"), "is not readable JSON"),
        (lambda j, n: j.write_text("[1, 2]"), "is not a result of this runner"),
        (lambda j, n: _edit(j, lambda d: d["final"].update(objective=1e-30)), "modified or damaged"),
        (lambda j, n: _edit(j, lambda d: d.update(format=99)), "newer than this version reads"),
        (lambda j, n: _edit(j, lambda d: d.pop("curves")), "is not a result of this runner"),
    ],
)
def test_a_damaged_result_gives_one_line_naming_the_file(finished, tmp_path, cache, capsys, damage, message):
    spec, out_json, out_npz, _ = finished
    damage(out_json, out_npz)
    with pytest.raises(ResultsFileError, match=message) as err:
        run(spec, tmp_path, cache_dir=cache, progress=False)
    text = str(err.value)
    assert str(out_json) in text and "\n" not in text
    with pytest.raises(ResultsFileError, match=message):
        load_results(tmp_path, "spring")
    assert main(["plot", "spring", "--results", str(tmp_path)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and str(out_json) in err_lines[0] and message in err_lines[0]


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete"])
def test_a_damaged_prediction_file_is_named(finished, tmp_path, damage, capsys):
    _, _, out_npz, _ = finished
    if damage == "truncate":
        out_npz.write_bytes(out_npz.read_bytes()[:200])
    elif damage == "edit":
        with np.load(out_npz) as f:
            arrays = {k: f[k] for k in f.files}
        arrays["u_pred"] = arrays["u_pred"] + 1
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        out_npz.write_bytes(buf.getvalue())
    else:
        out_npz.unlink()
    assert main(["plot", "spring", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out_npz) in err and "delete" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not a checkpoint"])
def test_a_damaged_checkpoint_gives_one_line_naming_the_file(tmp_path, cache, damage):
    spec = RunSpec(**{**SPRING, "iterations": 6})
    assert run(spec, tmp_path, cache_dir=cache, progress=False, checkpoint_every=2, stop_after=3)["status"] == (
        "interrupted"
    )
    _, _, ckpt = _files(tmp_path, spec)
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "garbage":
        ckpt.write_bytes(os.urandom(4096))
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    with pytest.raises(CheckpointError, match="delete it to restart this run") as err:
        run(spec, tmp_path, cache_dir=cache, progress=False)
    assert str(ckpt) in str(err.value) and "\n" not in str(err.value)
    ckpt.unlink()  # the advice works: the run starts over and finishes
    assert run(spec, tmp_path, cache_dir=cache, progress=False)["status"] == "complete"


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_checkpoints_as_data_and_resumes_exactly(method, tmp_path, cache):
    problem = "enforce_fitting" if METHODS[method].needs_output_constraints else "spring"
    spec = RunSpec(problem, method, lr=1e-3, batch="mini", seed=1, iterations=4, size="tiny", eval_every=2)
    reference = run(spec, tmp_path / "a", cache_dir=cache, progress=False)
    assert run(spec, tmp_path / "b", cache_dir=cache, progress=False, checkpoint_every=1, stop_after=2) == {
        "status": "interrupted",
        "iteration": 2,
    }
    resumed = run(spec, tmp_path / "b", cache_dir=cache, progress=False)  # loads the checkpoint as data
    untimed = lambda final: {k: v for k, v in final.items() if not k.startswith("time_")}  # noqa: E731
    assert resumed["curves"] == reference["curves"] and untimed(resumed["final"]) == untimed(reference["final"])


def test_a_typo_anywhere_in_a_sweep_stops_it_before_anything_trains(tmp_path, cache, capsys):
    good = RunSpec(**SPRING)
    for bad, message in [
        (RunSpec(**{**SPRING, "method": "sqp-adam:nromal_lr=1"}), "did you mean 'normal_lr'"),
        (RunSpec(**{**SPRING, "method": "sqp-adam:betas=2"}), "betas"),
        (RunSpec(**{**SPRING, "method": "penalty:rho=-1"}), "rho"),
        (RunSpec(**{**SPRING, "method": "enforce"}), "output constraints"),
        (RunSpec(**{**SPRING, "lr": float("nan")}), "learning rate"),
        (RunSpec(**{**SPRING, "problem": "sprung"}), "Unknown problem"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_sweep([good, bad], tmp_path, cache_dir=cache, progress=False)
        assert not (tmp_path / "spring").exists(), bad  # the good run did not train first
    argv = ["run", "spring", "--methods", "adam-unc,sqp-adam:nromal_lr=1", "--iterations", "2", "--size", "tiny"]
    assert main([*argv, "--results", str(tmp_path), "--cache", str(cache), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nromal_lr" in err and not (tmp_path / "spring").exists()


def test_progress_rate_counts_this_sessions_iterations_only(monkeypatch):
    monkeypatch.setattr(time, "perf_counter", lambda: 101.0)
    stream = io.StringIO()
    bar = _Progress("spring", 1000, first=900, stream=stream, start=100.0)  # resumed at 900, one second ago
    bar.update(910, 1.0, 1.0, force=True)
    assert "910/1000" in stream.getvalue() and " 10.0 it/s" in stream.getvalue()


def test_results_files_are_created_like_ordinary_files(tmp_path, cache):
    old = os.umask(0o022)
    try:
        spec = RunSpec(**{**SPRING, "iterations": 4})
        run(spec, tmp_path, cache_dir=cache, progress=False, checkpoint_every=1, stop_after=2)
        out_json, out_npz, ckpt = _files(tmp_path, spec)
        assert stat.S_IMODE(ckpt.stat().st_mode) == 0o644
        run(spec, tmp_path, cache_dir=cache, progress=False)
        for path in (out_json, out_npz):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
        caches = list(cache.glob("spring-*"))
        assert caches and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in caches)
    finally:
        os.umask(old)


def test_a_run_uses_its_thread_count_and_restores_torch_s(tmp_path, cache, monkeypatch):
    seen = []
    before = torch.get_num_threads()
    from problems.methods.optimizers import OptimizerMethod

    real_setup = OptimizerMethod.setup

    def setup(self, *args):
        seen.append(torch.get_num_threads())
        return real_setup(self, *args)

    monkeypatch.setattr(OptimizerMethod, "setup", setup)
    torch.set_num_threads(2)
    try:
        run(RunSpec(**SPRING), tmp_path, cache_dir=cache, progress=False)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert math.isfinite(load_results(tmp_path, "spring")[0]["final"]["objective"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--iterations", "0"], "Invalid iterations 0"),
        (["--eval-every", "0"], "Invalid eval_every 0"),
        (["--threads", "0"], "Invalid threads 0"),
        (["--lr", "nan"], "Invalid learning rate nan"),
        (["--lr", "fast"], "invalid --lr 'fast'"),
        (["--batch", "mini", "--seeds", "3-1"], "no seed in it"),
        (["--batch", "mini", "--seeds", "abc"], "invalid --seeds 'abc'"),
        (["--device", "gpu7"], "Invalid device 'gpu7'"),
        (["--methods", "sqp-adam:"], "Invalid method option ''"),
        (["--methods", "enforce"], "needs a problem with output constraints"),
    ],
)
def test_command_line_mistakes_give_one_line_and_train_nothing(args, message, tmp_path, cache, capsys):
    base = ["run", "spring", "--methods", "adam-unc", "--iterations", "3", "--size", "tiny", "--quiet", "--no-plot"]
    assert main([*base, *args, "--results", str(tmp_path), "--cache", str(cache)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and not (tmp_path / "spring").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_cuda_run_without_cuda_is_refused_before_any_data_are_built(tmp_path, cache):
    with pytest.raises(ValueError, match="CUDA is not available"):
        run(RunSpec(**{**SPRING, "device": "cuda"}), tmp_path, cache_dir=cache, progress=False)


def test_a_write_cut_short_leaves_no_temporary_file_behind_after_the_run(tmp_path, cache):
    spec = RunSpec(**SPRING)
    out_json, out_npz, _ = _files(tmp_path, spec)
    out_json.parent.mkdir(parents=True)
    stale = out_json.parent / f".{out_npz.name}.abc123.tmp"  # what a kill during the npz write leaves
    stale.write_bytes(b"partial")
    other = out_json.parent / ".some_other_run.npz.xyz.tmp"
    other.write_bytes(b"partial")
    run(spec, tmp_path, cache_dir=cache, progress=False)
    assert not stale.exists() and other.exists()  # only this run's leftovers are removed


def test_two_processes_on_one_folder_never_train_the_same_run_at_once(tmp_path, cache):
    """While one holds a run's lock, another call of the same run waits, then loads the finished result."""
    import threading

    from problems.runner.loop import run_lock

    spec = RunSpec(**SPRING)
    out_json, _, _ = _files(tmp_path, spec)
    results = []
    with run_lock(out_json.parent, spec.key()):
        worker = threading.Thread(target=lambda: results.append(run(spec, tmp_path, cache_dir=cache, progress=False)))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not out_json.exists()  # waiting for the lock, nothing trained
    worker.join(timeout=120)
    assert not worker.is_alive() and results[0]["status"] == "complete" and out_json.exists()
    assert not list(out_json.parent.glob(".*.lock"))  # removed once the result exists
