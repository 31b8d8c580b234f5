"""Atomic file writes: a reader sees either the old file or the complete new one, never a partial write.

The data is written to a temporary file in the target's folder, flushed to disk and renamed over the target
(``os.replace`` is atomic on POSIX and Windows). ``tempfile.mkstemp`` creates its file readable by the owner
only (0600); the file is given the mode a plain ``open(path, "w")`` would have given it (0666 less the umask,
usually 0644) before the rename, so result folders can be shared like any other files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "default_file_mode"]


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the process umask."""
    mask = os.umask(0o022)  # reading the umask means setting it; restored on the next line
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "fchmod"):  # POSIX; on Windows mkstemp's file is already writable by the user
                os.fchmod(f.fileno(), default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
