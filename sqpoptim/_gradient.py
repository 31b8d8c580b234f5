"""The objective's gradient over the flattened parameters, formed by the optimizer (not by ``backward()``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._closure import CONTRACT_HINT
from ._layout import FlatLayout, as_real

__all__ = ["flat_gradient"]

_FREED_GRAPH = "backward through the graph a second time"


def flat_gradient(loss: Tensor, layout: FlatLayout, *, retain_graph: bool = False) -> Tensor:
    """``[n]`` gradient of the scalar ``loss`` with respect to the flat parameters (zero where a parameter does
    not reach the loss, and everywhere when the loss is constant)."""
    if not loss.requires_grad:  # e.g. a pure feasibility problem: f is constant
        return torch.zeros(layout.n, dtype=layout.dtype, device=layout.device)
    try:
        grads = torch.autograd.grad(loss, layout.params, allow_unused=True, retain_graph=retain_graph)
    except RuntimeError as err:
        if _FREED_GRAPH in str(err):
            raise RuntimeError(
                f"the loss's graph was already freed; did the closure call backward()? {CONTRACT_HINT}"
            ) from err
        raise
    parts = []
    for gp, v in zip(grads, layout.views):
        if gp is None:
            parts.append(torch.zeros(v.numel(), dtype=v.dtype, device=v.device))
            continue
        if gp.is_sparse:
            raise ValueError("sparse gradients are not supported (use a dense embedding, sparse=False)")
        parts.append(as_real(gp).reshape(-1))
    return torch.cat(parts)
