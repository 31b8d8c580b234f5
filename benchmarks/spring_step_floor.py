"""Where spring's SQP-Adam iteration goes, against Adam(unc): the runner's two iterations, the closure with its
backward passes alone, and a hand-fused minimal step (the floor of the algorithm's own work).

In one process, interleaved, one intra-op thread, process CPU time; medians (and minima) over ``--rounds`` rounds
of ``--repeats`` iterations:

* ``adam-unc``, ``sqp-adam``: the runner's iterations (``benchmarks/problem_step_time.py``'s);
* ``torch-adam``: ``torch.optim.Adam`` on the objective alone (its closure: zero_grad, loss, backward);
* ``adam-unc:c-shared``: Adam(unc) whose closure reads c off the objective's residual pass, as SQP-Adam's does
  (the runner's Adam(unc) evaluates c in a separate no-grad pass, for its log);
* ``closure+grad``: spring's closure and one scalar backward of its loss (what Adam(unc) differentiates);
* ``closure+joint``: the closure and the joint backward of SQP-Adam (one batched backward over the rows (f, c));
* ``fused``: the joint backward plus the least SQP-Adam step: G = JJᵀ in float64, one Cholesky factorisation,
  its condition number, the projected gradient, the damped normal step, Adam's moments and the projected
  direction, the update. No damping judgement, no input or step checks, no diagnostics, no state beyond the
  moments: a floor for the package's step, not a method.

    python benchmarks/spring_step_floor.py
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time

import torch
from problem_step_time import iteration_timer  # (run as a script: benchmarks/ is on the path)

import sqpoptim
from problems import get_problem


def fused_step(problem, lr: float):
    """One iteration of the hand-fused minimal step on its own model (see the module docstring)."""
    torch.manual_seed(0)
    model = problem.make_model(0)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    exp_avg, exp_avg_sq = torch.zeros(n), torch.zeros(n)
    beta1, beta2, eps, nu = 0.9, 0.999, 1e-8, 1e-6
    count = [0]

    def solve(L: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(b.unsqueeze(1), L).squeeze(1)

    def iteration() -> None:
        with torch.enable_grad():
            loss, c = problem.objective_and_constraints(model, None)
            rows = torch.cat([loss.reshape(1), c])
            eye = torch.eye(rows.shape[0])
            grads = torch.autograd.grad(rows, params, eye, is_grads_batched=True)
        with torch.no_grad():
            K = torch.cat([g.reshape(rows.shape[0], -1) for g in grads], 1)
            g, J = K[0], K[1:]
            J64 = J.double()
            G = J64 @ J64.T
            L, _ = torch.linalg.cholesky_ex(G)
            torch.linalg.eigvalsh(G).tolist()  # the condition number the package reports
            y = solve(L, J64 @ g.double())
            gbar = torch.addmv(g, J.T, y.float(), alpha=-1)
            Gd = G.clone()
            Gd.diagonal().add_(nu * float(G.diagonal().mean()))
            Ld, _ = torch.linalg.cholesky_ex(Gd)
            v = J.T @ solve(Ld, -c.detach().double()).float()
            count[0] += 1
            exp_avg.mul_(beta1).add_(gbar)
            exp_avg_sq.mul_(beta2).addcmul_(gbar, gbar)
            alpha = lr * (1 - beta1) * math.sqrt((1 - beta2 ** count[0]) / (1 - beta2))
            d = exp_avg / (exp_avg_sq + eps).sqrt_()
            u = torch.addmv(d, J.T, solve(L, J64 @ d.double()).float(), alpha=-1)
            delta = torch.add(lr * v, u, alpha=-alpha)
            views = [t.view_as(p) for t, p in zip(delta.split([p.numel() for p in params]), params)]
            torch._foreach_add_(params, views)

    return iteration


def baseline_timers(problem, lr: float) -> dict:
    """torch.optim.Adam on the objective, and Adam(unc) with c read off the objective's pass."""
    torch.manual_seed(0)
    model = problem.make_model(0)
    adam = torch.optim.Adam(model.parameters(), lr=lr)

    def closure():
        adam.zero_grad()
        loss = problem.objective(model, None)
        loss.backward()
        return loss

    torch.manual_seed(0)
    model_unc = problem.make_model(0)
    unc = sqpoptim.AdamUnc(model_unc.parameters(), lr=lr)
    return {
        "torch-adam": lambda: adam.step(closure),
        "adam-unc:c-shared": lambda: unc.step(lambda: problem.objective_and_constraints(model_unc, None)),
    }


def closure_timers(problem, lr: float) -> dict:
    torch.manual_seed(0)
    model = problem.make_model(0)
    params = list(model.parameters())

    def closure_grad() -> None:
        with torch.enable_grad():
            loss, _ = problem.objective_and_constraints(model, None)
            torch.autograd.grad(loss, params)

    def closure_joint() -> None:
        with torch.enable_grad():
            loss, c = problem.objective_and_constraints(model, None)
            rows = torch.cat([loss.reshape(1), c])
            torch.autograd.grad(rows, params, torch.eye(rows.shape[0]), is_grads_batched=True)

    return {"closure+grad": closure_grad, "closure+joint": closure_joint}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = get_problem("spring", size="paper", device="cpu", dtype=torch.float32)
    lr = problem.defaults.lrs[0]
    timers = {name: iteration_timer(problem, name, lr, "full") for name in ("adam-unc", "sqp-adam")}
    timers.update(baseline_timers(problem, lr))
    timers.update(closure_timers(problem, lr))
    timers["fused"] = fused_step(problem, lr)
    for _ in range(30):  # warm-up
        for it in timers.values():
            it()
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, it in timers.items():
            t0 = time.process_time()
            for _ in range(args.repeats):
                it()
            times[name].append(1e3 * (time.process_time() - t0) / args.repeats)
    ref = statistics.median(times["adam-unc"])
    print(f"{datetime.date.today()} · torch {torch.__version__} · {args.threads} thread(s) · spring, full batch")
    print("| iteration | CPU ms (median) | CPU ms (min) | × Adam(unc) |")
    print("|---|---:|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.3f} | {min(t):.3f} | {statistics.median(t) / ref:.3f}× |")


if __name__ == "__main__":
    main()
