"""Results files of finished runs: ``<results>/<problem>/<key>.json`` and ``<key>.npz``.

The JSON holds the run's config (the spec, the method's name, label, options and resolved settings, the
problem's settings, package versions), its curves, final metrics, timing and the optimizer's last diagnostics;
the npz the prediction arrays for plots. Both are written atomically, the npz first: the JSON marks the run
done.

Integrity. The JSON carries ``format`` (:data:`FORMAT`), the SHA-256 of the npz file's bytes and ``checksum``,
the SHA-256 of its own canonical text without that field, so an edited or damaged file is detected on reading
(the checksum guards against accidents and casual edits; it is not a signature). Both files are data only:
JSON, and ``numpy.load(..., allow_pickle=False)``. A file that cannot be used raises :class:`ResultsFileError`,
one line naming the file and what to do. Files of the first release (no ``format``) are read as they are: they
have no checksum to verify.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sqpoptim

from ..core.files import atomic_write_bytes, atomic_write_text

__all__ = ["FORMAT", "ResultsFileError", "load_results", "read_prediction", "read_result", "versions", "write_result"]

FORMAT = 2
_REQUIRED = ("status", "config", "curves", "final", "timing")


class ResultsFileError(RuntimeError):
    """A results file that cannot be used; the message names the file and what to do."""


def versions() -> dict[str, str]:
    return {"sqpoptim": sqpoptim.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _checksum(result: dict[str, Any]) -> str:
    body = {k: v for k, v in result.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True).encode()).hexdigest()


def write_result(out_json: Path, out_npz: Path, result: dict[str, Any], prediction: dict[str, np.ndarray]) -> dict:
    """Write the prediction arrays, then the result; returns the result exactly as a later read gives it."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in prediction.items()})
    data = buf.getvalue()
    atomic_write_bytes(out_npz, data)
    result = json.loads(json.dumps(result, allow_nan=True))  # tuples become lists, as on reading
    result = {"format": FORMAT, **result, "prediction_sha256": hashlib.sha256(data).hexdigest()}
    result["checksum"] = _checksum(result)
    atomic_write_text(out_json, json.dumps(result, allow_nan=True))  # the JSON last: it marks the run done
    return result


def _fix(path: Path) -> str:
    return f"delete {path.name} and {path.with_suffix('.npz').name} in {path.parent} to train this run again"


def read_result(path: str | Path) -> dict[str, Any]:
    """The result in ``path``, verified (:class:`ResultsFileError` if it is damaged, edited or of a newer
    format)."""
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ResultsFileError(f"results file {path} is not readable JSON ({err}); {_fix(path)}") from None
    if not isinstance(result, dict) or any(k not in result for k in _REQUIRED):
        raise ResultsFileError(f"results file {path} is not a result of this runner; {_fix(path)}")
    fmt = result.get("format")
    if fmt is None:
        return result  # the first release's files carry no checksum
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise ResultsFileError(
            f"results file {path} has format {fmt!r}, newer than this version reads ({FORMAT}); "
            "use the version that wrote it, or another results folder"
        )
    if result.get("checksum") != _checksum(result):
        raise ResultsFileError(f"results file {path} was modified or damaged (checksum mismatch); {_fix(path)}")
    return result


def read_prediction(result: dict[str, Any]) -> dict[str, np.ndarray]:
    """The prediction arrays of a result read by :func:`load_results`, verified against its checksum."""
    path = Path(result["prediction_file"])
    fix = _fix(path.with_suffix(".json"))
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ResultsFileError(f"prediction file {path} is missing or unreadable ({err.strerror}); {fix}") from None
    expected = result.get("prediction_sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ResultsFileError(f"prediction file {path} was modified or damaged (checksum mismatch); {fix}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ResultsFileError(f"prediction file {path} is not a readable npz ({err}); {fix}") from None


def load_results(results_dir: str | Path, problem: str) -> list[dict[str, Any]]:
    """Every finished run of ``problem`` under ``results_dir`` (``status`` "complete" or "diverged"), verified;
    each with ``prediction_file``, the path of its prediction arrays."""
    folder = Path(results_dir) / problem
    runs = []
    for path in sorted(folder.glob("*.json")):
        data = read_result(path)
        if data.get("status") in ("complete", "diverged"):
            data["prediction_file"] = str(path.with_suffix(".npz"))
            runs.append(data)
    return runs
