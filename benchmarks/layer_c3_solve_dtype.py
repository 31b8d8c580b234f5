"""C3's ENFORCE projection with the layer's iterations in float32 (``solve_dtype``) against float64.

Batch 200 of C3's training inputs (``nonconvex_quadratic``, size ``small``) through the untrained backbone
(seed 0), projected in training mode (batch mean of |h| to 1e-4) and evaluation mode (max |h| to 1e-6); process
CPU time, median of 3 interleaved repeats, one thread; the violations are evaluated in float64 on the output.

    python benchmarks/layer_c3_solve_dtype.py
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from problems import get_problem
from sqpoptim.layers import EnforceProjection


def main(repeats: int = 3) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # evaluation mode in float32 misses its tolerance: reported below
    problem = get_problem("nonconvex_quadratic", size="small")
    net = problem.make_model(0)
    x = problem.x_train[:200]
    with torch.no_grad():
        y_hat = net(x)
    print(f"raw max|h| {float(problem._h(x.double(), y_hat.double()).abs().max()):.3g}")
    runs: dict[tuple[str, str], list[tuple[float, int, float, float]]] = {}
    for _ in range(repeats):
        for dtype in (torch.float64, torch.float32):
            for mode in ("train", "eval"):
                layer = EnforceProjection(problem.output_constraints(), solve_dtype=dtype).train(mode == "train")
                t0 = time.process_time()
                with torch.no_grad():
                    res = layer.project(x, y_hat)
                seconds = time.process_time() - t0
                h = problem._h(x.double(), res.y.double()).abs()
                steps = int(torch.as_tensor(res.iterations).max())
                runs.setdefault((str(dtype), mode), []).append((seconds, steps, float(h.mean()), float(h.max())))
    for (dtype, mode), v in runs.items():
        cpu = statistics.median(a[0] for a in v)
        print(f"{dtype} {mode}: CPU {cpu:.2f} s, {v[-1][1]} NP steps, mean|h| {v[-1][2]:.2g}, max|h| {v[-1][3]:.2g}")


if __name__ == "__main__":
    main()
