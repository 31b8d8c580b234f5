"""The kernels of one NP step on C3's shape (150 rows, 200 outputs) in float64 and float32, one thread, CPU time.

The GEMM that forms every ``A_i y`` (``[B, 200] x [200, 30000]``), the batched Gram matrix through the entry
points and layouts torch offers (``@``, ``bmm`` on ``J`` or on a contiguous ``J^T``, ``einsum``), the batched
Cholesky factorisation and the two ways of applying its factor. Median of 3 process-CPU timings after a warm-up.

    python benchmarks/layer_precision_kernels.py --batch 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

M, N = 150, 200


def cpu_seconds(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def kernels(batch: int, dtype: torch.dtype) -> dict[str, float]:
    A = torch.randn(M * N, N, dtype=dtype)
    y = torch.randn(batch, N, dtype=dtype)
    J = torch.randn(batch, M, N, dtype=dtype)
    Jt = J.transpose(1, 2).contiguous()
    G = J @ J.mT + N * torch.eye(M, dtype=dtype)
    L = torch.linalg.cholesky(G)
    r = torch.randn(batch, M, 1, dtype=dtype)

    def two_triangular():
        z = torch.linalg.solve_triangular(L, r, upper=False)
        return torch.linalg.solve_triangular(L.mT, z, upper=True)

    cases = {
        "GEMM y @ A^T": lambda: y @ A.T,
        "Gram J @ J^T": lambda: J @ J.mT,
        "Gram bmm(J, J^T)": lambda: torch.bmm(J, J.transpose(1, 2)),
        "Gram bmm(Jt^T, Jt)": lambda: torch.bmm(Jt.mT, Jt),
        "Gram einsum": lambda: torch.einsum("bmn,bkn->bmk", J, J),
        "cholesky_ex": lambda: torch.linalg.cholesky_ex(G),
        "cholesky_solve": lambda: torch.cholesky_solve(r, L),
        "two solve_triangular": two_triangular,
    }
    return {name: cpu_seconds(fn) for name, fn in cases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    f64, f32 = kernels(args.batch, torch.float64), kernels(args.batch, torch.float32)
    print(f"batch {args.batch}: kernel | float64 s | float32 s")
    for name in f64:
        print(f"| {name} | {f64[name]:.3f} | {f32[name]:.3f} |")


if __name__ == "__main__":
    main()
