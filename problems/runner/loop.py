"""Train any method on any problem: the training loop, resumption and sweeps.

One run = (problem, size, method with options, learning rate, batch mode, batch seed, iterations, device,
dtype, model seed, evaluation interval, threads): a :class:`~problems.runner.spec.RunSpec`. Its results go to
``<results>/<problem>/<key>.json`` and ``<key>.npz`` (:mod:`problems.runner.results`). While it runs, a
checkpoint ``<key>.ckpt`` (:mod:`problems.runner.checkpoint`) is rewritten every ``checkpoint_every``
iterations, so an interrupted run resumes where it stopped and gives the same iterates; a finished run is never
redone. :func:`run_sweep` validates every spec (problem, method and options, settings) before the first run
starts, so a typo in the last spec of a sweep does not wait for the others to train.

Conventions: one "epoch" of the papers' budgets is one iteration (as in the authors' code); full-batch runs
use every objective term, mini-batch runs draw a fresh batch from a generator seeded with the run's seed; the
model initialisation seed is ``model_seed`` (shared by all runs, so methods start from the same weights).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from .. import get_problem, problem_class, problem_names
from ..core.problem import Problem
from ..methods import parse_method, resolve_method
from .checkpoint import load_checkpoint, save_checkpoint
from .parallel import Ranks, shard_batch, split_is_even
from .results import read_result, versions, write_result
from .spec import RunSpec

__all__ = ["run", "run_sweep", "validate_spec"]


@dataclass
class _Progress:
    """A progress line: every 0.5 s on a terminal, every 30 s in a log. The rate counts the iterations of this
    session only (``first``: where a resumed run started), so it is not inflated by the resumed ones."""

    label: str
    total: int
    first: int = 0
    stream: Any = field(default_factory=lambda: sys.stderr)
    last: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def due(self) -> bool:
        return time.perf_counter() - self.last >= (0.5 if self.stream.isatty() else 30.0)

    def update(self, it: int, objective: float, c_inf: float, force: bool = False) -> None:
        if not (force or self.due()):
            return
        now = time.perf_counter()
        tty = self.stream.isatty()
        self.last = now
        frac = it / max(self.total, 1)
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        rate = (it - self.first) / max(now - self.start, 1e-9)
        line = f"{self.label} [{bar}] {it}/{self.total} objective {objective:.3e} max|c| {c_inf:.2e} {rate:.1f} it/s"
        self.stream.write(("\r" + line) if tty else (line + "\n"))
        if tty and force:
            self.stream.write("\n")
        self.stream.flush()


_PROBLEMS: dict[tuple, Problem] = {}


def _problem(spec: RunSpec, cache_dir: Path | None) -> Problem:
    key = (spec.problem, spec.size, spec.device, spec.dtype, str(cache_dir))
    if key not in _PROBLEMS:
        _PROBLEMS[key] = get_problem(
            spec.problem, size=spec.size, device=spec.device, dtype=getattr(torch, spec.dtype), cache_dir=cache_dir
        )
    return _PROBLEMS[key]


def _grad_norm(opt: torch.optim.Optimizer) -> torch.Tensor | None:
    """‖g‖ of the last step as a tensor (no host synchronisation), where the optimizer reports it."""
    return opt.diagnostics(sync=False).get("g_norm") if hasattr(opt, "diagnostics") else None


def _diagnostics(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's last-step diagnostics (with ``normal_damping``, the count of rejected steps among them)."""
    if not hasattr(opt, "diagnostics"):
        return {}
    return _plain(opt.diagnostics())


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (int, float, bool)) else str(v)) for k, v in d.items()}


def _settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A method's resolved settings as JSON values (classes and dtypes by name)."""
    plain = (bool, int, float, str, type(None))
    out = {}
    for k, v in settings.items():
        if isinstance(v, (tuple, list)) and all(isinstance(x, plain) for x in v):
            out[k] = list(v)
        elif isinstance(v, plain):
            out[k] = v
        else:
            out[k] = getattr(v, "__name__", str(v))
    return out


def validate_spec(spec: RunSpec) -> None:
    """Refuse a spec that cannot run, before any data are built: its settings, its problem, its method and
    options (typed and checked by constructing the optimizer or layer once), and whether they fit together."""
    spec.validate()
    try:
        device = torch.device(spec.device)
    except RuntimeError:
        raise ValueError(f"Invalid device {spec.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec.device!r}: CUDA is not available on this machine (use --device cpu)")
    if spec.problem not in problem_names():
        raise ValueError(f"Unknown problem {spec.problem!r}; known problems: {', '.join(problem_names())}")
    method, _ = resolve_method(spec.method, spec.lr)
    method.check_problem(problem_class(spec.problem))


def _legacy_result(out_dir: Path, spec: RunSpec) -> dict[str, Any] | None:
    """A result the first release wrote for this spec (its key ignored some fields): used only if every field of
    its recorded config equals the spec's."""
    path = out_dir / f"{spec.legacy_key()}.json"
    if not path.exists():
        return None
    result = read_result(path)
    config = result["config"]
    # the first release recorded every field but the thread count (which it left to torch) and ran on one process
    same = (
        "threads" not in config
        and spec.nproc == 1
        and all(config.get(k) == v for k, v in asdict(spec).items() if k not in ("threads", "nproc"))
    )
    return result if same else None


def run(
    spec: RunSpec,
    results_dir: str | Path = "results",
    *,
    cache_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """Run (or resume, or load) one training run and return its results dictionary.

    ``stop_after`` stops after that many iterations *of this call*, leaving the checkpoint behind (used to
    test resumption; a real interruption leaves the same state). ``ranks``: this process's place in a run on
    several processes (:mod:`problems.runner.parallel`); only rank 0 writes files, evaluates and reports, and
    the other ranks return ``{"status": "worker"}``."""
    if spec.nproc != (1 if ranks is None else ranks.world):
        raise ValueError(
            f"the run's spec says nproc={spec.nproc} but it runs on {1 if ranks is None else ranks.world} "
            "process(es); run it with --nproc (or torchrun) as its spec says"
        )
    out_dir = Path(results_dir) / spec.problem
    out_json, out_npz, ckpt = (out_dir / f"{spec.key()}{ext}" for ext in (".json", ".npz", ".ckpt"))
    # On several processes whether the run is finished is decided once, by rank 0, below: ranks that looked at
    # the folder at different moments could otherwise go different ways. (Legacy results are one-process runs.)
    if ranks is None and out_json.exists():
        return read_result(out_json)
    legacy = _legacy_result(out_dir, spec)
    if legacy is not None:
        return legacy
    validate_spec(spec)
    writer = ranks is None or ranks.writer
    # the writer alone holds the lock (two ranks of one run waiting on each other's flock would never start)
    lock = run_lock(out_dir, spec.key(), done=out_json.exists) if writer else contextlib.nullcontext()
    with lock:  # another process trains this run: wait for it
        finished = out_json.exists()
        if ranks is not None:
            finished = ranks.broadcast_flag(finished)  # every rank goes the writer's way
        if finished:
            return read_result(out_json)
        if writer:
            for stale in out_dir.glob(f".{spec.key()}.*.tmp"):  # a write cut short by a kill: never a complete file
                stale.unlink(missing_ok=True)
        threads = torch.get_num_threads()
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        try:
            return _train(spec, out_json, out_npz, ckpt, cache_dir, checkpoint_every, progress, stop_after, ranks)
        finally:
            torch.set_num_threads(threads)


@contextlib.contextmanager
def run_lock(out_dir: Path, key: str, done: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """Hold ``<out_dir>/.<key>.lock`` exclusively while a run trains, so two sweeps over one results folder do
    not train (or clean up after) the same run at once; whoever gets the lock checks for a finished result
    first. The operating system releases the lock when its process ends, however it ends (``kill -9``
    included), so a lock is never stale. The lock file is removed once ``done()`` (the result exists): a
    process still waiting on it then finds the result. No locking where ``fcntl`` is missing (Windows)."""
    if fcntl is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f".{key}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if done():
                path.unlink(missing_ok=True)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _train(
    spec, out_json, out_npz, ckpt, cache_dir, checkpoint_every, progress, stop_after, ranks: Ranks | None
) -> dict[str, Any]:
    method, options = resolve_method(spec.method, spec.lr)
    writer = ranks is None or ranks.writer
    if ranks is not None and not writer:
        ranks.barrier()  # rank 0 builds (and caches) the data first
    problem = _problem(spec, Path(cache_dir) if cache_dir else None)
    if ranks is not None and writer:
        ranks.barrier()
    torch.manual_seed(spec.model_seed)
    # one process: setup as before (a method need not know about process groups until it runs on several)
    several = {} if ranks is None else {"process_group": ranks.group}
    training = method.setup(problem, problem.make_model(spec.model_seed), spec.lr, options, **several)
    model, opt = training.model, training.optimizer
    gen = torch.Generator().manual_seed(spec.seed)
    evals = spec.evaluation_points()
    n = spec.iterations
    dev = next(model.parameters()).device
    train_loss = torch.full((n,), math.nan, dtype=torch.float64, device=dev)
    train_c = torch.full((n,), math.nan, dtype=torch.float64, device=dev)
    train_g = torch.full((n,), math.nan, dtype=torch.float64, device=dev)  # ‖g‖ the optimizer saw
    curves: dict[str, list[float]] = {"iteration": [], "objective": [], "test_mse": [], "max_abs_c": []}
    start, step_time = 0, 0.0
    if ckpt.exists():
        state = load_checkpoint(ckpt, spec, dev)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            train_loss[: state["iteration"]] = state["train_loss"].to(dev)
            train_c[: state["iteration"]] = state["train_c"].to(dev)
            train_g[: state["iteration"]] = state["train_g"].to(dev)
            curves, start, step_time = state["curves"], state["iteration"], state["step_time"]
    every = checkpoint_every or max(1, n // 10)
    bar = _Progress(f"{spec.problem}/{spec.method} lr={spec.lr:g} {spec.batch} s{spec.seed}", n, first=start)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def evaluate(it: int) -> None:
        if not writer:  # the replicas are identical: rank 0 evaluates for all
            return
        model.eval()  # output layers switch to their inference tolerances
        m = problem.metrics(model)
        model.train()
        curves["iteration"].append(it)
        for key in ("objective", "test_mse", "max_abs_c"):
            curves[key].append(float(m[key]))
        if progress:
            bar.update(it, m["objective"], m["max_abs_c"], force=it == n)

    if start == 0 and 0 in evals:
        evaluate(0)
    # Training time is measured over the segments between evaluations (no synchronisation per step).
    eval_set = set(evals)
    sync()
    t0 = time.perf_counter()
    diverged: tuple[int, str] | None = None
    even = True
    for it in range(start, n):
        batch = None if spec.batch == "full" else problem.sample_batch(gen)
        if ranks is not None and batch is not None:  # every rank drew the same batch; each keeps its share
            even = even and split_is_even(batch, ranks.world)
            batch = shard_batch(batch, ranks)
        try:
            loss, c = opt.step(training.closure(batch))
        except FloatingPointError as err:  # diverged: recorded as such; a sweep goes on with the next run
            diverged = (it, str(err))
            break
        train_loss[it] = loss.detach().double()
        train_c[it] = c.detach().abs().max().double() if c.numel() else 0.0
        g_norm = _grad_norm(opt)
        if g_norm is not None:
            train_g[it] = g_norm.double()
        done = it + 1
        stopping = stop_after is not None and done - start >= stop_after and done < n
        if done in eval_set or stopping or (done < n and done % every == 0):
            sync()
            step_time += time.perf_counter() - t0
            if done in eval_set:
                evaluate(done)
            if writer and (stopping or (done < n and done % every == 0)):
                logs = (train_loss, train_c, train_g)
                save_checkpoint(ckpt, spec, model, opt, gen, logs, curves, done, step_time)
            if stopping:
                if ranks is not None:
                    ranks.barrier()  # the checkpoint is on disk for every rank
                return {"status": "interrupted", "iteration": done}
            t0 = time.perf_counter()
        elif progress and writer and bar.due():
            bar.update(done, float(train_loss[it]), float(train_c[it]))
    sync()
    step_time += time.perf_counter() - t0 if start < n else 0.0
    if not writer:
        assert ranks is not None
        ranks.barrier()  # returns once rank 0 has written the results
        return {"status": "worker"}
    model.eval()
    if diverged is None:
        final = {k: float(v) for k, v in problem.metrics(model).items()}
    else:  # the parameters are those of the last finite step; the run's outcome is the divergence
        final = {k: math.nan for k in ("objective", "test_mse", "max_abs_c")}
    pred = problem.prediction(model)
    model.train()
    result = {
        "status": "complete" if diverged is None else "diverged",
        **({"diverged_at": diverged[0], "error": diverged[1]} if diverged else {}),
        "config": {
            **asdict(spec),
            "method_name": method.name,
            "method_label": method.label,
            "options": parse_method(spec.method)[1],
            "settings": _settings(dict(training.settings)),
            "problem_settings": problem.describe(),
            "versions": versions(),
            **({"batch_split": "even" if even else "uneven"} if ranks is not None else {}),
        },
        "curves": {
            **curves,
            "train_loss": train_loss.cpu().tolist(),
            "train_max_abs_c": train_c.cpu().tolist(),
            "train_grad_norm": train_g.cpu().tolist(),
        },
        "final": final,
        "timing": {"step_seconds_total": step_time, "ms_per_iteration": 1e3 * step_time / max(n, 1)},
        "diagnostics": _diagnostics(opt),
    }
    saved = write_result(out_json, out_npz, result, pred)
    ckpt.unlink(missing_ok=True)
    if ranks is not None:
        ranks.barrier()
    return saved


def run_sweep(specs: list[RunSpec], results_dir: str | Path = "results", **kwargs: Any) -> list[dict[str, Any]]:
    """Run every spec in order; finished runs are loaded, interrupted ones resumed. Every spec is validated
    first (:func:`validate_spec`): a bad one stops the sweep before anything trains, naming the spec."""
    for spec in specs:
        try:
            validate_spec(spec)
        except (ValueError, KeyError) as err:
            raise ValueError(f"{spec.problem} {spec.method} lr={spec.lr:g}: {err}") from None
    out = []
    for i, spec in enumerate(specs):
        if kwargs.get("progress", True):
            print(
                f"[{i + 1}/{len(specs)}] {spec.problem} {spec.method} lr={spec.lr:g} {spec.batch} seed={spec.seed}",
                file=sys.stderr,
            )
        out.append(run(spec, results_dir, **kwargs))
    return out
