r"""Projection time and peak memory of the output layers on a random quadratic-equality instance.

Instance (200 outputs, 150 nonlinear equalities, C3's form):
:math:`h_i(x, y) = y^\top A_i y + c_i^\top y + d_i - x_i^3` with :math:`A_i = 0.02(G_i + G_i^\top)`,
:math:`G_i \sim N(0, 1)^{200\times200}`, :math:`c_i \sim N(0, 1)^{200}/\sqrt{200}`, :math:`d_i \sim N(0, 1)`;
per sample a feasible :math:`y^* \sim N(0, 1)`,
:math:`x_i = \mathrm{cbrt}(y^{*\top}A_iy^* + c_i^\top y^* + d_i)` and the raw output
:math:`\hat y = y^* + 0.1\,N(0, 1)`.

Two ways to give the layers the Jacobian :math:`J_{ik} = (2A_iy + c_i)_k`:

* ``generic``: only ``h`` (an einsum); the layers form ``vmap(jacrev(h))`` with :mod:`torch.func`. Reverse
  mode pays one backward of ``h`` per row, :math:`O(B m^2 n^2)`: m times the cost of ``h`` itself.
* ``structured``: ``h_jac`` returns ``(h, J)`` from one GEMM :math:`[B, n] \times [n, mn]` (``A_i y`` for
  every constraint and sample), :math:`O(B m n^2)`; KKT-Hardnet also gets
  :math:`\sum_i w_i \nabla^2 h_i = 2\sum_i w_i A_i` as one GEMM.

Per configuration: wall and process CPU time of ``layer.project`` in evaluation mode without autograd (median of
``--repeats`` after one warm-up), iterations, the largest :math:`|h|` of the output (evaluated independently
in float64), and peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS during the runs minus the
resident set before them, each configuration in a fresh subprocess). Stopping rules: ENFORCE until
:math:`\max|c| \le` ``--tol``; HardNet++ with ε = 0.3 and the early stop at ``--tol`` (checked every
iteration); KKT-Hardnet until :math:`\|F\|_\infty \le 10^{-10}`.

Usage::

    python benchmarks/layer_projection.py                       # CPU, batches 256 and 1024, structured
    python benchmarks/layer_projection.py --batch 4096 --layers enforce hardnet_pp
    python benchmarks/layer_projection.py --paths generic --batch 16 --layers enforce
    python benchmarks/layer_projection.py --jac-modes --batch 8  # vmap(jacrev) vs vmap(jacfwd), one Jacobian
    python benchmarks/layer_projection.py --device cuda --batch 4096
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time

import torch

from sqpoptim.layers import EnforceProjection, HardNetPP, KKTHardNet, OutputConstraints

N_OUT, N_CON = 200, 150


def make_instance(batch: int, device: torch.device, seed: int = 0):
    """The instance in float64: ``(A [m, n, n], c [m, n], d [m], x [B, m], y_star, y_hat [B, n])``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    G = torch.randn(N_CON, N_OUT, N_OUT, dtype=torch.float64, generator=gen)
    A = 0.02 * (G + G.mT)
    c = torch.randn(N_CON, N_OUT, dtype=torch.float64, generator=gen) / N_OUT**0.5
    d = torch.randn(N_CON, dtype=torch.float64, generator=gen)
    y_star = torch.randn(batch, N_OUT, dtype=torch.float64, generator=gen)
    x = torch.einsum("bi,kij,bj->bk", y_star, A, y_star) + y_star @ c.T + d
    x = torch.sign(x) * x.abs() ** (1 / 3)
    y_hat = y_star + 0.1 * torch.randn(batch, N_OUT, dtype=torch.float64, generator=gen)
    return tuple(t.to(device) for t in (A, c, d, x, y_star, y_hat))


def make_constraints(A, c, d, path: str, jac_mode: str = "rev") -> OutputConstraints:
    m, n = c.shape

    def h(x, y):
        return torch.einsum("bi,kij,bj->bk", y, A.to(y), y) + y @ c.to(y).T + d.to(y) - x**3

    if path == "generic":
        return OutputConstraints(h=h, jac_mode=jac_mode)
    A_flat = A.reshape(m * n, n)  # [m n, n]: one GEMM gives A_i y for every constraint and sample
    A_rows = A.reshape(m, n * n)

    def h_jac(x, y):
        Ay = (y @ A_flat.to(y).T).view(-1, m, n)  # [B, m, n], contiguous (A_i symmetric: yᵀA_iᵀ = (A_i y)ᵀ)
        value = (Ay @ y[:, :, None]).squeeze(-1) + y @ c.to(y).T + d.to(y) - x**3  # [B, m]
        if torch.is_grad_enabled() and y.requires_grad:
            return value, torch.add(c.to(y), Ay, alpha=2)  # J_i = 2 A_i y + c_i in one pass
        return value, Ay.mul_(2).add_(c.to(y))  # in place: no second [B, m, n] allocation

    def h_gemm(x, y):  # the values by the same GEMM (the einsum of ``h`` measured 2x slower for them)
        Ay = (y @ A_flat.to(y).T).view(-1, m, n)
        return (Ay @ y[:, :, None]).squeeze(-1) + y @ c.to(y).T + d.to(y) - x**3

    def lagrangian_hessian(x, y, w_h, w_g):
        return 2 * (w_h @ A_rows.to(y)).reshape(-1, n, n)  # Σ_i w_i ∇²h_i = 2 Σ_i w_i A_i

    return OutputConstraints(h=h_gemm, h_jac=h_jac, lagrangian_hessian=lagrangian_hessian)


def make_layer(name: str, cons: OutputConstraints, tol: float, gradient: str = "unrolled"):
    if name == "enforce":
        return EnforceProjection(cons, eval_tol=tol, gradient=gradient, nonconvergence="ignore").eval()
    if name == "enforce_mixed":  # float32 NP steps, float64 residuals (implicit gradient only)
        return EnforceProjection(cons, eval_tol=tol, mixed_precision=True, nonconvergence="ignore").eval()
    if name == "hardnet_pp":
        if gradient != "unrolled":
            raise ValueError("HardNetPP has no implicit gradient")
        return HardNetPP(cons, eps=0.3, tol=tol, early_stop=True, check_every=1, nonconvergence="ignore").eval()
    if name == "kkt":
        return KKTHardNet(cons, gradient=gradient, nonconvergence="ignore").eval()
    raise ValueError(f"unknown layer {name!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes(field: str) -> int | None:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process from /proc (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the peak-RSS mark (Linux >= 4.0), so temporaries of the instance set-up do not mask the runs'."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    peak = _rss_bytes("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_config(cfg: dict) -> dict:
    """Time one (layer, path, batch) configuration; returns a result row."""
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    A, c, d, x, _, y_hat = make_instance(cfg["batch"], device, cfg["seed"])
    cons = make_constraints(A, c, d, cfg["path"])
    gradient = cfg.get("gradient")  # None: projection only, without autograd
    layer = make_layer(cfg["layer"], cons, cfg["tol"], gradient or "unrolled")
    weights = torch.randn_like(y_hat)
    # CPU: peak RSS during the runs minus the resident set before them (inputs, constants, libraries).
    rss0 = _rss_bytes("VmRSS") if _reset_peak_rss() else _peak_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device)
    times, cpu = [], []
    with torch.set_grad_enabled(gradient is not None):
        for _ in range(cfg["repeats"] + 1):  # the first run warms up (allocator, kernels)
            y_in = y_hat.detach().requires_grad_(gradient is not None)
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            res = layer.project(x, y_in)
            if gradient is not None:  # forward + backward of a linear loss, as in a training step
                (res.y * weights).sum().backward()
            _sync(device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    with torch.no_grad():
        max_c = float(make_constraints(A, c, d, "generic").violation(x, res.y.detach()).max())
    peak = torch.cuda.max_memory_allocated(device) - mem0 if device.type == "cuda" else _peak_rss_bytes() - rss0
    return {
        **cfg,
        "time_s": statistics.median(times[1:]),
        "cpu_s": statistics.median(cpu[1:]),
        "iterations": res.iterations,
        "max_abs_c": max_c,
        "converged": bool(res.converged.all()),
        "peak_mem_gib": peak / 2**30,
    }


def time_jacobian_modes(batch: int, device: torch.device, repeats: int) -> list[dict]:
    """One generic Jacobian of h: the layers' row-batched reverse and forward modes, the per-sample
    ``vmap(jacrev(h_b))`` they replaced, a loop of one ``autograd.grad`` per row, and the structured GEMM
    (process CPU time, median of ``repeats`` after a warm-up)."""
    A, c, d, x, _, y_hat = make_instance(batch, device)
    h = make_constraints(A, c, d, "generic").h
    rows = c.shape[0]

    def per_sample():
        single = lambda xi, yi: h(xi[None], yi[None])[0]  # noqa: E731
        return torch.func.vmap(torch.func.jacrev(single, argnums=1))(x, y_hat)

    def loop():
        y = y_hat.detach().requires_grad_()
        out = h(x, y)
        eye = torch.eye(rows, dtype=y.dtype, device=y.device)
        return torch.stack(
            [torch.autograd.grad(out, y, eye[i].expand_as(out), retain_graph=True)[0] for i in range(rows)], 1
        )

    candidates = {
        "rev (rows)": lambda: make_constraints(A, c, d, "generic", "rev").evaluate(x, y_hat, jacobian=True),
        "fwd (columns)": lambda: make_constraints(A, c, d, "generic", "fwd").evaluate(x, y_hat, jacobian=True),
        "per-sample jacrev": per_sample,
        "autograd loop": loop,
        "structured": lambda: make_constraints(A, c, d, "structured").evaluate(x, y_hat, jacobian=True),
    }
    out = []
    for label, fn in candidates.items():
        times = []
        for _ in range(repeats + 1):
            _sync(device)
            t0 = time.process_time()
            fn()
            _sync(device)
            times.append(time.process_time() - t0)
        out.append({"jacobian": label, "batch": batch, "time_s": statistics.median(times[1:])})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", nargs="+", default=["enforce", "hardnet_pp", "kkt"])
    parser.add_argument("--paths", nargs="+", default=["structured"], choices=["structured", "generic"])
    parser.add_argument("--tol", type=float, default=1e-8, help="target max|c| for ENFORCE and HardNet++")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jac-modes", action="store_true", help="time one Jacobian per generic mode instead")
    parser.add_argument(
        "--gradients",
        nargs="+",
        choices=["unrolled", "implicit"],
        help="time forward + backward in these gradient modes instead of the projection alone",
    )
    parser.add_argument("--no-isolate", action="store_true", help="CPU: run in-process (peaks then overlap)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.jac_modes:
        rows = [r for b in args.batch for r in time_jacobian_modes(b, device, args.repeats)]
        for r in rows:
            print(f"jacobian={r['jacobian']:<18} batch={r['batch']:<5} {1e3 * r['time_s']:10.1f} ms CPU", flush=True)
    else:
        rows = []
        header = (
            f"{'layer':<11}{'path':<11}{'grad':<9}{'batch':>6}{'wall [s]':>11}{'CPU [s]':>10}{'iters':>7}{'max|c|':>11}"
        )
        header += f"{'peak GiB':>10}"
        print(f"device={device} threads={args.threads} torch={torch.__version__}\n{header}", flush=True)
        isolate = device.type == "cpu" and not args.no_isolate
        ctx = mp.get_context("spawn")
        for path in args.paths:
            for batch in args.batch:
                for layer, gradient in [(a, g) for a in args.layers for g in (args.gradients or [None])]:
                    if layer == "hardnet_pp" and gradient == "implicit":
                        continue  # unrolled only
                    cfg = {"layer": layer, "path": path, "batch": batch, "device": str(device)}
                    cfg |= {
                        "tol": args.tol,
                        "repeats": args.repeats,
                        "threads": args.threads,
                        "seed": args.seed,
                    }
                    cfg["gradient"] = gradient
                    if isolate:
                        with ctx.Pool(1) as pool:
                            row = pool.apply(run_config, (cfg,))
                    else:
                        row = run_config(cfg)
                    rows.append(row)
                    print(
                        f"{layer:<11}{path:<11}{gradient or '-':<9}{batch:>6}"
                        f"{row['time_s']:>11.3f}{row['cpu_s']:>10.3f}"
                        f"{row['iterations']:>7}"
                        f"{row['max_abs_c']:>11.1e}{row['peak_mem_gib']:>10.2f}",
                        flush=True,
                    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
