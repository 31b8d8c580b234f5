"""Warnings that point at the caller's line, not at the package's internals."""

from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["warn_user"]

_INTERNAL = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first frame outside sqpoptim and torch (the user's ``opt.step(...)``
    line), whatever the depth of the wrappers ``torch.optim`` puts around ``step``."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
