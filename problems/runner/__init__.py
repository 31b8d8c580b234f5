"""Train any method on any problem; write each run's results atomically; resume interrupted runs and sweeps.

* :mod:`problems.runner.spec` — :class:`RunSpec`, what identifies a run, and its file key;
* :mod:`problems.runner.loop` — :func:`run` (train, resume or load one run) and :func:`run_sweep`;
* :mod:`problems.runner.checkpoint` — checkpoints of unfinished runs;
* :mod:`problems.runner.results` — the results files of finished runs, and :func:`load_results`.
"""

from .loop import run, run_sweep
from .results import load_results
from .spec import RunSpec

__all__ = ["RunSpec", "load_results", "run", "run_sweep"]
