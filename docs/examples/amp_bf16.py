"""bf16 autocast inside the closure: the loss's forward in bfloat16, the constraints in float32."""

import torch

import sqpoptim

device = "cpu"  # "cuda" on a GPU: autocast's device_type is the parameters' device type
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)
).to(device)
opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2)  # float32 parameters, as with any autocast

generator = torch.Generator().manual_seed(1)
x = torch.randn(256, 4, generator=generator).to(device)
y = torch.randn(256, 3, generator=generator).to(device)
x_c = torch.randn(8, 4, generator=generator).to(device)  # the three outputs must sum to one here


def closure():
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        prediction = model(x)  # the expensive forward, in bfloat16
    loss = ((prediction.float() - y) ** 2).mean()
    c = model(x_c).sum(dim=1) - 1.0  # outside autocast: float32, so c = 0 can be met beyond bf16's 3 digits
    return loss, c


for _ in range(200):
    loss, c = opt.step(closure)
print(f"loss {loss.item():.3e}, max |c| {c.abs().max().item():.1e}")
