"""Deterministic data generation with an on-disk cache guarded by a checksum.

Generated arrays are stored as ``<cache_dir>/<name>-<key>.npz`` beside a ``.json`` holding the generation
parameters and the SHA-256 of every array. A cache entry whose checksum does not match (a truncated or edited
file) is regenerated, never trusted. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .files import atomic_write_bytes, atomic_write_text

__all__ = ["cached_arrays", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$SQPOPTIM_CACHE`` if set, else ``~/.cache/sqpoptim``."""
    env = os.environ.get("SQPOPTIM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sqpoptim"


def _digest(arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    out = {}
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h = hashlib.sha256()
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
        out[k] = h.hexdigest()
    return out


def cached_arrays(
    name: str,
    params: Mapping[str, object],
    generate: Callable[[], Mapping[str, np.ndarray]],
    cache_dir: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """Return ``generate()``'s arrays, from the cache when a valid entry for ``(name, params)`` exists.

    ``params`` must hold every setting the data depend on (JSON-serialisable); it keys the cache entry.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    blob = json.dumps({"name": name, **params}, sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    npz, meta = cache / f"{name}-{key}.npz", cache / f"{name}-{key}.json"
    if npz.exists() and meta.exists():
        try:
            with np.load(npz, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            if json.loads(meta.read_text())["sha256"] == _digest(arrays):
                return arrays
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # JSONDecodeError is a ValueError
            pass  # unreadable or stale entry: regenerate below
    arrays = {k: np.asarray(v) for k, v in generate().items()}
    try:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(npz, buf.getvalue())
        atomic_write_text(meta, json.dumps({"params": json.loads(blob), "sha256": _digest(arrays)}, indent=1))
    except OSError:
        pass  # a read-only cache directory must not stop a run: the data were generated in memory
    return arrays
