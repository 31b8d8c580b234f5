"""Helpers shared by the ENFORCE tasks (C1 function fitting, C2/C3 nonconvex programs).

* :func:`relu_mlp` builds ``Linear → ReLU → … → Linear``, the backbone of every method in the ENFORCE paper,
  with PyTorch's default ``nn.Linear`` distribution (weights and biases ~ U[−1/√fan_in, 1/√fan_in]) drawn in
  float64 on the CPU from a private ``torch.Generator`` and then cast, as :func:`problems._mlp.make_mlp` does
  for tanh networks: a seed gives the same network on every device and the global RNG is untouched.
* :func:`forward_seconds` times a model's forward pass (the output layer's projection included), the papers'
  "inference time" of one batch.
* :func:`backbone_output` is the raw output ŷ of a :class:`~problems._layered.LayeredModel` (``None`` for a
  plain network), so metrics can report how far the backbone alone is from the constraint set.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["backbone_output", "forward_seconds", "relu_mlp"]


def relu_mlp(sizes: Sequence[int], seed: int, *, device: torch.device | str, dtype: torch.dtype) -> nn.Sequential:
    """``sizes[0] → … → sizes[-1]`` with ReLU after every hidden layer (none after the last)."""
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"Invalid MLP sizes {tuple(sizes)}: need at least two positive layer widths")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        lin = nn.Linear(fan_in, fan_out, device=device, dtype=dtype)
        bound = fan_in**-0.5
        with torch.no_grad():
            for p, shape in ((lin.weight, (fan_out, fan_in)), (lin.bias, (fan_out,))):
                draw = torch.rand(shape, generator=gen, dtype=torch.float64) * (2 * bound) - bound
                p.copy_(draw.to(device=device, dtype=dtype))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


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
