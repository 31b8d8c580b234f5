"""Results files of finished runs: ``<results>/<problem>/<key>.json`` and ``<key>.npz``.

The JSON holds the run's config (the spec, the method's name, label and options, the problem's settings,
package versions), its curves, final metrics, timing and the optimizer's last diagnostics; the npz the
prediction arrays for plots. Both are written atomically, the JSON last: it marks the run done.
"""

from __future__ import annotations

import io
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sqpoptim

from ..core.files import atomic_write_bytes, atomic_write_text

__all__ = ["load_results", "read_result", "versions", "write_result"]


def versions() -> dict[str, str]:
    return {"sqpoptim": sqpoptim.__version__, "torch": torch.__version__, "python": platform.python_version()}


def write_result(out_json: Path, out_npz: Path, result: dict[str, Any], prediction: dict[str, np.ndarray]) -> dict:
    """Write the prediction arrays, then the result; returns the result exactly as a later read gives it."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in prediction.items()})
    atomic_write_bytes(out_npz, buf.getvalue())
    text = json.dumps(result, allow_nan=True)
    atomic_write_text(out_json, text)  # the JSON last: it marks the run done
    return json.loads(text)  # tuples become lists, as on reading


def read_result(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def load_results(results_dir: str | Path, problem: str) -> list[dict[str, Any]]:
    """Every finished run of ``problem`` under ``results_dir`` (``status`` "complete" or "diverged")."""
    folder = Path(results_dir) / problem
    runs = []
    for path in sorted(folder.glob("*.json")):
        data = read_result(path)
        if data.get("status") in ("complete", "diverged"):
            data["prediction_file"] = str(path.with_suffix(".npz"))
            runs.append(data)
    return runs
