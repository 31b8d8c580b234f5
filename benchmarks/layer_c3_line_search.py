"""C3's ENFORCE projection from the untrained backbone: the paper's NP steps against the line-searched ones.

Batch 200 of C3's training inputs (``nonconvex_quadratic``, size ``small``) through the untrained backbone
(seed 0), projected by ``EnforceProjection`` with ``method="paper"`` and ``method="line_search"``, in float64 and
with ``mixed_precision=True``, in training mode (batch mean of |h| to 1e-4) and evaluation mode (max |h| to
``--eval-tol``). Process CPU time, median of ``--repeats`` interleaved repeats, one thread; violations evaluated
in float64 on the output. ``--trajectory`` also prints max|h| and mean|h| after each depth k (the layer rerun with
``max_depth=k``: the iteration is deterministic, so that is its k-th iterate).

    PYTHONPATH=. python benchmarks/layer_c3_line_search.py --trajectory
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from problems import get_problem
from sqpoptim.layers import EnforceProjection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-tol", type=float, default=1e-6)
    parser.add_argument("--trajectory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # truncated runs of the trajectory miss their tolerance by design
    problem = get_problem("nonconvex_quadratic", size="small")
    net = problem.make_model(0)
    x = problem.x_train[: args.batch]
    with torch.no_grad():
        y_hat = net(x)
    h = lambda y: problem._h(x.double(), y.double()).abs()  # noqa: E731
    print(f"batch {args.batch}, raw max|h| {float(h(y_hat).max()):.3g}, mean|h| {float(h(y_hat).mean()):.3g}")
    cons = problem.output_constraints()
    configs = [(p, m) for p in ("float64", "mixed") for m in ("paper", "line_search")]

    def layer(precision, method, mode, **kw):
        return EnforceProjection(
            cons, method=method, mixed_precision=precision == "mixed", eval_tol=args.eval_tol, **kw
        ).train(mode == "train")

    runs: dict[tuple[str, str, str], list] = {}
    for _ in range(args.repeats):
        for precision, method in configs:
            for mode in ("train", "eval"):
                lay = layer(precision, method, mode)
                t0 = time.process_time()
                with torch.no_grad():
                    res = lay.project(x, y_hat)
                seconds = time.process_time() - t0
                v = h(res.y)
                runs.setdefault((precision, method, mode), []).append(
                    (seconds, res.iterations, float(v.mean()), float(v.max()))
                )
    print("| precision | method | mode | CPU s | NP steps | mean|h| | max|h| |")
    print("|---|---|---|---:|---:|---:|---:|")
    for (precision, method, mode), v in runs.items():
        cpu = statistics.median(a[0] for a in v)
        print(f"| {precision} | {method} | {mode} | {cpu:.3f} | {v[-1][1]} | {v[-1][2]:.2g} | {v[-1][3]:.2g} |")
    if args.trajectory:
        for precision, method in configs:
            out = []
            for k in range(0, 11):
                lay = layer(precision, method, "eval", max_depth=max(k, 1), nonconvergence="ignore")
                with torch.no_grad():
                    v = h(y_hat if k == 0 else lay.project(x, y_hat).y)
                out.append(f"{float(v.max()):.3g} ({float(v.mean()):.2g})")
                if float(v.max()) <= args.eval_tol:
                    break
            print(f"{precision} {method}: max|h| (mean|h|) by depth: " + " -> ".join(out))


if __name__ == "__main__":
    main()
