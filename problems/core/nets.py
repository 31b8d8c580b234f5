"""Seeded multilayer perceptrons: the networks of the point-wise problems and of the output-layer tasks.

* :func:`make_mlp` builds ``Linear → tanh → … → Linear`` with PyTorch's default ``nn.Linear`` distribution
  (weights and biases ~ U[−1/√fan_in, 1/√fan_in]) drawn from a private ``torch.Generator``, so the global RNG
  is untouched and a seed gives the same network on every device. The draw is made in float64 on the CPU and
  then cast, so the float32 network is the rounded float64 one.
* :func:`relu_mlp` is the same network with ReLU (the output-layer papers' backbones).
* :func:`forked_mlp` draws ``nn.Linear``'s own initialisation from the global RNG seeded inside
  ``torch.random.fork_rng`` (the caller's RNG state is restored), in float64: the Burgers model, kept so that
  its recorded results reproduce.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["forked_mlp", "make_mlp", "num_parameters", "relu_mlp"]


def make_mlp(sizes: Sequence[int], seed: int, *, device: torch.device | str, dtype: torch.dtype) -> nn.Sequential:
    """``sizes[0] → sizes[1] → … → sizes[-1]`` with tanh after every hidden layer (none after the last)."""
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
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def relu_mlp(sizes: Sequence[int], seed: int, *, device: torch.device | str, dtype: torch.dtype) -> nn.Sequential:
    """:func:`make_mlp`'s seeded PyTorch-default initialisation with ReLU in place of tanh (the layer papers'
    networks): the same seed gives the same weights as the tanh network."""
    net = make_mlp(sizes, seed, device=device, dtype=dtype)
    return nn.Sequential(*(nn.ReLU() if isinstance(m, nn.Tanh) else m for m in net))


def forked_mlp(sizes: Sequence[int], seed: int) -> nn.Sequential:
    """A float64 CPU tanh MLP initialised by ``nn.Linear`` itself from the global RNG seeded with ``seed`` inside
    ``torch.random.fork_rng`` (the caller's RNG state is untouched)."""
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(fan_in, fan_out, dtype=torch.float64))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
