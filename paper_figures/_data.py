"""Compact, committed copies of the sweeps behind the figures, so every figure regenerates from a fresh clone.

``export(results_dir, problem, name)`` reads the runner's results (``<results_dir>/<problem>/*.json`` and the
prediction ``.npz`` files) and writes ``paper_figures/data/<name>.json.gz``: each run's config, final metrics,
curves at the evaluation points, the maximum and median of the per-iteration gradient norm, timing, and — for
the best run of each method (lowest final objective) — the prediction arrays. Per-iteration training curves
are dropped (they are what makes the raw results large). ``load(name)`` returns the runs in the format
:func:`problems.plots.make_figures` takes.

    python paper_figures/_data.py results/paper spring spring     # results folder, problem, export name
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parent / "data"

__all__ = ["DATA", "export", "load"]


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _rounded(values: Any) -> Any:
    """Nested lists with 6 significant digits: plenty for a figure, a third of the text of full doubles."""
    a = np.asarray(values, dtype=float)
    return np.vectorize(lambda v: float(f"{v:.6g}"), otypes=[float])(a).tolist() if a.size else a.tolist()


def export(results_dir: str | Path, problem: str, name: str) -> Path:
    from problems.plots import best_runs
    from problems.runner import load_results
    from problems.runner.results import read_prediction

    runs = load_results(results_dir, problem)
    if not runs:
        raise FileNotFoundError(f"no finished runs of {problem!r} under {results_dir}")
    best = best_runs(runs)
    out = []
    for r in runs:
        g = _finite(r["curves"].get("train_grad_norm", []))
        compact = {
            "status": r["status"],
            **({"diverged_at": r["diverged_at"]} if r["status"] == "diverged" else {}),
            "config": r["config"],
            "final": r["final"],
            "timing": r["timing"],
            "curves": {k: _rounded(r["curves"][k]) for k in ("iteration", "objective", "test_mse", "max_abs_c")},
            "grad_norm": {"max": max(g), "median": float(np.median(g))} if g else None,
        }
        if best[r["config"]["method"]] is r:
            compact["prediction"] = {k: _rounded(v) for k, v in read_prediction(r).items()}
        out.append(compact)
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"{name}.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump({"problem": problem, "runs": out}, f)
    return path


def load(name: str) -> tuple[str, list[dict[str, Any]]]:
    """``(problem, runs)`` of a committed export."""
    with gzip.open(DATA / f"{name}.json.gz", "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["problem"], data["runs"]


if __name__ == "__main__":
    print(export(sys.argv[1], sys.argv[2], sys.argv[3]))


def problem_figures(
    script: str, exports: dict[str, str], kinds: tuple[str, ...], out: Path, prefix: str = ""
) -> list[Path]:
    """Write :func:`problems.plots.make_figures`' figures of the given ``kinds`` for each export
    (``{problem name: export name}``) as ``out/<prefix><problem>_<kind>.png``; exports not yet written are
    skipped and named in one message from ``script``."""
    from problems.plots import make_figures

    written, missing = [], []
    for name, export_name in exports.items():
        if not (DATA / f"{export_name}.json.gz").exists():
            missing.append(name)
            continue
        problem, runs = load(export_name)
        for kind, fig in make_figures(runs, problem).items():
            if kind in kinds:
                path = out / f"{prefix}{name}_{kind}.png"
                fig.savefig(path, dpi=110)
                written.append(path)
    if missing:
        print(f"{script}: no export yet for {', '.join(missing)}")
    return written
