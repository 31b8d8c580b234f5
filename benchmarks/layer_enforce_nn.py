"""ENFORCE's projection on the generic path (only ``h`` given), ours against the authors' enforce-nn 1.0.4.

The instance is ``layer_projection.py``'s (200 outputs, 150 quadratic equalities ``y^T A_i y + c_i^T y + d_i =
x_i^3``, raw output 0.1 from a feasible point). Neither side gets a hand-written Jacobian:

* enforce-nn (``enforce.core.model.ENFORCE``, identity scaling, ``weighting_option=1``, i.e. the plain NP step):
  its ``ada_np`` forms ``B`` with one ``torch.autograd.grad`` pass per constraint row (``create_graph=True``)
  in float32 (its scaling tensors are float32), then ``y <- B* y + v*``; stopped at max|c| <= ``--tol`` or its
  100-step cap. Each NP step is timed by process CPU time; reported: the median step, the number of steps, the
  total, and the final max|c| (evaluated in float64).
* ours: ``EnforceProjection(h)`` (``jacobian="auto"``: one row-batched reverse-mode Jacobian at ŷ, then
  Broyden updates; float64 solve), forward to ``--tol``; and ``HardNetPP(h)`` forward + backward (implicit
  gradient: one more Jacobian at the output) to ``--tol-hardnet``; each timed as the median of ``--repeats``
  calls after one warm-up call (torch.func's first call in a process costs a second or two).

enforce-nn is a benchmark-only dependency (``pip install enforce-nn==1.0.4``, the ``bench`` extra).

    python benchmarks/layer_enforce_nn.py --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_projection import make_constraints, make_instance

from sqpoptim.layers import EnforceProjection, HardNetPP


def ours(A, c, d, x, y_hat, tol: float, tol_hardnet: float, repeats: int) -> dict:
    """Median CPU time of ``repeats`` calls after a warm-up call on two samples (torch.func's first call)."""
    h = make_constraints(A, c, d, "generic").h
    weights = torch.linspace(-1, 1, y_hat.shape[1], dtype=y_hat.dtype)

    def enforce(xx, yy):
        return EnforceProjection(h, eval_tol=tol, nonconvergence="ignore").eval().project(xx, yy)

    def hardnet_fwd_bwd(xx, yy):
        y_in = yy.clone().requires_grad_()
        res = HardNetPP(h, tol=tol_hardnet, nonconvergence="ignore").eval().project(xx, y_in)
        (res.y * weights).sum().backward()
        return res

    out = {}
    for name, fn in (("enforce", enforce), ("hardnet_pp_fwd_bwd", hardnet_fwd_bwd)):
        fn(x[:2], y_hat[:2])
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            res = fn(x, y_hat)
            times.append(time.process_time() - t0)
        max_c = float(make_constraints(A, c, d, "generic").violation(x, res.y.detach()).max())
        out[name] = {"cpu_s": statistics.median(times), "iterations": res.iterations, "max_abs_c": max_c}
    return out


def enforce_nn(A, c, d, x, y_hat, tol: float, max_steps: int) -> dict:
    from enforce.core.config import ENFORCEConfig
    from enforce.core.model import ENFORCE

    m, n = c.shape
    h = make_constraints(A, c, d, "generic").h
    cfg = ENFORCEConfig(input_neurons=m, output_neurons=n, max_it=max_steps)
    zeros_in, ones_in = torch.zeros(m), torch.ones(m)
    model = ENFORCE(
        (zeros_in, ones_in), (torch.zeros(n), torch.ones(n)), lambda xx, yy: h(xx, yy), cfg, weighting_option=1
    ).cpu()
    xf = x.float()
    y = y_hat.float().requires_grad_()
    steps, cpu = [], []
    for _ in range(max_steps):
        viol = float(h(x, y.detach().double()).abs().max())
        steps.append(viol)
        if viol <= tol:
            break
        t0 = time.process_time()
        model.compute_dc_dy(xf, y)
        y = model.project(xf, y).detach().requires_grad_()
        cpu.append(time.process_time() - t0)
    final = float(h(x, y.detach().double()).abs().max())
    return {
        "median_step_cpu_s": statistics.median(cpu),
        "steps": len(cpu),
        "cpu_s": sum(cpu),
        "max_abs_c": final,
        "best_max_abs_c": min([*steps, final]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tol", type=float, default=1e-8)
    parser.add_argument("--tol-hardnet", type=float, default=1e-6)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="our calls timed after the warm-up (median)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    A, c, d, x, _, y_hat = make_instance(args.batch, torch.device("cpu"))
    print(f"batch {args.batch}, torch {torch.__version__}, {args.threads} thread(s)", flush=True)
    for name, r in ours(A, c, d, x, y_hat, args.tol, args.tol_hardnet, args.repeats).items():
        print(
            f"ours {name}: {r['cpu_s']:.2f} s CPU (median), {r['iterations']} iterations, max|c| {r['max_abs_c']:.1e}",
            flush=True,
        )
    r = enforce_nn(A, c, d, x, y_hat, args.tol, args.max_steps)
    print(
        f"enforce-nn 1.0.4: {r['median_step_cpu_s']:.2f} s CPU per NP step, {r['steps']} steps, "
        f"{r['cpu_s']:.1f} s in all, final max|c| {r['max_abs_c']:.1e} (best {r['best_max_abs_c']:.1e})"
    )


if __name__ == "__main__":
    main()
