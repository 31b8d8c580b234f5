"""Step time with the loss's forward compiled (``torch.compile``, inductor) against eager, for ProjectedAdamSQP
and, as the yardstick, ``torch.optim.Adam`` on the same loss.

The SQP closure compiles only the model used for the loss; the constraints (an ODE residual u' + u at 16
points, an input derivative) go through the eager module, which shares the parameters (see the torch.compile
guide for why). Model: tanh MLP 1-128-128-128-1, 4,096 data points. Process CPU time per step, median over
interleaved repetitions after a warm-up that includes compilation; one intra-op thread.

Usage::

    python benchmarks/compile_forward.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import sqpoptim


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    width = 128
    return torch.nn.Sequential(
        torch.nn.Linear(1, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 1),
    )


def steppers(compiled: bool):
    t = torch.linspace(0, 1, 4096).unsqueeze(1)
    u = torch.exp(-t)
    t_c = torch.linspace(0.05, 0.95, 16).unsqueeze(1)

    model = make_model()
    forward = torch.compile(model) if compiled else model
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-3)

    def closure():
        loss = ((forward(t) - u) ** 2).mean()
        x = t_c.clone().requires_grad_(True)
        v = model(x)
        dv = torch.autograd.grad(v.sum(), x, create_graph=True)[0]
        return loss, (dv + v).squeeze(1)

    adam_model = make_model()
    adam_forward = torch.compile(adam_model) if compiled else adam_model
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)

    def adam_step():
        adam.zero_grad()
        ((adam_forward(t) - u) ** 2).mean().backward()
        adam.step()

    return {"sqp-adam": lambda: opt.step(closure), "adam": adam_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", sqpoptim.RankDeficiencyWarning)
    runs = {
        f"{name} {mode}": step for mode in ("eager", "compiled") for name, step in steppers(mode == "compiled").items()
    }
    for step in runs.values():
        for _ in range(5):  # warm-up (and compilation)
            step()
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for key, step in runs.items():
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            cpu[key].append(time.process_time() - c0)
            wall[key].append(time.perf_counter() - w0)
    print(f"torch {torch.__version__}, {args.repeats} repeats, median ms per step")
    for key in runs:
        print(
            f"{key:20s} CPU {1e3 * statistics.median(cpu[key]):7.2f}   wall {1e3 * statistics.median(wall[key]):7.2f}"
        )


if __name__ == "__main__":
    main()
