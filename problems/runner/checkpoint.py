"""Checkpoints of an unfinished run: model, optimizer and batch-generator state, and the curves so far.

A checkpoint is rewritten atomically (:mod:`problems.core.files`) every ``checkpoint_every`` iterations, so an
interrupted run resumes where it stopped and gives the same iterates as an uninterrupted one.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_write_bytes
from .spec import RunSpec

__all__ = ["load_checkpoint", "save_checkpoint"]


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
    """The checkpoint at ``path`` if it belongs to ``spec``, else ``None``."""
    state = torch.load(path, map_location=device, weights_only=False)
    return state if state["spec"] == asdict(spec) else None
