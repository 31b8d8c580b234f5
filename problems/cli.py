"""Command line: ``python -m problems run|plot|list`` (also installed as ``sqpoptim-problems``).

Examples::

    python -m problems run spring --quick --methods sqp-adam,adam-unc,adam-con   # < 2 min on a laptop CPU
    python -m problems run darcy --methods sqp-adam,adam-unc --lr 5e-3,5e-4 --batch full,mini --seeds 0-4
    python -m problems run burgers --quick --methods sqp-adam --batch mini --nproc 2   # 2 CPU processes
    torchrun --nproc-per-node 2 -m problems run burgers --quick --methods sqp-adam --batch mini
    python -m problems plot spring
    python -m problems list
"""

from __future__ import annotations

import argparse
import sys

from . import problem_class, problem_names
from .methods import METHODS
from .runner import RunSpec, run_sweep
from .runner.checkpoint import CheckpointError
from .runner.parallel import from_torchrun, run_sweep_on_ranks
from .runner.results import ResultsFileError

PAPER_METHODS = "sqp-adam,sqp-hb,adam-unc,adam-con"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"invalid --lr {text!r}: expected comma-separated numbers, e.g. 1e-3,5e-4") from None


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ValueError(f"invalid --seeds {text!r}: expected seeds and ranges, e.g. 0-4 or 0,2,5") from None
    if not out:
        raise ValueError(f"invalid --seeds {text!r}: no seed in it (write a range low-high, e.g. 0-4)")
    return out


def _specs(args: argparse.Namespace) -> list[RunSpec]:
    defaults = problem_class(args.problem).defaults
    methods = [m for m in args.methods.split(",") if m]
    lrs = _floats(args.lr) if args.lr else list(defaults.lrs[:1] if args.quick else defaults.lrs)
    batches = args.batch.split(",") if args.batch else (["full"] if args.quick else ["full", "mini"])
    size = args.size or ("small" if args.quick else "paper")
    specs = []
    for batch in batches:
        if batch not in ("full", "mini"):
            raise SystemExit(f"invalid --batch {batch!r}: expected full and/or mini")
        if args.iterations is not None:
            iterations = args.iterations
        elif args.quick:
            iterations = defaults.quick_iterations
        else:
            iterations = defaults.iterations_full if batch == "full" else defaults.iterations_mini
        seeds = [0] if batch == "full" else (_seeds(args.seeds) if args.seeds else list(defaults.mini_batch_seeds))
        for lr in lrs:
            for method in methods:
                for seed in seeds:
                    specs.append(
                        RunSpec(
                            args.problem,
                            method,
                            lr,
                            batch,
                            seed,
                            iterations,
                            size,
                            args.device,
                            args.dtype,
                            args.model_seed,
                            args.eval_every,
                            args.threads,
                            args.nproc,
                        )
                    )
    return specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m problems", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train methods on a problem (finished runs are loaded, interrupted ones resumed)")
    r.add_argument("problem", choices=problem_names())
    r.add_argument(
        "--methods", default=PAPER_METHODS, help=f"comma-separated method specs; known: {', '.join(METHODS)}"
    )
    r.add_argument("--lr", help="comma-separated learning rates (default: the paper's two; --quick: the first)")
    r.add_argument("--batch", help="full, mini or full,mini (default full,mini; --quick: full)")
    r.add_argument("--seeds", help="mini-batch seeds, e.g. 0-4 (default: the paper's 0-4)")
    r.add_argument("--iterations", "--epochs", type=int, help="budget per run (one epoch = one iteration)")
    r.add_argument("--quick", action="store_true", help="small data and the quick budget: minutes on a CPU")
    r.add_argument("--size", choices=("paper", "small", "tiny"), help="data scale (default paper; --quick: small)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    r.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per run (default 1: these problems are small and extra threads only spin)",
    )
    r.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="CPU processes (gloo) sharing each mini-batch; rank 0 writes (see problems.runner.parallel). "
        "Under torchrun the ranks it started are used instead",
    )
    r.add_argument("--model-seed", type=int, default=0)
    r.add_argument("--eval-every", type=int, help="iterations between full evaluations (default: 1%% of the budget)")
    r.add_argument("--results", default="results", help="results folder (default ./results)")
    r.add_argument("--cache", help="data cache folder (default $SQPOPTIM_CACHE or ~/.cache/sqpoptim)")
    r.add_argument("--no-plot", action="store_true", help="do not draw the figures at the end")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    p = sub.add_parser("plot", help="draw the figures of a problem from saved results")
    p.add_argument("problem", choices=problem_names())
    p.add_argument("--results", default="results")
    p.add_argument("--out", help="figure folder (default <results>/<problem>/figures)")
    sub.add_parser("list", help="list problems and methods")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name in problem_names():
            d = problem_class(name).defaults
            print(
                f"{name:14s} lrs={d.lrs} full={d.iterations_full} mini={d.iterations_mini} quick={d.quick_iterations}"
            )
        print("methods:", ", ".join(f"{k} ({m.label})" for k, m in METHODS.items()))
        return 0
    try:
        return _command(args)
    except (ValueError, OSError, ResultsFileError, CheckpointError) as err:  # bad input, a bad path or file: one line
        print(f"python -m problems {args.command}: error: {err}", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
    if args.command == "run":
        if args.nproc < 1:
            raise ValueError(f"invalid --nproc {args.nproc}: expected a positive number of processes")
        ranks = from_torchrun(args.threads)
        if ranks is not None:
            args.nproc = ranks.world
        specs = _specs(args)
        if ranks is not None:  # started by torchrun: this process is one rank of the run
            results = run_sweep(specs, args.results, cache_dir=args.cache, progress=not args.quiet, ranks=ranks)
            if not ranks.writer:
                return 0
        elif args.nproc > 1:
            results = run_sweep_on_ranks(
                specs,
                args.nproc,
                args.results,
                threads=args.threads or 1,
                cache_dir=args.cache,
                progress=not args.quiet,
            )
        else:
            results = run_sweep(specs, args.results, cache_dir=args.cache, progress=not args.quiet)
        print(
            f"\n{'method':34s} {'lr':>8s} {'batch':>5s} {'seed':>4s} {'objective':>11s} {'test MSE':>10s} "
            f"{'max|c|':>9s} {'ms/it':>7s}"
        )
        for spec, res in zip(specs, results):
            f = res["final"]
            note = f"  diverged at iteration {res['diverged_at']}" if res["status"] == "diverged" else ""
            print(
                f"{spec.method:34s} {spec.lr:8.1e} {spec.batch:>5s} {spec.seed:4d} {f['objective']:11.4e} "
                f"{f['test_mse']:10.3e} {f['max_abs_c']:9.2e} {res['timing']['ms_per_iteration']:7.2f}{note}"
            )
        if not args.no_plot:
            from .plots import plot_problem

            files = plot_problem(args.results, args.problem)
            print("\nfigures:", *[str(f) for f in files if f.suffix == ".png"], sep="\n  ")
        return 0
    from .plots import plot_problem

    files = plot_problem(args.results, args.problem, args.out)
    print(*[str(f) for f in files], sep="\n")
    return 0
