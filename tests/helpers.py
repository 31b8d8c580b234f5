"""Small models and problems shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

f64 = torch.float64


class TinyPINN(nn.Module):
    """u(x, t): a 2-16-16-1 tanh MLP, optionally with a complex-valued layer (to test real views)."""

    def __init__(self, complex_layer: bool = False, dtype: torch.dtype = f64, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(2, 16, dtype=dtype)
        self.l2 = nn.Linear(16, 16, dtype=dtype)
        self.l3 = nn.Linear(16, 1, dtype=dtype)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
        self.spectral = None
        if complex_layer:
            cdtype = torch.complex128 if dtype == f64 else torch.complex64
            w = torch.randn(16, generator=gen, dtype=dtype) + 1j * torch.randn(16, generator=gen, dtype=dtype)
            self.spectral = nn.Parameter(0.3 * w.to(cdtype))

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(xt))
        if self.spectral is not None:  # a complex "mode" weighting, as in a Fourier layer
            h = h + torch.real(h.to(self.spectral.dtype) * self.spectral)
        h = torch.tanh(self.l2(h))
        return self.l3(h)


def burgers_residual(model: nn.Module, xt: torch.Tensor, nu: float = 0.01) -> torch.Tensor:
    """u_t + u u_x - nu u_xx at the rows of xt, through autograd input derivatives (create_graph=True)."""
    xt = xt.detach().requires_grad_(True)
    u = model(xt).squeeze(-1)
    du = torch.autograd.grad(u.sum(), xt, create_graph=True)[0]
    u_x, u_t = du[:, 0], du[:, 1]
    u_xx = torch.autograd.grad(u_x.sum(), xt, create_graph=True)[0][:, 0]
    return u_t + u * u_x - nu * u_xx


def burgers_residual_pointwise(f, z: torch.Tensor, nu: float = 0.01) -> torch.Tensor:
    """The same residual at one point z = (x, t), written with torch.func for PointwiseConstraints."""
    from torch.func import grad

    u = lambda p: f(p).squeeze()  # noqa: E731
    du = grad(u)
    u_x = lambda p: du(p)[0]  # noqa: E731
    d = du(z)
    u_xx = grad(u_x)(z)[0]
    return d[1] + u(z) * d[0] - nu * u_xx


def finite_difference_jacobian(fn, params: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """Central differences of fn() (a 1-D tensor) over the flattened real views of params."""
    cols = []
    for p in params:
        flat = (torch.view_as_real(p) if p.is_complex() else p).detach().view(-1)  # shares p's storage
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            plus = fn().detach().clone()
            flat[i] = old - eps
            minus = fn().detach().clone()
            flat[i] = old
            cols.append((plus - minus) / (2 * eps))
    return torch.stack(cols, 1)
