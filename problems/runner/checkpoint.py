"""Checkpoints of an unfinished run: model, optimizer and batch-generator state, and the curves so far.

A checkpoint is rewritten atomically (:mod:`problems.core.files`) every ``checkpoint_every`` iterations, so an
interrupted run resumes where it stopped and gives the same iterates as an uninterrupted one.

Checkpoints are read as data only: ``torch.load(..., weights_only=True)`` unpickles tensors, numbers, strings
and containers and refuses everything else, so a crafted file in a shared or downloaded results folder cannot
run code. A file that does not load (truncated, not a checkpoint, holding Python objects) raises
:class:`CheckpointError`, one line naming the file and what to do; nothing is deleted.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_write_bytes
from .spec import RunSpec

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

_KEYS = ("spec", "model", "optimizer", "generator", "train_loss", "train_c", "train_g", "curves", "iteration")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and what to do."""


def save_checkpoint(path: Path, spec: RunSpec, model, opt, gen, logs, curves, it: int, step_time: float) -> None:
    train_loss, train_c, train_g = logs
    buf = io.BytesIO()
    torch.save(
        {
            "spec": asdict(spec),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "train_loss": train_loss[:it].cpu(),
            "train_c": train_c[:it].cpu(),
            "train_g": train_g[:it].cpu(),
            "curves": curves,
            "iteration": it,
            "step_time": step_time,
        },
        buf,
    )
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, spec: RunSpec, device: torch.device) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to ``spec``; ``None`` if it belongs to another spec (a file of
    another version); :class:`CheckpointError` if it cannot be read as a checkpoint."""
    fix = "delete it to restart this run from the beginning (finished runs are not affected)"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # any failure to read is reported the same way, with the file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read as data ({reason[:160]}); {fix}") from None
    if not isinstance(state, dict) or any(k not in state for k in _KEYS):
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this runner; {fix}")
    if state["spec"] != asdict(spec):
        return None
    n = state["iteration"]
    logs_ok = all(isinstance(state[k], torch.Tensor) and state[k].shape == (n,) for k in _KEYS[4:7])
    if not (isinstance(n, int) and 0 < n <= spec.iterations and logs_ok):
        raise CheckpointError(f"checkpoint {path} is inconsistent (iteration {n!r}); {fix}")
    return state
