"""Helpers shared by the ENFORCE tasks (C1 function fitting, C2/C3 nonconvex programs).

* :func:`relu_mlp` (from :mod:`problems._mlp`) builds ``Linear → ReLU → … → Linear``, the
  backbone of every method in the ENFORCE paper, with :func:`problems._mlp.make_mlp`'s seeded PyTorch-default
  initialisation: a seed gives the same network on every device and the global RNG is untouched.
* :func:`forward_seconds` times a model's forward pass (the output layer's projection included), the papers'
  "inference time" of one batch.
* :func:`backbone_output` is the raw output ŷ of a :class:`~problems._layered.LayeredModel` (``None`` for a
  plain network), so metrics can report how far the backbone alone is from the constraint set.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from ._mlp import relu_mlp

__all__ = ["backbone_output", "forward_seconds", "relu_mlp"]


def forward_seconds(model: nn.Module, x: Tensor, repeats: int = 3) -> tuple[Tensor, float]:
    """``(model(x), seconds)``: the output of the first call and the fastest of ``repeats`` timed calls (no
    graph; the device is synchronised around each call)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    best, out = float("inf"), None
    with torch.no_grad():
        for _ in range(max(1, repeats)):
            sync()
            t0 = time.perf_counter()
            y = model(x)
            sync()
            best = min(best, time.perf_counter() - t0)
            out = y if out is None else out
    return out, best


def backbone_output(model: nn.Module, x: Tensor) -> Tensor | None:
    """The raw output ŷ of a backbone-plus-layer model (no graph), or ``None`` for a plain network."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(model, "layer"):
        return None
    with torch.no_grad():
        return backbone(x)
