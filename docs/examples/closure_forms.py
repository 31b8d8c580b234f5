"""What a closure returns: ``(loss, c)``, ``(loss, c, J)`` or ``(loss, PointwiseConstraints(...))``.

Each form is a function that builds a closure for a model; the guide shows them one at a time and the test suite
checks that the forms agree and that the wrong closure gets the contract in its error message.
"""

import torch

import sqpoptim

torch.manual_seed(0)
x = torch.randn(64, 4, dtype=torch.float64)  # inputs
y = torch.randn(64, 3, dtype=torch.float64)  # targets
x_c = torch.randn(5, 4, dtype=torch.float64)  # where the three outputs must sum to one


def closure_with_graph(model):
    """``(loss, c)``: c keeps its autograd graph; the optimizer forms J = ∂c/∂θ from it."""

    def closure():
        loss = ((model(x) - y) ** 2).mean()
        c = model(x_c).sum(dim=1) - 1.0  # [5]
        return loss, c

    return closure


def closure_with_jacobian(model):
    """``(loss, c, J)``: J given, here per parameter (``[m, *p.shape]`` blocks in ``model.parameters()``
    order), for the linear model y = W x + b, where c_i = Σ_j (W x_i + b)_j − 1 is linear in (W, b)."""

    def closure():
        loss = ((model(x) - y) ** 2).mean()
        with torch.no_grad():
            c = model(x_c).sum(dim=1) - 1.0
        m, (n_out, n_in) = x_c.shape[0], model.weight.shape
        J_weight = x_c[:, None, :].expand(m, n_out, n_in)  # ∂c_i/∂W_jk = x_ik
        J_bias = torch.ones(m, n_out, dtype=x_c.dtype)  # ∂c_i/∂b_j = 1
        return loss, c, [J_weight, J_bias]

    return closure


t_data = torch.linspace(0, 1, 20, dtype=torch.float64).unsqueeze(1)
u_data = torch.exp(-t_data)
t_c = torch.tensor([[0.25], [0.5], [0.75]], dtype=torch.float64)


def closure_pointwise(model):
    """``(loss, PointwiseConstraints(model, residual, points))``: a residual written for one point with
    ``torch.func``; the optimizer evaluates c and J in one ``vmap`` over the points."""

    def residual(f, t):  # f(t) = model(t[None])[0]; the ODE u' + u = 0 at one point t
        u = lambda s: f(s).squeeze()  # noqa: E731
        du = torch.func.grad(u)
        return du(t).squeeze() + u(t)

    def closure():
        loss = ((model(t_data) - u_data) ** 2).mean()
        return loss, sqpoptim.PointwiseConstraints(model, residual, t_c)

    return closure


def closure_calling_backward(model, opt):
    """Wrong: a torch-style closure. The optimizer needs the graphs of loss and c, and never reads ``p.grad``."""

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure
