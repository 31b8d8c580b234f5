"""torch.compile with a constrained optimizer: compile the model for the loss, keep the constraints eager.

``torch.compile(model)`` returns a wrapper that shares ``model``'s parameters, so the closure can run the
compiled forward for the loss (back-propagated once per step) and the eager ``model`` for the constraints
(back-propagated once per constraint, and here through an input derivative, a double backward).
"""

import torch

import sqpoptim

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
compiled = torch.compile(model)  # the same parameters as model
opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)

t_data = torch.linspace(0, 1, 20).unsqueeze(1)
u_data = torch.exp(-t_data)
t_c = torch.tensor([[0.25], [0.5], [0.75]], requires_grad=True)


def closure():
    loss = ((compiled(t_data) - u_data) ** 2).mean()  # compiled forward
    u = model(t_c)  # eager forward for c: its graph is back-propagated m times, and twice through u'
    du = torch.autograd.grad(u.sum(), t_c, create_graph=True)[0]
    return loss, (du + u).squeeze(1)


for _ in range(200):
    loss, c = opt.step(closure)
print(f"loss {loss.item():.2e}, max |c| {c.abs().max().item():.1e}")
